//! Registration mode (`-proxy-id`, `-sidecar-for`): the proxy's whole
//! configuration comes from its `connect-proxy` registration on the local
//! agent, watched with a hash-blocking query so that changes apply live.
//!
//! What is read (spec §4.3), and how it differs from Consul's built-in proxy:
//! - identity: `Proxy.DestinationServiceName` (the leaf is for this name);
//! - public listener: `Address`/`Port`, **overridden** by
//!   `Proxy.Config.bind_address`/`bind_port` — Envoy's order, which Nomad
//!   relies on (it registers the host IP as `Address` but the proxy must bind
//!   inside the network namespace, spec §5.2). Consul's own proxy does it the
//!   other way round and cannot run as a Nomad sidecar because of it.
//!   Port 0 means no public listener;
//! - local app: `Proxy.LocalServiceAddress` (default 127.0.0.1) and
//!   `Proxy.LocalServicePort`;
//! - `Proxy.Config.local_connect_timeout_ms`, `handshake_timeout_ms`, and
//!   each upstream's `Config.connect_timeout_ms`, read leniently (JSON
//!   numbers arrive as floats, or as strings when quoted) — the built-in
//!   proxy silently ignores the last one for that reason;
//! - `Proxy.Upstreams[]`: name, type (`service`/`prepared_query`),
//!   datacenter, `LocalBindAddress` (default 127.0.0.1), `LocalBindPort`.
//!   Unix-socket binds are not supported and are skipped with an error log.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::api::AgentService;
use super::watch::backoff;
use super::WatchPolicy;
use super::{AgentClient, AgentError};
use crate::config::agent::ProxyIdentity;
use crate::config::{Discovery, UpstreamConfig};
use crate::control::{ListenerSet, Publisher};

/// Finds the proxy ID for `-sidecar-for <service-id>`: the one local
/// `connect-proxy` whose `Proxy.DestinationServiceID` equals it, compared
/// case-insensitively, as Consul's command does.
pub async fn sidecar_for(client: &AgentClient, service_id: &str) -> Result<String, String> {
    let services: HashMap<String, AgentService> =
        client.services().await.map_err(|e| e.to_string())?;
    let mut ids: Vec<&str> = services
        .values()
        .filter(|s| s.kind == "connect-proxy")
        .filter(|s| {
            s.proxy
                .as_ref()
                .is_some_and(|p| p.destination_service_id.eq_ignore_ascii_case(service_id))
        })
        .map(|s| s.id.as_str())
        .collect();
    ids.sort_unstable();
    match ids.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(format!("No sidecar proxy registered for {service_id}")),
        many => Err(format!(
            "More than one sidecar proxy registered for {service_id}; start ferry with -proxy-id and one of: {}",
            many.join(", ")
        )),
    }
}

/// Reads the registration once (`hash` None) or when it changes.
pub async fn fetch(
    client: &AgentClient,
    proxy_id: &str,
    hash: Option<&str>,
    wait: Duration,
) -> Result<(AgentService, Option<String>), AgentError> {
    client.agent_service(proxy_id, hash, wait).await
}

/// A number in `Proxy.Config`: a JSON number (Go sends floats) or a string.
fn number(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn millis(v: Option<&Value>) -> Option<Duration> {
    number(v)
        .filter(|n| *n > 0.0 && n.is_finite())
        .map(|n| Duration::from_millis(n as u64))
}

fn ip_or(s: &str, default: IpAddr) -> Result<IpAddr, String> {
    if s.is_empty() {
        return Ok(default);
    }
    s.parse().map_err(|_| format!("{s:?} is not an IP address"))
}

/// Derives what the proxy should do from its registration.
pub fn derive(svc: &AgentService) -> Result<ListenerSet, String> {
    if svc.kind != "connect-proxy" {
        return Err(format!(
            "service {:?} is of kind {:?}, not connect-proxy",
            svc.id, svc.kind
        ));
    }
    let proxy = svc.proxy.clone().unwrap_or_default();
    if proxy.destination_service_name.is_empty() {
        return Err(format!(
            "proxy {:?} has no Proxy.DestinationServiceName",
            svc.id
        ));
    }
    let cfg = &proxy.config;

    let bind_ip = match cfg.get("bind_address").and_then(Value::as_str) {
        Some(a) if !a.is_empty() => ip_or(a, IpAddr::V4(Ipv4Addr::UNSPECIFIED))
            .map_err(|e| format!("Proxy.Config.bind_address: {e}"))?,
        _ => ip_or(&svc.address, IpAddr::V4(Ipv4Addr::UNSPECIFIED))
            .map_err(|e| format!("Address: {e}"))?,
    };
    let bind_port = match number(cfg.get("bind_port")) {
        Some(p) if (0.0..=65535.0).contains(&p) => p as u16,
        Some(p) => return Err(format!("Proxy.Config.bind_port {p} is not a port")),
        None => svc.port,
    };
    let listen = (bind_port != 0).then(|| SocketAddr::new(bind_ip, bind_port));

    if !proxy.local_service_socket_path.is_empty() {
        tracing::error!(path = %proxy.local_service_socket_path, "Proxy.LocalServiceSocketPath is not supported; using LocalServiceAddress/Port");
    }
    let app_ip = ip_or(
        &proxy.local_service_address,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    )
    .map_err(|e| format!("Proxy.LocalServiceAddress: {e}"))?;
    if listen.is_some() && proxy.local_service_port == 0 {
        return Err(
            "Proxy.LocalServicePort is 0: no local app to forward inbound connections to".into(),
        );
    }
    let service_addr = SocketAddr::new(app_ip, proxy.local_service_port).to_string();

    let mut upstreams = Vec::new();
    for u in &proxy.upstreams {
        if !u.local_bind_socket_path.is_empty() {
            tracing::error!(upstream = %u.destination_name, "LocalBindSocketPath is not supported; upstream skipped");
            continue;
        }
        if u.local_bind_port == 0 || u.destination_name.is_empty() {
            tracing::error!(upstream = %u.destination_name, "upstream without a name or LocalBindPort; skipped");
            continue;
        }
        let ip = match ip_or(&u.local_bind_address, IpAddr::V4(Ipv4Addr::LOCALHOST)) {
            Ok(ip) => ip,
            Err(e) => {
                tracing::error!(upstream = %u.destination_name, "LocalBindAddress: {e}; upstream skipped");
                continue;
            }
        };
        let datacenter = Some(u.datacenter.clone()).filter(|d| !d.is_empty());
        let discovery = if u.destination_type == "prepared_query" {
            Discovery::Query { datacenter }
        } else {
            Discovery::Service { datacenter }
        };
        upstreams.push(UpstreamConfig {
            name: u.destination_name.clone(),
            bind: SocketAddr::new(ip, u.local_bind_port),
            discovery,
            deadline: millis(u.config.get("connect_timeout_ms")),
            max_conns: None,
            ejection: None,
        });
    }
    Ok(ListenerSet {
        service: proxy.destination_service_name.clone(),
        listen,
        service_addr,
        local_connect_timeout: millis(cfg.get("local_connect_timeout_ms")),
        handshake_timeout: millis(cfg.get("handshake_timeout_ms")),
        upstreams,
    })
}

/// The proxy ID registration mode follows: given, or found for
/// `-sidecar-for`.
pub async fn proxy_id(client: &AgentClient, identity: &ProxyIdentity) -> Result<String, String> {
    match identity {
        ProxyIdentity::ProxyId(id) => Ok(id.clone()),
        ProxyIdentity::SidecarFor(id) => sidecar_for(client, id).await,
        ProxyIdentity::None => Err("no proxy ID".into()),
    }
}

/// Watches the proxy's registration (hash-blocking) and publishes each
/// valid listener set derived from it, when it changed. A registration that
/// cannot be used, or that has gone, is logged once and the last good one
/// stays in force. Runs until `cancel`.
pub async fn follow(
    client: AgentClient,
    proxy_id: String,
    tx: Arc<Publisher<ListenerSet>>,
    policy: WatchPolicy,
    cancel: CancellationToken,
) {
    let mut hash: Option<String> = None;
    let mut failures = 0u32;
    let mut failing: Option<String> = None;
    loop {
        let fetched = tokio::select! {
            _ = cancel.cancelled() => return,
            r = fetch(&client, &proxy_id, hash.as_deref(), policy.wait) => r,
        };
        let problem = match fetched {
            Ok((svc, h)) => {
                hash = h;
                match derive(&svc) {
                    Ok(set) => {
                        if failing.take().is_some() {
                            tracing::info!(proxy_id = %proxy_id, "proxy registration usable again");
                        }
                        failures = 0;
                        tx.publish_if_changed(set);
                        if hash.is_none() {
                            // No hash to block on: do not spin.
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = tokio::time::sleep(policy.min_interval) => {}
                            }
                        }
                        continue;
                    }
                    Err(why) => why,
                }
            }
            Err(e) => {
                hash = None;
                e.to_string()
            }
        };
        failures += 1;
        if failing.as_deref() != Some(problem.as_str()) {
            tracing::warn!(proxy_id = %proxy_id, error = %problem, "cannot use the proxy registration; keeping the last good one");
            failing = Some(problem);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff(policy, failures)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(json: &str) -> AgentService {
        serde_json::from_str(json).expect("agent service JSON")
    }

    #[test]
    fn nomad_registration_binds_inside_the_namespace() {
        // What Nomad registers for a bridge-mode sidecar (spec §5.2): the
        // host IP and port as Address/Port, the in-namespace bind in Config.
        let s = svc(r#"{
            "Kind":"connect-proxy","ID":"_nomad-task-x-group-g-api-8080-sidecar-proxy","Service":"api-sidecar-proxy",
            "Address":"10.0.0.5","Port":25001,
            "Proxy":{"DestinationServiceName":"api","DestinationServiceID":"_nomad-task-x-group-g-api-8080",
                     "LocalServiceAddress":"127.0.0.1","LocalServicePort":8080,
                     "Config":{"bind_address":"0.0.0.0","bind_port":25001.0,"local_connect_timeout_ms":"250","envoy_stats_tags":["a"]},
                     "Upstreams":[
                       {"DestinationType":"service","DestinationName":"db","LocalBindPort":18080,"Config":{"connect_timeout_ms":3000.0}},
                       {"DestinationName":"cache","Datacenter":"dc2","LocalBindAddress":"127.0.0.2","LocalBindPort":18081},
                       {"DestinationType":"prepared_query","DestinationName":"q","LocalBindPort":18082},
                       {"DestinationName":"sock","LocalBindSocketPath":"/tmp/s"},
                       {"DestinationName":"noport"}
                     ]}}"#);
        let c = derive(&s).unwrap();
        assert_eq!(c.service, "api");
        assert_eq!(
            c.listen,
            Some("0.0.0.0:25001".parse().unwrap()),
            "Config.bind_address wins over Address"
        );
        assert_eq!(c.service_addr, "127.0.0.1:8080");
        assert_eq!(
            c.local_connect_timeout,
            Some(Duration::from_millis(250)),
            "string number accepted"
        );
        let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            ["db", "cache", "q"],
            "socket and port-less upstreams skipped"
        );
        assert_eq!(c.upstreams[0].bind, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(
            c.upstreams[0].deadline,
            Some(Duration::from_secs(3)),
            "float connect_timeout_ms honoured"
        );
        assert_eq!(
            c.upstreams[1].discovery,
            Discovery::Service {
                datacenter: Some("dc2".into())
            }
        );
        assert_eq!(c.upstreams[1].bind, "127.0.0.2:18081".parse().unwrap());
        assert_eq!(
            c.upstreams[2].discovery,
            Discovery::Query { datacenter: None }
        );
    }

    #[test]
    fn address_and_port_apply_without_overrides() {
        let s = svc(
            r#"{"Kind":"connect-proxy","ID":"web-sidecar-proxy","Address":"","Port":21000,
            "Proxy":{"DestinationServiceName":"web","LocalServicePort":9090,"Config":null,"Upstreams":null}}"#,
        );
        let c = derive(&s).unwrap();
        assert_eq!(c.listen, Some("0.0.0.0:21000".parse().unwrap()));
        assert_eq!(c.service_addr, "127.0.0.1:9090");
        assert!(c.upstreams.is_empty());
        let no_port = svc(
            r#"{"Kind":"connect-proxy","ID":"p","Port":0,"Proxy":{"DestinationServiceName":"web"}}"#,
        );
        assert_eq!(
            derive(&no_port).unwrap().listen,
            None,
            "port 0: no public listener"
        );
    }

    #[test]
    fn refuses_what_is_not_a_usable_proxy() {
        let cases = [
            (r#"{"Kind":"","ID":"web"}"#, "not connect-proxy"),
            (
                r#"{"Kind":"connect-proxy","ID":"p","Proxy":{}}"#,
                "DestinationServiceName",
            ),
            (
                r#"{"Kind":"connect-proxy","ID":"p","Port":1,"Proxy":{"DestinationServiceName":"w","Config":{"bind_address":"nope"}}}"#,
                "bind_address",
            ),
            (
                r#"{"Kind":"connect-proxy","ID":"p","Port":1,"Proxy":{"DestinationServiceName":"w"}}"#,
                "LocalServicePort",
            ),
        ];
        for (json, want) in cases {
            let err = derive(&svc(json)).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
    }
}
