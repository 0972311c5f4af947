//! Envoy resources → ferry snapshots, as pure functions.
//!
//! Two steps. [`listener()`], [`cluster()`], [`endpoints()`] and [`secret()`]
//! decode and check one resource each: anything outside the L4 subset
//! Consul emits for `protocol = "tcp"` is an error naming the resource and
//! field, and the whole response carrying it is refused (NACK). [`Held::assemble`]
//! then joins the held resources (listener → cluster → endpoints, secrets)
//! into one [`Assembled`] view; a reference not yet received is
//! [`Assembly::Warming`] (keep serving the last complete view), never half
//! a view.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::extensions::clusters::aggregate::v3::ClusterConfig as AggregateConfig;
use envoy_types::pb::envoy::extensions::filters::network::connection_limit::v3::ConnectionLimit;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, secret, DownstreamTlsContext, Secret, UpstreamTlsContext,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use rustls::pki_types::ServerName;

use super::{CDS, EDS, LDS, SDS};
use crate::authz::rbac::RbacChain;
use crate::config::BindAddr;
use crate::proxy::balancer::EjectionPolicy;
use crate::proxy::net::LocalApp;

mod addr;
mod assemble;
mod rbac;
mod tls;

use addr::{address, ip_addr, Addr};
pub use assemble::{Assembled, Assembly, Held, Instances};
use rbac::rbac_filter;
use tls::{certs, inline, san_matchers, transport};

const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const RBAC: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const CONNECTION_LIMIT: &str =
    "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit";
const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const AGGREGATE: &str = "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig";

/// The cluster Consul names for the local app.
pub const LOCAL_APP: &str = "local_app";

/// Certificates as a listener or cluster gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Certs {
    /// In the resource itself.
    Inline {
        chain: String,
        key: String,
        roots: String,
    },
    /// By SDS secret names (Consul: `connect-leaf`, `connect-root`).
    Sds { leaf: String, roots: String },
}

/// A listener ferry serves.
#[derive(Debug, Clone)]
pub enum ListenerSpec {
    /// The public mTLS listener → the local app.
    Public {
        addr: SocketAddr,
        certs: Certs,
        rbac: RbacChain,
        cluster: String,
        /// `connection_limit` filters (Consul's `max_inbound_connections`):
        /// the smallest of their `max_connections`.
        conn_limit: Option<usize>,
    },
    /// A plaintext upstream listener → a cluster: on TCP, or on a Unix
    /// socket file (`local_bind_socket_path`, sent as a `pipe`).
    Upstream {
        id: String,
        bind: BindAddr,
        cluster: String,
    },
}

/// How a cluster's hosts are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterKind {
    /// One inline host: the local app, on TCP or on a Unix socket
    /// (`local_service_socket_path`, sent as a `pipe`).
    Static(LocalApp),
    /// Endpoints by EDS under the cluster's name.
    Eds,
    /// Failover legs, in order (an aggregate cluster).
    Aggregate(Vec<String>),
}

/// Upstream TLS of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    pub sni: String,
    /// Exact SPIFFE URIs the server may present (any one).
    pub sans: Vec<String>,
    pub certs: Certs,
}

/// A checked cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    pub kind: ClusterKind,
    pub connect_timeout: Option<Duration>,
    pub max_conns: Option<usize>,
    pub ejection: Option<EjectionPolicy>,
    pub tls: Option<UpstreamTls>,
}

/// A checked load assignment: usable (HEALTHY or UNKNOWN) hosts by
/// priority, lowest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointsSpec(pub BTreeMap<u32, Vec<SocketAddr>>);

/// A checked SDS secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSpec {
    Leaf { chain: String, key: String },
    Roots(String),
}

/// A resource ferry cannot apply exactly; the text is the NACK reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refuse<T>(what: &str, why: impl std::fmt::Display) -> Result<T, Refused> {
    Err(Refused(format!("{what}: {why}")))
}

fn decode<M: Message + Default>(any: &Any, want: &str, what: &str) -> Result<M, Refused> {
    if any.type_url != want {
        return refuse(what, format_args!("expected {want}, got {}", any.type_url));
    }
    M::decode(any.value.as_slice()).or_else(|e| refuse(what, format_args!("cannot decode: {e}")))
}

fn duration(d: &Option<envoy_types::pb::google::protobuf::Duration>) -> Option<Duration> {
    d.as_ref().map(|d| {
        Duration::from_secs(d.seconds.max(0) as u64) + Duration::from_nanos(d.nanos.max(0) as u64)
    })
}

/// Decodes and checks one listener.
pub fn listener(any: &Any) -> Result<(String, ListenerSpec), Refused> {
    let l: Listener = decode(any, LDS, "listener")?;
    let what = format!("listener {}", l.name);
    if l.name.starts_with("outbound_listener:") || l.use_original_dst.is_some_and(|b| b.value) {
        return refuse(&what, "transparent proxy is not supported");
    }
    if !l.listener_filters.is_empty() {
        return refuse(&what, "listener filters are not supported");
    }
    if l.default_filter_chain.is_some() || l.filter_chain_matcher.is_some() {
        return refuse(&what, "filter chain selection is not supported");
    }
    let addr = address(&l.address, &what)?;
    let [chain] = l.filter_chains.as_slice() else {
        return refuse(
            &what,
            format_args!(
                "{} filter chains (ferry serves exactly one)",
                l.filter_chains.len()
            ),
        );
    };
    if chain.filter_chain_match.is_some() {
        return refuse(&what, "filter_chain_match is not supported");
    }
    let mut rbac = Vec::new();
    let mut cluster = None;
    let mut conn_limit: Option<usize> = None;
    for f in &chain.filters {
        let fwhat = format!("{what} filter {}", f.name);
        let Some(filter::ConfigType::TypedConfig(tc)) = &f.config_type else {
            return refuse(&fwhat, "no typed_config");
        };
        if cluster.is_some() {
            return refuse(&fwhat, "tcp_proxy must be the last filter");
        }
        match tc.type_url.as_str() {
            RBAC => rbac.push(rbac_filter(&decode(tc, RBAC, &fwhat)?, &fwhat)?),
            CONNECTION_LIMIT => {
                let max = connection_limit(&decode(tc, CONNECTION_LIMIT, &fwhat)?, &fwhat)?;
                conn_limit = Some(conn_limit.map_or(max, |m| m.min(max)));
            }
            TCP_PROXY => {
                let t: TcpProxy = decode(tc, TCP_PROXY, &fwhat)?;
                match t.cluster_specifier {
                    Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => cluster = Some(c),
                    _ => {
                        return refuse(&fwhat, "weighted clusters (L7 splitting) are not supported")
                    }
                }
            }
            HCM => {
                return refuse(
                    &fwhat,
                    "HTTP (http_connection_manager) is not supported: ferry is L4 only",
                )
            }
            other => return refuse(&fwhat, format_args!("unknown filter type {other}")),
        }
    }
    let Some(cluster) = cluster else {
        return refuse(&what, "no tcp_proxy filter");
    };
    let spec = match &chain.transport_socket {
        Some(ts) => {
            let ctx: DownstreamTlsContext = transport(ts, DOWNSTREAM_TLS, &what)?;
            if !ctx.require_client_certificate.is_some_and(|b| b.value) {
                return refuse(&what, "require_client_certificate must be true");
            }
            let Some(common) = &ctx.common_tls_context else {
                return refuse(&what, "no common_tls_context");
            };
            let certs = certs(common, &what)?;
            let Addr::Ip(addr) = addr else {
                return refuse(
                    &what,
                    "unix socket address refused: the public listener takes mesh connections from other hosts, which dial an IP and port",
                );
            };
            ListenerSpec::Public {
                addr,
                certs,
                rbac: RbacChain(rbac),
                cluster,
                conn_limit,
            }
        }
        None => {
            if !rbac.is_empty() {
                return refuse(&what, "RBAC on a plaintext listener is not supported");
            }
            if conn_limit.is_some() {
                return refuse(
                    &what,
                    "connection_limit on a plaintext listener is not supported (the cluster's circuit breaker caps an upstream)",
                );
            }
            let bind = match addr {
                Addr::Ip(a) => BindAddr::Tcp(a),
                Addr::Pipe(u) => BindAddr::Unix(u),
            };
            ListenerSpec::Upstream {
                id: upstream_id(&l.name, &bind),
                bind,
                cluster,
            }
        }
    };
    Ok((l.name, spec))
}

/// A `connection_limit` filter's cap. Consul sets only `max_connections`;
/// a `delay` before closing, or a runtime switch, has no equivalent.
fn connection_limit(c: &ConnectionLimit, what: &str) -> Result<usize, Refused> {
    if c.delay
        .as_ref()
        .is_some_and(|d| d.seconds != 0 || d.nanos != 0)
    {
        return refuse(what, "a delay before closing is not supported");
    }
    if c.runtime_enabled.is_some() {
        return refuse(what, "runtime_enabled is not supported");
    }
    match c.max_connections.map(|m| m.value) {
        Some(n) if n > 0 => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        _ => refuse(what, "max_connections must be at least 1"),
    }
}

/// `db:127.0.0.1:9191` → `db`, and for a socket (Consul names it
/// `<id>:<path>`) `db:/run/db.sock` → `db`; a name without the address
/// suffix is kept.
fn upstream_id(name: &str, bind: &BindAddr) -> String {
    if let BindAddr::Unix(u) = bind {
        return u
            .path
            .to_str()
            .and_then(|p| name.strip_suffix(p))
            .and_then(|rest| rest.strip_suffix(':'))
            .filter(|id| !id.is_empty())
            .unwrap_or(name)
            .to_string();
    }
    let mut parts = name.rsplitn(3, ':');
    let (port, ip, rest) = (parts.next(), parts.next(), parts.next());
    match (port, ip, rest) {
        (Some(p), Some(ip), Some(rest))
            if p.parse::<u16>().is_ok() && ip.parse::<std::net::IpAddr>().is_ok() =>
        {
            rest.to_string()
        }
        _ => name.to_string(),
    }
}

/// Decodes and checks one cluster.
pub fn cluster(any: &Any) -> Result<(String, ClusterSpec), Refused> {
    let c: Cluster = decode(any, CDS, "cluster")?;
    let what = format!("cluster {}", c.name);
    let kind = match &c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::ClusterType(t)) => match &t.typed_config {
            Some(tc) if tc.type_url == AGGREGATE => {
                let a: AggregateConfig = decode(tc, AGGREGATE, &what)?;
                if a.clusters.is_empty() {
                    return refuse(&what, "aggregate cluster without clusters");
                }
                ClusterKind::Aggregate(a.clusters)
            }
            _ => {
                return refuse(
                    &what,
                    format_args!("cluster type {} is not supported", t.name),
                )
            }
        },
        Some(cluster::ClusterDiscoveryType::Type(t)) => {
            match cluster::DiscoveryType::try_from(*t) {
                Ok(cluster::DiscoveryType::Eds) => ClusterKind::Eds,
                Ok(cluster::DiscoveryType::Static) => {
                    let hosts: Vec<_> = c
                        .load_assignment
                        .iter()
                        .flat_map(|la| &la.endpoints)
                        .flat_map(|e| &e.lb_endpoints)
                        .collect();
                    let [host] = hosts.as_slice() else {
                        return refuse(&what, "a static cluster must have exactly one host");
                    };
                    let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &host.host_identifier
                    else {
                        return refuse(&what, "no endpoint address");
                    };
                    // A pipe's mode only matters to whoever binds it (the
                    // app); dialing ignores it, as Envoy does.
                    ClusterKind::Static(match address(&e.address, &what)? {
                        Addr::Ip(a) => LocalApp::Tcp(a.to_string()),
                        Addr::Pipe(u) => LocalApp::Unix(u.path),
                    })
                }
                Ok(other) => {
                    return refuse(
                        &what,
                        format_args!(
                            "discovery type {} is not supported (EDS, STATIC or aggregate only)",
                            other.as_str_name()
                        ),
                    )
                }
                Err(_) => return refuse(&what, "unknown discovery type"),
            }
        }
        None => ClusterKind::Eds,
    };
    let max_conns = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.first())
        .and_then(|t| t.max_connections)
        .map(|v| v.value as usize);
    let ejection = c.outlier_detection.as_ref().map(|o| EjectionPolicy {
        // Envoy's defaults: 5 consecutive failures, 30 s base ejection.
        after_failures: o.consecutive_5xx.map_or(5, |v| v.value),
        duration: duration(&o.base_ejection_time).unwrap_or(Duration::from_secs(30)),
    });
    let tls = match &c.transport_socket {
        Some(ts) => {
            let ctx: UpstreamTlsContext = transport(ts, UPSTREAM_TLS, &what)?;
            let Some(common) = &ctx.common_tls_context else {
                return refuse(&what, "no common_tls_context");
            };
            let certs = certs(common, &what)?;
            let sans = match &common.validation_context_type {
                Some(common_tls_context::ValidationContextType::ValidationContext(v)) => {
                    san_matchers(v, &what)?
                }
                // Roots by SDS, the SAN matchers in the resource.
                Some(common_tls_context::ValidationContextType::CombinedValidationContext(cv)) => {
                    match &cv.default_validation_context {
                        Some(v) => san_matchers(v, &what)?,
                        None => Vec::new(),
                    }
                }
                _ => Vec::new(),
            };
            if sans.is_empty() {
                return refuse(&what, "upstream TLS without a SAN matcher (ferry always verifies the server's identity)");
            }
            if ServerName::try_from(ctx.sni.clone()).is_err() {
                return refuse(&what, format_args!("sni {:?} is not a DNS name", ctx.sni));
            }
            Some(UpstreamTls {
                sni: ctx.sni,
                sans,
                certs,
            })
        }
        None => None,
    };
    if tls.is_some() && matches!(kind, ClusterKind::Static(LocalApp::Unix(_))) {
        return refuse(
            &what,
            "unix socket address refused with upstream TLS: a socket file only reaches an app on this host, which ferry dials in plaintext",
        );
    }
    if tls.is_none() && kind == ClusterKind::Eds {
        return refuse(
            &what,
            "an EDS cluster without upstream TLS is not a mesh upstream",
        );
    }
    Ok((
        c.name,
        ClusterSpec {
            kind,
            connect_timeout: duration(&c.connect_timeout),
            max_conns,
            ejection,
            tls,
        },
    ))
}

/// Decodes and checks one load assignment.
pub fn endpoints(any: &Any) -> Result<(String, EndpointsSpec), Refused> {
    use envoy_types::pb::envoy::config::core::v3::HealthStatus;
    let cla: ClusterLoadAssignment = decode(any, EDS, "endpoints")?;
    let what = format!("endpoints {}", cla.cluster_name);
    let mut by_priority: BTreeMap<u32, Vec<SocketAddr>> = BTreeMap::new();
    for group in &cla.endpoints {
        for e in &group.lb_endpoints {
            let usable = matches!(
                HealthStatus::try_from(e.health_status),
                Ok(HealthStatus::Healthy | HealthStatus::Unknown)
            );
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return refuse(&what, "named endpoints are not supported");
            };
            let addr = ip_addr(
                &ep.address,
                &what,
                "upstream instances are other sidecars' public listeners, dialed by IP and port",
            )?;
            let hosts = by_priority.entry(group.priority).or_default();
            if usable {
                hosts.push(addr);
            }
        }
    }
    Ok((cla.cluster_name, EndpointsSpec(by_priority)))
}

/// Decodes and checks one secret.
pub fn secret(any: &Any) -> Result<(String, SecretSpec), Refused> {
    let s: Secret = decode(any, SDS, "secret")?;
    let what = format!("secret {}", s.name);
    let spec = match &s.r#type {
        Some(secret::Type::TlsCertificate(c)) => SecretSpec::Leaf {
            chain: inline(&c.certificate_chain, &format!("{what} certificate_chain"))?,
            key: inline(&c.private_key, &format!("{what} private_key"))?,
        },
        Some(secret::Type::ValidationContext(v)) => {
            SecretSpec::Roots(inline(&v.trusted_ca, &format!("{what} trusted_ca"))?)
        }
        _ => {
            return refuse(
                &what,
                "only TLS certificates and validation contexts are supported",
            )
        }
    };
    Ok((s.name, spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{
        address, data_source, socket_address, Address, DataSource, Pipe, TransportSocket,
    };
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        CertificateValidationContext, CommonTlsContext,
    };
    use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;

    use crate::config::UnixBind;

    fn any_of<M: Message + prost::Name>(m: &M) -> Any {
        Any {
            type_url: M::type_url(),
            value: m.encode_to_vec(),
        }
    }

    fn addr() -> Option<Address> {
        Some(Address {
            address: Some(address::Address::SocketAddress(
                envoy_types::pb::envoy::config::core::v3::SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(9191)),
                    ..Default::default()
                },
            )),
        })
    }

    fn listener_with(name: &str, filter: Any) -> Any {
        any_of(&Listener {
            name: name.into(),
            address: addr(),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "f".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(filter)),
                }],
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn tcp(cluster: &str) -> Any {
        any_of(&TcpProxy {
            stat_prefix: "s".into(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        })
    }

    #[test]
    fn an_upstream_listener_names_its_cluster() {
        let (name, spec) = listener(&listener_with("db:127.0.0.1:9191", tcp("db.c"))).unwrap();
        assert_eq!(name, "db:127.0.0.1:9191");
        assert!(
            matches!(spec, ListenerSpec::Upstream { ref id, ref cluster, .. } if id == "db" && cluster == "db.c")
        );
    }

    #[test]
    fn l7_transparent_proxy_and_unknown_filters_are_refused_with_a_reason() {
        let hcm = Any {
            type_url: HCM.into(),
            value: Vec::new(),
        };
        let e = listener(&listener_with("web:127.0.0.1:1", hcm)).unwrap_err();
        assert!(e.0.contains("http_connection_manager"), "{e}");
        let e = listener(&listener_with(
            "outbound_listener:127.0.0.1:15001",
            tcp("x"),
        ))
        .unwrap_err();
        assert!(e.0.contains("transparent proxy"), "{e}");
        let odd = Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.network.ext_authz.v3.ExtAuthz"
                .into(),
            value: Vec::new(),
        };
        let e = listener(&listener_with("x:127.0.0.1:1", odd)).unwrap_err();
        assert!(e.0.contains("unknown filter type"), "{e}");
        let wrong = Any {
            type_url: CDS_URL.into(),
            value: Vec::new(),
        };
        assert!(listener(&wrong).unwrap_err().0.contains("expected"));
    }

    const CDS_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

    #[test]
    fn dns_clusters_and_eds_clusters_without_tls_are_refused() {
        let dns = any_of(&Cluster {
            name: "term".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::StrictDns as i32,
            )),
            ..Default::default()
        });
        assert!(cluster(&dns).unwrap_err().0.contains("STRICT_DNS"));
        let plain = any_of(&Cluster {
            name: "db".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            )),
            ..Default::default()
        });
        assert!(cluster(&plain)
            .unwrap_err()
            .0
            .contains("without upstream TLS"));
    }

    #[test]
    fn only_healthy_or_unknown_hosts_are_used_grouped_by_priority() {
        use envoy_types::pb::envoy::config::endpoint::v3::{
            Endpoint, LbEndpoint, LocalityLbEndpoints,
        };
        let host = |health| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: addr(),
                ..Default::default()
            })),
            health_status: health,
            ..Default::default()
        };
        let cla = any_of(&ClusterLoadAssignment {
            cluster_name: "db".into(),
            endpoints: vec![
                LocalityLbEndpoints {
                    lb_endpoints: vec![host(2), host(3)],
                    ..Default::default()
                },
                LocalityLbEndpoints {
                    priority: 1,
                    lb_endpoints: vec![host(0), host(1)],
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        let (_, e) = endpoints(&cla).unwrap();
        assert_eq!(e.0[&0].len(), 0, "UNHEALTHY and DRAINING are not used");
        assert_eq!(e.0[&1].len(), 2, "UNKNOWN and HEALTHY are");
    }

    #[test]
    fn upstream_ids_drop_the_address_suffix_only() {
        let tcp = BindAddr::Tcp("127.0.0.1:9191".parse().unwrap());
        assert_eq!(upstream_id("db:127.0.0.1:9191", &tcp), "db");
        assert_eq!(
            upstream_id("prepared_query:geo:127.0.0.1:9192", &tcp),
            "prepared_query:geo"
        );
        assert_eq!(upstream_id("db", &tcp), "db");
        assert_eq!(upstream_id("a:b:c", &tcp), "a:b:c");
        let sock = BindAddr::Unix(UnixBind {
            path: "/tmp/service-mesh/db".into(),
            mode: None,
        });
        assert_eq!(upstream_id("db:/tmp/service-mesh/db", &sock), "db");
        assert_eq!(
            upstream_id("prepared_query:geo:/tmp/service-mesh/db", &sock),
            "prepared_query:geo"
        );
        assert_eq!(upstream_id("db", &sock), "db", "no suffix: kept");
        assert_eq!(
            upstream_id(":/tmp/service-mesh/db", &sock),
            ":/tmp/service-mesh/db"
        );
    }

    fn pipe_addr(path: &str, mode: u32) -> Option<Address> {
        Some(Address {
            address: Some(address::Address::Pipe(Pipe {
                path: path.into(),
                mode,
            })),
        })
    }

    fn pipe_listener(name: &str, path: &str, mode: u32) -> Any {
        let Ok(mut l) = Listener::decode(listener_with(name, tcp("db.c")).value.as_slice()) else {
            panic!("decode");
        };
        l.address = pipe_addr(path, mode);
        any_of(&l)
    }

    /// `listeners/listener-unix-domain-socket.latest.golden`: Consul's
    /// `local_bind_socket_mode = "0640"` arrives as mode 416.
    #[test]
    fn an_upstream_listener_on_a_pipe_binds_the_socket_with_its_mode() {
        let name = "db:/tmp/service-mesh/client-1/grpc-employee-server";
        let (_, spec) = listener(&pipe_listener(
            name,
            "/tmp/service-mesh/client-1/grpc-employee-server",
            416,
        ))
        .unwrap();
        let ListenerSpec::Upstream { id, bind, cluster } = spec else {
            panic!("an upstream listener: {spec:?}");
        };
        assert_eq!((id.as_str(), cluster.as_str()), ("db", "db.c"));
        assert_eq!(
            bind,
            BindAddr::Unix(UnixBind {
                path: "/tmp/service-mesh/client-1/grpc-employee-server".into(),
                mode: Some(0o640),
            })
        );
        let (_, spec) = listener(&pipe_listener("db:/run/db.sock", "/run/db.sock", 0)).unwrap();
        assert!(
            matches!(
                spec,
                ListenerSpec::Upstream {
                    bind: BindAddr::Unix(UnixBind { mode: None, .. }),
                    ..
                }
            ),
            "mode 0: the umask decides: {spec:?}"
        );
    }

    #[test]
    fn a_pipe_without_an_absolute_path_or_with_a_bad_mode_is_refused_with_a_reason() {
        for (path, mode, why) in [
            ("", 0, "empty path"),
            ("alloc/tmp/db.sock", 0, "not absolute"),
            ("@db", 0, "abstract"),
            ("/run/db.sock", 0o1777, "not a file mode"),
        ] {
            let e = listener(&pipe_listener("db:x", path, mode)).unwrap_err();
            assert!(
                e.0.contains(why) && e.0.contains("listener db:x"),
                "{path:?}: {e}"
            );
        }
    }

    #[test]
    fn the_local_app_may_be_a_pipe_but_upstream_instances_may_not() {
        use envoy_types::pb::envoy::config::endpoint::v3::{
            Endpoint, LbEndpoint, LocalityLbEndpoints,
        };
        let host = LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: pipe_addr("/tmp/downstream_proxy.sock", 0),
                ..Default::default()
            })),
            ..Default::default()
        };
        let la = ClusterLoadAssignment {
            cluster_name: LOCAL_APP.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![host],
                ..Default::default()
            }],
            ..Default::default()
        };
        // `clusters/downstream-service-with-unix-sockets.latest.golden`.
        let app = any_of(&Cluster {
            name: LOCAL_APP.into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32,
            )),
            load_assignment: Some(la.clone()),
            ..Default::default()
        });
        let (_, spec) = cluster(&app).unwrap();
        assert_eq!(
            spec.kind,
            ClusterKind::Static(LocalApp::Unix("/tmp/downstream_proxy.sock".into()))
        );
        // The same host behind upstream TLS would be a mesh upstream on a
        // socket: refused.
        let Ok(mut tls) = Cluster::decode(app.value.as_slice()) else {
            panic!("decode");
        };
        tls.transport_socket = Some(upstream_tls());
        let e = cluster(&any_of(&tls)).unwrap_err();
        assert!(
            e.0.contains("unix socket address refused with upstream TLS"),
            "{e}"
        );
        let e = endpoints(&any_of(&ClusterLoadAssignment {
            cluster_name: "db".into(),
            ..la
        }))
        .unwrap_err();
        assert!(
            e.0.contains("endpoints db: unix socket address refused"),
            "{e}"
        );
    }

    /// Upstream TLS as Consul sends it: inline leaf and roots, an exact SAN.
    fn upstream_tls() -> TransportSocket {
        use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
            CertificateValidationContext, SubjectAltNameMatcher, TlsCertificate,
        };
        use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher;
        let inline = |s: &str| {
            Some(DataSource {
                specifier: Some(data_source::Specifier::InlineString(s.into())),
                ..Default::default()
            })
        };
        let ctx = UpstreamTlsContext {
            sni: "db.default.dc1.internal.example".into(),
            common_tls_context: Some(CommonTlsContext {
                tls_certificates: vec![TlsCertificate {
                    certificate_chain: inline("chain"),
                    private_key: inline("key"),
                    ..Default::default()
                }],
                validation_context_type: Some(
                    common_tls_context::ValidationContextType::ValidationContext(
                        CertificateValidationContext {
                            trusted_ca: inline("roots"),
                            match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                                matcher: Some(StringMatcher {
                                    match_pattern: Some(string_matcher::MatchPattern::Exact(
                                        "spiffe://example/ns/default/dc/dc1/svc/db".into(),
                                    )),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }],
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        TransportSocket {
            name: "tls".into(),
            config_type: Some(ConfigType::TypedConfig(any_of(&ctx))),
        }
    }

    #[test]
    fn a_public_listener_on_a_pipe_is_refused_with_a_reason() {
        let public = public_with(vec![tcp(LOCAL_APP)]);
        let Ok(mut l) = Listener::decode(public.value.as_slice()) else {
            panic!("decode");
        };
        l.address = pipe_addr("/run/public.sock", 0);
        let e = listener(&any_of(&l)).unwrap_err();
        assert!(
            e.0.contains("unix socket address refused: the public listener"),
            "{e}"
        );
    }

    /// A public listener on TCP with SDS certificates and these filters.
    fn public_with(filters: Vec<Any>) -> Any {
        use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig;
        use envoy_types::pb::google::protobuf::BoolValue;
        let sds = |name: &str| SdsSecretConfig {
            name: name.into(),
            ..Default::default()
        };
        let ctx = DownstreamTlsContext {
            require_client_certificate: Some(BoolValue { value: true }),
            common_tls_context: Some(CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![sds("connect-leaf")],
                validation_context_type: Some(
                    common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(
                        sds("connect-root"),
                    ),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let public = listener_with("public_listener:127.0.0.1:9191", tcp(LOCAL_APP));
        let Ok(mut l) = Listener::decode(public.value.as_slice()) else {
            panic!("decode");
        };
        l.filter_chains[0].filters = filters
            .into_iter()
            .map(|a| Filter {
                name: "f".into(),
                config_type: Some(filter::ConfigType::TypedConfig(a)),
            })
            .collect();
        l.filter_chains[0].transport_socket = Some(TransportSocket {
            name: "tls".into(),
            config_type: Some(ConfigType::TypedConfig(any_of(&ctx))),
        });
        any_of(&l)
    }

    fn limit(max: u64) -> ConnectionLimit {
        ConnectionLimit {
            stat_prefix: "inbound_connection_limit".into(),
            max_connections: Some(envoy_types::pb::google::protobuf::UInt64Value { value: max }),
            ..Default::default()
        }
    }

    #[test]
    fn consuls_connection_limit_filter_caps_the_public_listener() {
        // `makeInboundListener` with `max_inbound_connections`: the limit
        // before tcp_proxy (RBAC, when present, is prepended to both).
        let l = public_with(vec![any_of(&limit(64)), tcp(LOCAL_APP)]);
        let (_, spec) = listener(&l).unwrap();
        assert!(
            matches!(
                spec,
                ListenerSpec::Public {
                    conn_limit: Some(64),
                    ..
                }
            ),
            "{spec:?}"
        );
        let two = public_with(vec![any_of(&limit(9)), any_of(&limit(4)), tcp(LOCAL_APP)]);
        let (_, spec) = listener(&two).unwrap();
        assert!(
            matches!(
                spec,
                ListenerSpec::Public {
                    conn_limit: Some(4),
                    ..
                }
            ),
            "the smallest of several: {spec:?}"
        );
        let none = public_with(vec![tcp(LOCAL_APP)]);
        let (_, spec) = listener(&none).unwrap();
        assert!(matches!(
            spec,
            ListenerSpec::Public {
                conn_limit: None,
                ..
            }
        ));
    }

    #[test]
    fn a_connection_limit_ferry_cannot_honour_is_refused_with_a_reason() {
        let mut delayed = limit(8);
        delayed.delay = Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 1,
            nanos: 0,
        });
        let e = listener(&public_with(vec![any_of(&delayed), tcp(LOCAL_APP)])).unwrap_err();
        assert!(e.0.contains("delay"), "{e}");
        let e = listener(&public_with(vec![any_of(&limit(0)), tcp(LOCAL_APP)])).unwrap_err();
        assert!(e.0.contains("at least 1"), "{e}");
        let mut switched = limit(8);
        switched.runtime_enabled = Some(Default::default());
        let e = listener(&public_with(vec![any_of(&switched), tcp(LOCAL_APP)])).unwrap_err();
        assert!(e.0.contains("runtime_enabled"), "{e}");
        let upstream = listener_with("db:127.0.0.1:9191", any_of(&limit(8)));
        let Ok(mut u) = Listener::decode(upstream.value.as_slice()) else {
            panic!("decode");
        };
        u.filter_chains[0].filters.push(Filter {
            name: "tcp".into(),
            config_type: Some(filter::ConfigType::TypedConfig(tcp("db.c"))),
        });
        let e = listener(&any_of(&u)).unwrap_err();
        assert!(e.0.contains("plaintext listener"), "{e}");
    }

    /// An EDS cluster `db` with this upstream TLS context.
    fn db_with_tls(common: CommonTlsContext) -> Any {
        use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
        let ctx = UpstreamTlsContext {
            sni: "db.default.dc1.internal.example".into(),
            common_tls_context: Some(common),
            ..Default::default()
        };
        any_of(&Cluster {
            name: "db".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            )),
            transport_socket: Some(TransportSocket {
                name: "tls".into(),
                config_type: Some(ConfigType::TypedConfig(any_of(&ctx))),
            }),
            ..Default::default()
        })
    }

    #[test]
    fn an_upstream_cluster_may_take_sds_roots_with_its_san_matchers_in_a_combined_context() {
        use common_tls_context::{CombinedCertificateValidationContext, ValidationContextType};
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig;
        use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher;
        let sds = |name: &str| SdsSecretConfig {
            name: name.into(),
            ..Default::default()
        };
        let db = "spiffe://example/ns/default/dc/dc1/svc/db";
        #[allow(deprecated)]
        let matchers = CertificateValidationContext {
            match_subject_alt_names: vec![StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(db.into())),
                ..Default::default()
            }],
            ..Default::default()
        };
        let combined = |default: Option<CertificateValidationContext>, roots: bool| {
            db_with_tls(CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![sds("connect-leaf")],
                validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                    CombinedCertificateValidationContext {
                        default_validation_context: default,
                        validation_context_sds_secret_config: roots.then(|| sds("connect-root")),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            })
        };
        let (_, spec) = cluster(&combined(Some(matchers.clone()), true)).unwrap();
        let tls = spec.tls.expect("upstream TLS");
        assert_eq!(tls.sans, vec![db.to_string()]);
        assert_eq!(
            tls.certs,
            Certs::Sds {
                leaf: "connect-leaf".into(),
                roots: "connect-root".into()
            }
        );
        // No SAN matcher, however the roots come: ferry will not accept
        // any server the roots sign.
        let e = cluster(&combined(None, true)).unwrap_err();
        assert!(e.0.contains("without a SAN matcher"), "{e}");
        let sds_roots = db_with_tls(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds("connect-leaf")],
            validation_context_type: Some(ValidationContextType::ValidationContextSdsSecretConfig(
                sds("connect-root"),
            )),
            ..Default::default()
        });
        let e = cluster(&sds_roots).unwrap_err();
        assert!(e.0.contains("without a SAN matcher"), "{e}");
        let e = cluster(&combined(Some(matchers.clone()), false)).unwrap_err();
        assert!(e.0.contains("without its SDS secret"), "{e}");
        let mut own_roots = matchers;
        own_roots.trusted_ca = Some(DataSource {
            specifier: Some(data_source::Specifier::InlineString("roots".into())),
            ..Default::default()
        });
        let e = cluster(&combined(Some(own_roots), true)).unwrap_err();
        assert!(e.0.contains("roots of its own"), "{e}");
    }
}
