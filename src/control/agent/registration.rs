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
//! - local app: `Proxy.LocalServiceSocketPath` (a Unix socket) or else
//!   `Proxy.LocalServiceAddress` (default 127.0.0.1) and
//!   `Proxy.LocalServicePort`;
//! - `Proxy.Config.local_connect_timeout_ms`, `handshake_timeout_ms`,
//!   `max_inbound_connections`, and each upstream's `Config`
//!   (`connect_timeout_ms`, `limits`, `passive_health_check`), read
//!   leniently in both shapes the agent delivers (see [`super::tuning`]) —
//!   the built-in proxy silently ignores `connect_timeout_ms` because JSON
//!   numbers arrive as floats;
//! - `Proxy.Upstreams[]`: name, type (`service`/`prepared_query`),
//!   datacenter, and where to listen: `LocalBindSocketPath` (with
//!   `LocalBindSocketMode`) or `LocalBindAddress` (default 127.0.0.1) and
//!   `LocalBindPort`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::api::{AgentExpose, AgentService};
use super::tuning;
use super::watch::backoff;
use super::WatchPolicy;
use super::{AgentClient, AgentError};
use crate::config::agent::ProxyIdentity;
use crate::config::{BindAddr, Discovery, UnixBind, UpstreamConfig};
use crate::control::{ExposePath, ExposeProtocol, ListenerSet, Publisher};

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

fn ip_or(s: &str, default: IpAddr) -> Result<IpAddr, String> {
    if s.is_empty() {
        return Ok(default);
    }
    s.parse().map_err(|_| format!("{s:?} is not an IP address"))
}

/// `LocalBindSocketPath` and `LocalBindSocketMode` (an octal string, as
/// Consul and Nomad write it: `"0700"`; empty: the umask decides).
fn unix_bind(path: &str, mode: &str) -> Result<BindAddr, String> {
    if !path.starts_with('/') {
        return Err(format!(
            "LocalBindSocketPath {path:?} is not an absolute path"
        ));
    }
    let mode = match mode.trim() {
        "" => None,
        m => match u32::from_str_radix(m, 8) {
            Ok(bits) if bits <= 0o777 => Some(bits),
            _ => {
                return Err(format!(
                    "LocalBindSocketMode {m:?} is not an octal file mode"
                ))
            }
        },
    };
    Ok(BindAddr::Unix(UnixBind {
        path: path.into(),
        mode,
    }))
}

/// `Proxy.Expose.Paths`: each listens on the public listener's IP and its
/// `ListenerPort`. An entry Consul would refuse (no listener or local port,
/// a path not starting with `/`, a protocol other than `http`/`http2`) is
/// noted and skipped. `Expose.Checks` is noted: the agent's HTTP API does
/// not tell a proxy the exposed checks' paths (see the README).
fn expose_paths(expose: &AgentExpose, ip: IpAddr, notes: &mut Vec<String>) -> Vec<ExposePath> {
    if expose.checks {
        notes.push("Proxy.Expose.Checks is not followed: the agent's HTTP API does not give a proxy the checks' URLs (their Definition is empty); list the paths in Proxy.Expose.Paths instead".into());
    }
    let mut out: Vec<ExposePath> = Vec::new();
    for p in &expose.paths {
        let protocol = match p.protocol.as_str() {
            "" | "http" => ExposeProtocol::Http,
            "http2" => ExposeProtocol::Http2,
            other => {
                notes.push(format!(
                    "Proxy.Expose path {:?}: protocol {other:?} is not http or http2; skipped",
                    p.path
                ));
                continue;
            }
        };
        if p.listener_port == 0 || p.local_path_port == 0 || !p.path.starts_with('/') {
            notes.push(format!(
                "Proxy.Expose path {:?}: needs a Path starting with /, a ListenerPort and a LocalPathPort; skipped",
                p.path
            ));
            continue;
        }
        let listen = SocketAddr::new(ip, p.listener_port);
        if out.iter().any(|o| o.listen == listen && o.path == p.path) {
            continue;
        }
        out.push(ExposePath {
            listen,
            path: p.path.clone(),
            local_port: p.local_path_port,
            protocol,
        });
    }
    out
}

/// Derives what the proxy should do from its registration.
pub fn derive(svc: &AgentService) -> Result<ListenerSet, String> {
    derive_noted(svc).map(|(set, _)| set)
}

/// [`derive()`], with notes on settings that are present but could not be
/// used (each keeps its default) or are ignored. A registration is used
/// whole or not at all: notes never stop it, errors always do.
pub fn derive_noted(svc: &AgentService) -> Result<(ListenerSet, Vec<String>), String> {
    let mut notes = Vec::new();
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

    let service_addr = if !proxy.local_service_socket_path.is_empty() {
        let path = &proxy.local_service_socket_path;
        if !path.starts_with('/') {
            return Err(format!(
                "Proxy.LocalServiceSocketPath {path:?} is not an absolute path"
            ));
        }
        format!("unix:{path}")
    } else {
        let app_ip = ip_or(
            &proxy.local_service_address,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        )
        .map_err(|e| format!("Proxy.LocalServiceAddress: {e}"))?;
        if listen.is_some() && proxy.local_service_port == 0 {
            return Err(
                "Proxy.LocalServicePort is 0: no local app to forward inbound connections to"
                    .into(),
            );
        }
        SocketAddr::new(app_ip, proxy.local_service_port).to_string()
    };

    let mut upstreams = Vec::new();
    for u in &proxy.upstreams {
        if u.destination_name.is_empty() {
            tracing::error!("upstream without a DestinationName; skipped");
            continue;
        }
        let bind = if !u.local_bind_socket_path.is_empty() {
            match unix_bind(&u.local_bind_socket_path, &u.local_bind_socket_mode) {
                Ok(b) => b,
                Err(e) => {
                    notes.push(format!(
                        "upstream {}: {e}; upstream skipped",
                        u.destination_name
                    ));
                    continue;
                }
            }
        } else {
            if u.local_bind_port == 0 {
                tracing::error!(upstream = %u.destination_name, "upstream without a LocalBindPort or LocalBindSocketPath; skipped");
                continue;
            }
            match ip_or(&u.local_bind_address, IpAddr::V4(Ipv4Addr::LOCALHOST)) {
                Ok(ip) => BindAddr::Tcp(SocketAddr::new(ip, u.local_bind_port)),
                Err(e) => {
                    tracing::error!(upstream = %u.destination_name, "LocalBindAddress: {e}; upstream skipped");
                    continue;
                }
            }
        };
        let what = format!("upstream {} Config", u.destination_name);
        let tuned = tuning::upstream(&u.config, &what, &mut notes);
        let datacenter = Some(u.datacenter.clone()).filter(|d| !d.is_empty());
        let discovery = if u.destination_type == "prepared_query" {
            Discovery::Query { datacenter }
        } else {
            Discovery::Service { datacenter }
        };
        upstreams.push(UpstreamConfig {
            name: u.destination_name.clone(),
            bind,
            discovery,
            deadline: tuned.deadline,
            max_conns: tuned.max_conns,
            ejection: tuned.ejection,
        });
    }
    let local_connect_timeout = tuning::read(
        cfg,
        "local_connect_timeout_ms",
        "Proxy.Config",
        tuning::millis,
        &mut notes,
    );
    let handshake_timeout = tuning::read(
        cfg,
        "handshake_timeout_ms",
        "Proxy.Config",
        tuning::millis,
        &mut notes,
    );
    // 0 (Envoy: unset) or absent: -max-conns applies.
    let max_inbound_conns = tuning::read(
        cfg,
        "max_inbound_connections",
        "Proxy.Config",
        tuning::count,
        &mut notes,
    )
    .filter(|n| *n > 0)
    .map(|n| n as usize);
    let expose = expose_paths(&proxy.expose, bind_ip, &mut notes);
    let addr_key = |key: &str, notes: &mut Vec<String>| {
        tuning::read(
            cfg,
            key,
            "Proxy.Config",
            |v| {
                v.as_str()
                    .and_then(|s| s.parse::<SocketAddr>().ok())
                    .ok_or_else(|| format!("{v} is not IP:PORT"))
            },
            notes,
        )
    };
    let metrics_bind = addr_key("envoy_prometheus_bind_addr", &mut notes);
    let stats_bind = addr_key("envoy_stats_bind_addr", &mut notes);
    let set = ListenerSet {
        service: proxy.destination_service_name.clone(),
        listen,
        service_addr,
        local_connect_timeout,
        handshake_timeout,
        max_inbound_conns,
        upstreams,
        expose,
        metrics_bind,
        stats_bind,
    };
    Ok((set, notes))
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
    let mut noted: Vec<String> = Vec::new();
    loop {
        let fetched = tokio::select! {
            _ = cancel.cancelled() => return,
            r = fetch(&client, &proxy_id, hash.as_deref(), policy.wait) => r,
        };
        let problem = match fetched {
            Ok((svc, h)) => {
                hash = h;
                match derive_noted(&svc) {
                    Ok((set, notes)) => {
                        if notes != noted {
                            for note in &notes {
                                tracing::warn!(proxy_id = %proxy_id, "proxy registration: {note}");
                            }
                            noted = notes;
                        }
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
                       {"DestinationName":"sock","LocalBindSocketPath":"/tmp/s","LocalBindSocketMode":"0660"},
                       {"DestinationName":"badmode","LocalBindSocketPath":"/tmp/t","LocalBindSocketMode":"rw"},
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
            ["db", "cache", "q", "sock"],
            "port-less upstreams and bad socket modes skipped"
        );
        assert_eq!(
            c.upstreams[3].bind,
            BindAddr::Unix(UnixBind {
                path: "/tmp/s".into(),
                mode: Some(0o660)
            })
        );
        let tcp = |s: &str| BindAddr::Tcp(s.parse().unwrap());
        assert_eq!(c.upstreams[0].bind, tcp("127.0.0.1:18080"));
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
        assert_eq!(c.upstreams[1].bind, tcp("127.0.0.2:18081"));
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
    fn proxy_and_upstream_config_tune_listeners_and_malformed_values_are_noted() {
        let s = svc(r#"{
            "Kind":"connect-proxy","ID":"p","Port":21000,
            "Proxy":{"DestinationServiceName":"api","LocalServicePort":8080,
                     "Config":{"max_inbound_connections":64.0,"local_connect_timeout_ms":"never"},
                     "Upstreams":[
                       {"DestinationName":"db","LocalBindPort":18080,
                        "Config":{"connect_timeout_ms":"1500","limits":{"MaxConnections":2},
                                  "passive_health_check":{"MaxFailures":1,"BaseEjectionTime":5000000000}}},
                       {"DestinationName":"cache","LocalBindPort":18081,"Config":{"limits":{"max_connections":"x"}}}
                     ]}}"#);
        let (c, notes) = derive_noted(&s).unwrap();
        assert_eq!(c.max_inbound_conns, Some(64));
        assert_eq!(c.local_connect_timeout, None, "malformed: default kept");
        let db = &c.upstreams[0];
        assert_eq!(db.deadline, Some(Duration::from_millis(1500)));
        assert_eq!(db.max_conns, Some(2));
        assert_eq!(
            db.ejection,
            Some(crate::proxy::balancer::EjectionPolicy {
                after_failures: 1,
                duration: Duration::from_secs(5)
            })
        );
        assert_eq!(c.upstreams[1].max_conns, None);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("local_connect_timeout_ms")));
        assert!(notes
            .iter()
            .any(|n| n.contains("upstream cache Config.limits.max_connections")));
    }

    #[test]
    fn local_service_socket_path_makes_the_app_a_unix_socket() {
        let s = svc(r#"{"Kind":"connect-proxy","ID":"p","Port":21000,
            "Proxy":{"DestinationServiceName":"web","LocalServiceSocketPath":"/run/web.sock"}}"#);
        assert_eq!(derive(&s).unwrap().service_addr, "unix:/run/web.sock");
    }

    #[test]
    fn expose_paths_listen_on_the_public_ip_and_bad_ones_are_noted() {
        let s = svc(r#"{"Kind":"connect-proxy","ID":"p","Port":21000,
            "Proxy":{"DestinationServiceName":"api","LocalServicePort":8080,
                     "Config":{"bind_address":"127.0.0.1","envoy_prometheus_bind_addr":"0.0.0.0:9102","envoy_stats_bind_addr":"nope"},
                     "Expose":{"Checks":true,"Paths":[
                       {"ListenerPort":21500,"Path":"/health","LocalPathPort":8080,"Protocol":"http"},
                       {"ListenerPort":21501,"Path":"/grpc","LocalPathPort":8081,"Protocol":"http2"},
                       {"ListenerPort":21502,"Path":"/tcp","LocalPathPort":8082,"Protocol":"tcp"},
                       {"ListenerPort":0,"Path":"/noport","LocalPathPort":8083},
                       {"ListenerPort":21504,"Path":"relative","LocalPathPort":8084}
                     ]}}}"#);
        let (c, notes) = derive_noted(&s).unwrap();
        assert_eq!(
            c.expose,
            [
                ExposePath {
                    listen: "127.0.0.1:21500".parse().unwrap(),
                    path: "/health".into(),
                    local_port: 8080,
                    protocol: ExposeProtocol::Http
                },
                ExposePath {
                    listen: "127.0.0.1:21501".parse().unwrap(),
                    path: "/grpc".into(),
                    local_port: 8081,
                    protocol: ExposeProtocol::Http2
                },
            ]
        );
        assert_eq!(c.metrics_bind, Some("0.0.0.0:9102".parse().unwrap()));
        assert_eq!(c.stats_bind, None);
        assert_eq!(
            notes.len(),
            5,
            "Checks, three bad paths, a bad address: {notes:?}"
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
