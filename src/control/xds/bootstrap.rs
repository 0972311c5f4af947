//! The bootstrap file `consul connect envoy -bootstrap` writes (Nomad puts
//! it at `${NOMAD_SECRETS_DIR}/envoy_bootstrap.json`): who we are (`node`),
//! how to reach the agent's xDS server (the `local_agent` cluster and the
//! ADS config with its `x-consul-token`), and the admin and metrics
//! addresses. The file mixes snake_case and lowerCamelCase keys (proto3
//! JSON); both are accepted for every field read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Largest bootstrap file read.
const MAX_BYTES: u64 = 4 << 20;

/// Why a bootstrap cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than {MAX_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: not JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("bootstrap: {0}")]
    Bad(String),
}

/// How to reach the agent's gRPC (xDS) server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    /// A unix socket (Nomad bridge mode: `alloc/tmp/consul_grpc.sock`,
    /// relative to the working directory, as Envoy resolves it).
    Unix(PathBuf),
    /// Plaintext TCP (host networking: `127.0.0.1:8502`).
    Tcp(SocketAddr),
}

/// What ferry takes from the bootstrap.
#[derive(Clone)]
pub struct Bootstrap {
    /// `node.id`: the proxy's service ID, the only thing Consul needs.
    pub node_id: String,
    /// `node.cluster`: the destination service for a sidecar.
    pub node_cluster: String,
    /// `node.metadata`, sent back verbatim.
    pub node_metadata: serde_json::Map<String, Value>,
    pub agent: AgentAddr,
    /// With TLS to the agent: the CA (PEM) its certificate must chain to.
    pub agent_ca: Option<String>,
    /// `x-consul-token`; empty means anonymous. Never logged.
    pub token: String,
    /// `admin.address`.
    pub admin: Option<SocketAddr>,
    /// The `envoy_prometheus_metrics_listener` address, if configured.
    pub prometheus: Option<SocketAddr>,
    /// Static listeners ferry does not serve, by name (warned about).
    pub ignored_listeners: Vec<String>,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("node_id", &self.node_id)
            .field("node_cluster", &self.node_cluster)
            .field("agent", &self.agent)
            .field(
                "token",
                &if self.token.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("admin", &self.admin)
            .field("prometheus", &self.prometheus)
            .finish_non_exhaustive()
    }
}

/// `v[snake]` or `v[camel]`.
fn get<'a>(v: &'a Value, snake: &str) -> Option<&'a Value> {
    if let Some(x) = v.get(snake) {
        return Some(x);
    }
    let mut camel = String::with_capacity(snake.len());
    let mut up = false;
    for c in snake.chars() {
        if c == '_' {
            up = true;
        } else if up {
            camel.extend(c.to_uppercase());
            up = false;
        } else {
            camel.push(c);
        }
    }
    v.get(camel.as_str())
}

fn path<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().try_fold(v, |v, k| get(v, k))
}

/// An array, or a single object where Consul writes one.
fn items(v: Option<&Value>) -> Vec<&Value> {
    match v {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(o @ Value::Object(_)) => vec![o],
        _ => Vec::new(),
    }
}

fn bad(why: impl Into<String>) -> BootstrapError {
    BootstrapError::Bad(why.into())
}

fn socket_address(v: &Value, what: &str) -> Result<SocketAddr, BootstrapError> {
    let ip = get(v, "address")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{what}: socket_address.address missing")))?;
    let port = get(v, "port_value")
        .and_then(|p| {
            p.as_u64()
                .or_else(|| p.as_str().and_then(|s| s.parse().ok()))
        })
        .ok_or_else(|| bad(format!("{what}: socket_address.port_value missing")))?;
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| bad(format!("{what}: {ip:?} is not an IP address")))?;
    let port = u16::try_from(port).map_err(|_| bad(format!("{what}: port {port} out of range")))?;
    Ok(SocketAddr::new(ip, port))
}

/// The CA of the agent cluster's `UpstreamTlsContext`: inline PEM (newer
/// Consul) or a file (older).
fn agent_ca(ts: &Value, cluster: &str) -> Result<String, BootstrapError> {
    let ca = path(
        ts,
        &[
            "typed_config",
            "common_tls_context",
            "validation_context",
            "trusted_ca",
        ],
    )
    .ok_or_else(|| {
        bad(format!(
            "cluster {cluster}: TLS without validation_context.trusted_ca"
        ))
    })?;
    if let Some(pem) = get(ca, "inline_string").and_then(Value::as_str) {
        return Ok(pem.to_string());
    }
    if let Some(file) = get(ca, "filename").and_then(Value::as_str) {
        return std::fs::read_to_string(file)
            .map_err(|e| bad(format!("cluster {cluster}: trusted_ca {file}: {e}")));
    }
    Err(bad(format!(
        "cluster {cluster}: trusted_ca is neither inline_string nor filename"
    )))
}

impl Bootstrap {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Bootstrap, BootstrapError> {
        let read = |source| BootstrapError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_BYTES {
            return Err(BootstrapError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let v: Value = serde_json::from_str(&text).map_err(|source| BootstrapError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Bootstrap::parse(&v)
    }

    /// Checks a parsed bootstrap.
    pub fn parse(v: &Value) -> Result<Bootstrap, BootstrapError> {
        let node = get(v, "node").ok_or_else(|| bad("no node"))?;
        let node_id = get(node, "id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("node.id missing"))?
            .to_string();
        let node_cluster = get(node, "cluster")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let node_metadata = get(node, "metadata")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();

        let ads = path(v, &["dynamic_resources", "ads_config"])
            .ok_or_else(|| bad("dynamic_resources.ads_config missing"))?;
        match get(ads, "api_type").and_then(Value::as_str) {
            Some("DELTA_GRPC") => {}
            Some("GRPC") => tracing::warn!("bootstrap asks for state-of-the-world ADS (api_type GRPC); Consul only serves Delta ADS, which ferry uses"),
            other => return Err(bad(format!("ads_config.api_type {other:?}: expected DELTA_GRPC"))),
        }
        let services = items(get(ads, "grpc_services"));
        let [service] = services.as_slice() else {
            return Err(bad("ads_config.grpc_services: expected exactly one"));
        };
        let cluster_name = path(service, &["envoy_grpc", "cluster_name"])
            .and_then(Value::as_str)
            .ok_or_else(|| bad("ads_config.grpc_services.envoy_grpc.cluster_name missing"))?;
        let mut token = String::new();
        for m in items(get(service, "initial_metadata")) {
            if get(m, "key").and_then(Value::as_str) == Some("x-consul-token") {
                token = get(m, "value")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
            }
        }

        let statics = get(v, "static_resources");
        let clusters = items(statics.and_then(|s| get(s, "clusters")));
        let agent_cluster = clusters
            .iter()
            .find(|c| get(c, "name").and_then(Value::as_str) == Some(cluster_name))
            .ok_or_else(|| {
                bad(format!(
                    "static cluster {cluster_name:?} (the agent) missing"
                ))
            })?;
        let agent_ca = match get(agent_cluster, "transport_socket") {
            None => None,
            Some(ts) => Some(agent_ca(ts, cluster_name)?),
        };
        let hosts: Vec<&Value> = items(path(agent_cluster, &["load_assignment", "endpoints"]))
            .into_iter()
            .flat_map(|e| items(get(e, "lb_endpoints")))
            .collect();
        let [host] = hosts.as_slice() else {
            return Err(bad(format!(
                "cluster {cluster_name}: expected exactly one endpoint"
            )));
        };
        let addr = path(host, &["endpoint", "address"])
            .ok_or_else(|| bad(format!("cluster {cluster_name}: endpoint address missing")))?;
        let agent = if let Some(pipe) = get(addr, "pipe") {
            let p = get(pipe, "path")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("cluster {cluster_name}: pipe.path missing")))?;
            AgentAddr::Unix(PathBuf::from(p))
        } else if let Some(sa) = get(addr, "socket_address") {
            AgentAddr::Tcp(socket_address(sa, cluster_name)?)
        } else {
            return Err(bad(format!(
                "cluster {cluster_name}: no pipe or socket_address"
            )));
        };

        let admin = match path(v, &["admin", "address", "socket_address"]) {
            Some(sa) => Some(socket_address(sa, "admin")?),
            None => None,
        };
        let mut prometheus = None;
        let mut ignored_listeners = Vec::new();
        for l in items(statics.and_then(|s| get(s, "listeners"))) {
            let name = get(l, "name").and_then(Value::as_str).unwrap_or_default();
            match (name, path(l, &["address", "socket_address"])) {
                ("envoy_prometheus_metrics_listener", Some(sa)) => {
                    prometheus = Some(socket_address(sa, name)?)
                }
                _ => ignored_listeners.push(name.to_string()),
            }
        }
        Ok(Bootstrap {
            node_id,
            node_cluster,
            node_metadata,
            agent,
            agent_ca,
            token,
            admin,
            prometheus,
            ignored_listeners,
        })
    }

    /// The service this proxy represents: `node.cluster` (a sidecar's
    /// destination service), else the node ID.
    pub fn service(&self) -> &str {
        if self.node_cluster.is_empty() {
            &self.node_id
        } else {
            &self.node_cluster
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of Consul's bootstrap for a Nomad bridge-mode sidecar:
    /// mixed key styles, `grpc_services` as one object, a relative pipe.
    fn nomad_bridge() -> Value {
        serde_json::json!({
            "admin": {"access_log_path": "/dev/null",
                      "address": {"socket_address": {"address": "127.0.0.2", "port_value": 19001}}},
            "node": {"cluster": "web", "id": "_nomad-task-1-group-api-web-http-sidecar-proxy",
                     "metadata": {"namespace": "default", "partition": "default"}},
            "static_resources": {"clusters": [{
                "name": "local_agent", "type": "STATIC", "connect_timeout": "1s",
                "http2_protocol_options": {},
                "loadAssignment": {"clusterName": "local_agent", "endpoints": [{"lbEndpoints": [
                    {"endpoint": {"address": {"pipe": {"path": "alloc/tmp/consul_grpc.sock"}}}}]}]}}]},
            "dynamic_resources": {
                "lds_config": {"ads": {}, "resource_api_version": "V3"},
                "cds_config": {"ads": {}, "resource_api_version": "V3"},
                "ads_config": {"api_type": "DELTA_GRPC", "transport_api_version": "V3",
                    "grpc_services": {"initial_metadata": [{"key": "x-consul-token", "value": "secret-token"}],
                                      "envoy_grpc": {"cluster_name": "local_agent"}}}}
        })
    }

    #[test]
    fn reads_nomads_bridge_mode_bootstrap() {
        let b = Bootstrap::parse(&nomad_bridge()).unwrap();
        assert_eq!(b.node_id, "_nomad-task-1-group-api-web-http-sidecar-proxy");
        assert_eq!(b.service(), "web");
        assert_eq!(
            b.agent,
            AgentAddr::Unix("alloc/tmp/consul_grpc.sock".into())
        );
        assert_eq!(b.token, "secret-token");
        assert_eq!(b.admin, Some("127.0.0.2:19001".parse().unwrap()));
        assert!(
            !format!("{b:?}").contains("secret-token"),
            "token never printed"
        );
    }

    #[test]
    fn reads_tcp_agents_and_refuses_what_it_cannot_use() {
        let mut v = nomad_bridge();
        v["static_resources"]["clusters"][0]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]
            ["endpoint"]["address"] =
            serde_json::json!({"socket_address": {"address": "127.0.0.1", "port_value": 8502}});
        let b = Bootstrap::parse(&v).unwrap();
        assert_eq!(b.agent, AgentAddr::Tcp("127.0.0.1:8502".parse().unwrap()));

        let mut tls = v.clone();
        tls["static_resources"]["clusters"][0]["transport_socket"] = serde_json::json!({"name": "tls",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
              "common_tls_context": {"validation_context": {"trusted_ca": {"inline_string": "PEM"}}}}});
        assert_eq!(
            Bootstrap::parse(&tls).unwrap().agent_ca.as_deref(),
            Some("PEM")
        );
        tls["static_resources"]["clusters"][0]["transport_socket"] =
            serde_json::json!({"name": "tls"});
        assert!(Bootstrap::parse(&tls)
            .unwrap_err()
            .to_string()
            .contains("trusted_ca"));

        let mut sotw = v.clone();
        sotw["dynamic_resources"]["ads_config"]["api_type"] = "REST".into();
        assert!(Bootstrap::parse(&sotw).is_err());
    }
}
