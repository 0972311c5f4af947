//! Each upstream's healthy instances from the agent: watched with a
//! blocking query (prepared queries are polled, as they cannot block) and
//! swapped into the upstream's balancer, whole, when the set changes.
//! Runs until the cancellation token fires.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;

use super::api::{Blocking, Reply, ServiceEntry};
use super::watch::watch;
use super::AgentClient;
use super::WatchPolicy;
use crate::identity::SpiffeId;
use crate::proxy::balancer::Balancer;

/// How instances of one upstream are found.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// `/v1/health/connect/<name>?passing`, blocking.
    Service {
        name: String,
        datacenter: Option<String>,
    },
    /// `/v1/query/<name>/execute?connect=true`, polled every `every`.
    Query {
        name: String,
        datacenter: Option<String>,
        every: Duration,
    },
}

/// Keeps `balancer` filled with the healthy instances of an upstream.
/// `expect` is the destination's identity (its service name and our trust
/// domain); each instance's SNI uses the datacenter Consul reports for it.
pub async fn instances(
    client: AgentClient,
    discovery: Discovery,
    expect: SpiffeId,
    balancer: Arc<Balancer>,
    policy: WatchPolicy,
    cancel: CancellationToken,
) {
    let label = match &discovery {
        Discovery::Service { name, .. } => format!("health {name}"),
        Discovery::Query { name, .. } => format!("query {name}"),
    };
    let mut last: Option<Vec<(SocketAddr, ServerName<'static>)>> = None;
    let mut publish = |entries: Vec<ServiceEntry>| {
        let set = targets(&entries, &expect);
        if last.as_ref() != Some(&set) {
            tracing::info!(upstream = %expect.service, instances = set.len(), "upstream instances updated");
            balancer.set_instances(set.clone());
            last = Some(set);
        }
    };
    match discovery {
        Discovery::Service { name, datacenter } => {
            watch(
                &label,
                policy,
                &cancel,
                |b| client.healthy(&name, datacenter.as_deref(), b),
                &mut publish,
            )
            .await
        }
        Discovery::Query {
            name,
            datacenter,
            every,
        } => {
            let mut first = true;
            let fetch = |_: Blocking| {
                let wait = if first { Duration::ZERO } else { every };
                first = false;
                let (client, name, dc) = (client.clone(), name.clone(), datacenter.clone());
                async move {
                    tokio::time::sleep(wait).await;
                    client.query(&name, dc.as_deref()).await.map(|r| Reply {
                        value: r.value.nodes,
                        index: 0,
                    })
                }
            };
            watch(&label, policy, &cancel, fetch, &mut publish).await
        }
    }
}

/// Dial targets from health entries: address (service, else node) and port,
/// with the SNI for the instance's datacenter. Entries whose address is not
/// an IP literal are skipped: resolving names per update would let DNS stall
/// discovery, and Consul registers addresses as IPs in practice.
fn targets(entries: &[ServiceEntry], expect: &SpiffeId) -> Vec<(SocketAddr, ServerName<'static>)> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Ok(ip) = e.dial_host().parse::<IpAddr>() else {
            tracing::warn!(upstream = %expect.service, address = %e.dial_host(), "instance address is not an IP; skipped");
            continue;
        };
        if e.service.port == 0 {
            continue;
        }
        let addr = SocketAddr::new(ip, e.service.port);
        let dc = if e.node.datacenter.is_empty() {
            &expect.datacenter
        } else {
            &e.node.datacenter
        };
        let id = SpiffeId {
            datacenter: dc.clone(),
            ..expect.clone()
        };
        let name =
            ServerName::try_from(id.sni()).unwrap_or_else(|_| ServerName::IpAddress(ip.into()));
        out.push((addr, name));
    }
    out.sort_by_key(|a| a.0);
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_use_service_address_then_node_and_instance_dc() {
        let entries: Vec<ServiceEntry> = serde_json::from_str(
            r#"[
              {"Node":{"Address":"10.0.0.1","Datacenter":"dc2"},"Service":{"Address":"","Port":21000}},
              {"Node":{"Address":"10.0.0.2","Datacenter":"dc1"},"Service":{"Address":"10.0.9.9","Port":21001}},
              {"Node":{"Address":"node.example","Datacenter":"dc1"},"Service":{"Address":"","Port":21002}},
              {"Node":{"Address":"10.0.0.3","Datacenter":"dc1"},"Service":{"Address":"","Port":0}}
            ]"#,
        )
        .unwrap();
        let expect = SpiffeId::service("td.consul", "dc1", "api");
        let t = targets(&entries, &expect);
        assert_eq!(t.len(), 2, "hostname and port 0 skipped");
        assert_eq!(t[0].0, "10.0.0.1:21000".parse().unwrap());
        assert_eq!(
            format!("{:?}", t[0].1),
            format!(
                "{:?}",
                ServerName::try_from("api.default.dc2.internal.td.consul").unwrap()
            )
        );
        assert_eq!(t[1].0, "10.0.9.9:21001".parse().unwrap());
    }
}
