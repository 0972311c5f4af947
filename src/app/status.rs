//! The `/status` document: identity, leaf, roots, listeners, instances.

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{json, Value};

use super::upstreams::{UpstreamSet, UpstreamStatus};
use crate::control::Receiver;
use crate::identity::tls::Credentials;
use crate::ops::admin::StatusFn;

/// Renders `/status` from the live state at each request.
pub fn status_fn(
    service: String,
    inbound: Option<SocketAddr>,
    credentials: Receiver<Credentials>,
    upstreams: Arc<UpstreamSet>,
) -> StatusFn {
    Box::new(move || {
        document(
            &service,
            inbound,
            credentials.latest().as_deref(),
            &upstreams.status(),
        )
    })
}

fn document(
    service: &str,
    inbound: Option<SocketAddr>,
    credentials: Option<&Credentials>,
    upstreams: &[UpstreamStatus],
) -> Value {
    let ups: Vec<Value> = upstreams
        .iter()
        .map(|u| {
            let instances: Vec<Value> = u
                .instances
                .iter()
                .map(|i| {
                    json!({
                        "address": i.addr.to_string(),
                        "consecutive_failures": i.consecutive_failures,
                        "state": if i.ejected { "ejected" } else { "in rotation" },
                    })
                })
                .collect();
            json!({ "name": u.name, "listen": u.listen.to_string(), "instances": instances })
        })
        .collect();
    json!({
        "service": service,
        "identity": credentials.map(|c| c.identity.id.to_string()),
        "leaf": credentials.map(|c| json!({ "serial": c.identity.serial, "not_after_unix": c.leaf_not_after })),
        "roots": credentials.map(|c| c.root_count()),
        "inbound": inbound.map(|a| a.to_string()),
        "upstreams": ups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::balancer::InstanceState;

    #[test]
    fn lists_listeners_and_instance_states() {
        let ups = [UpstreamStatus {
            name: "db".into(),
            listen: crate::config::BindAddr::Tcp("127.0.0.1:9191".parse().unwrap()),
            instances: vec![
                InstanceState {
                    addr: "10.0.0.1:21000".parse().unwrap(),
                    consecutive_failures: 0,
                    ejected: false,
                },
                InstanceState {
                    addr: "10.0.0.2:21000".parse().unwrap(),
                    consecutive_failures: 3,
                    ejected: true,
                },
            ],
        }];
        let doc = document("api", Some("127.0.0.1:21000".parse().unwrap()), None, &ups);
        assert_eq!(doc["service"], "api");
        assert_eq!(doc["inbound"], "127.0.0.1:21000");
        assert_eq!(doc["identity"], Value::Null, "no certificates yet");
        let db = &doc["upstreams"][0];
        assert_eq!(db["listen"], "127.0.0.1:9191");
        assert_eq!(db["instances"][0]["state"], "in rotation");
        assert_eq!(db["instances"][1]["state"], "ejected");
        assert_eq!(db["instances"][1]["consecutive_failures"], 3);
    }
}
