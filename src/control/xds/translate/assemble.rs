//! Joins the checked resources held into one view: listener → cluster
//! (→ aggregate legs) → endpoints, and the secrets they name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use rustls::pki_types::ServerName;

use super::{
    Certs, ClusterKind, ClusterSpec, EndpointsSpec, ListenerSpec, SecretSpec, UpstreamTls,
};
use crate::authz::rbac::RbacChain;
use crate::config::{Discovery, UpstreamConfig};
use crate::control::ListenerSet;
use crate::proxy::balancer::Target;

/// Every resource held, checked, by name.
#[derive(Debug, Clone, Default)]
pub struct Held {
    pub listeners: BTreeMap<String, ListenerSpec>,
    pub clusters: BTreeMap<String, ClusterSpec>,
    pub endpoints: BTreeMap<String, EndpointsSpec>,
    pub secrets: BTreeMap<String, SecretSpec>,
}

pub use crate::control::Instances;

/// One complete view of what to serve.
#[derive(Debug, Clone, PartialEq)]
pub struct Assembled {
    pub listeners: ListenerSet,
    /// Leaf chain, key, roots.
    pub pem: (String, String, String),
    pub rbac: Vec<String>,
    pub instances: Instances,
    /// Per upstream, the exact server identities to accept.
    pub expected: HashMap<String, Vec<String>>,
}

/// The outcome of joining the held resources.
#[derive(Debug)]
pub enum Assembly {
    /// Complete: serve it.
    Ready(Box<Assembled>, RbacChain),
    /// A referenced resource has not arrived yet.
    Warming(String),
}

impl Held {
    /// The EDS names the clusters need, and the SDS names listeners and
    /// clusters refer to.
    pub fn wanted(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut eds = BTreeSet::new();
        let mut sds = BTreeSet::new();
        for (name, c) in &self.clusters {
            if c.kind == ClusterKind::Eds {
                eds.insert(name.clone());
            }
            if let Some(UpstreamTls {
                certs: Certs::Sds { leaf, roots },
                ..
            }) = &c.tls
            {
                sds.insert(leaf.clone());
                sds.insert(roots.clone());
            }
        }
        for l in self.listeners.values() {
            if let ListenerSpec::Public {
                certs: Certs::Sds { leaf, roots },
                ..
            } = l
            {
                sds.insert(leaf.clone());
                sds.insert(roots.clone());
            }
        }
        (eds, sds)
    }

    fn pem(&self, certs: &Certs) -> Result<(String, String, String), String> {
        match certs {
            Certs::Inline { chain, key, roots } => Ok((chain.clone(), key.clone(), roots.clone())),
            Certs::Sds { leaf, roots } => {
                let (chain, key) = match self.secrets.get(leaf) {
                    Some(SecretSpec::Leaf { chain, key }) => (chain.clone(), key.clone()),
                    Some(_) => return Err(format!("secret {leaf} is not a certificate")),
                    None => return Err(format!("waiting for secret {leaf}")),
                };
                match self.secrets.get(roots) {
                    Some(SecretSpec::Roots(r)) => Ok((chain, key, r.clone())),
                    Some(_) => Err(format!("secret {roots} is not a validation context")),
                    None => Err(format!("waiting for secret {roots}")),
                }
            }
        }
    }

    /// Joins everything held into one view for `service`.
    pub fn assemble(&self, service: &str) -> Assembly {
        let mut listen = None;
        let mut service_addr = String::new();
        let mut local_connect_timeout = None;
        let mut max_inbound_conns = None;
        let mut pem = None;
        let mut rbac = RbacChain::default();
        let mut upstreams = Vec::new();
        let mut instances = Instances::new();
        let mut expected = HashMap::new();
        for (name, l) in &self.listeners {
            match l {
                ListenerSpec::Public {
                    addr,
                    certs,
                    rbac: r,
                    cluster,
                    conn_limit,
                } => {
                    let Some(c) = self.clusters.get(cluster) else {
                        return Assembly::Warming(format!(
                            "listener {name}: waiting for cluster {cluster}"
                        ));
                    };
                    let ClusterKind::Static(app) = &c.kind else {
                        return Assembly::Warming(format!(
                            "listener {name}: cluster {cluster} is not a static local app"
                        ));
                    };
                    match self.pem(certs) {
                        Ok(p) => pem = Some(p),
                        Err(why) => return Assembly::Warming(format!("listener {name}: {why}")),
                    }
                    listen = Some(*addr);
                    // `unix:/path` for a socket, as registration mode spells it.
                    service_addr = app.to_string();
                    local_connect_timeout = c.connect_timeout;
                    // Consul's `max_inbound_connections`, in both places
                    // it puts it: the local app cluster's circuit breaker
                    // and the listener's `connection_limit` filter. Envoy
                    // enforces each; the smaller decides.
                    max_inbound_conns = match (c.max_conns, *conn_limit) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    rbac = r.clone();
                }
                ListenerSpec::Upstream { id, bind, cluster } => {
                    let Some(c) = self.clusters.get(cluster) else {
                        return Assembly::Warming(format!(
                            "listener {name}: waiting for cluster {cluster}"
                        ));
                    };
                    // The legs in order (the cluster itself, or an
                    // aggregate's clusters), each leg's priority groups in
                    // order: one failover tier each, with the leg's SNI and
                    // identity. The balancer serves from the first tier
                    // with an instance it has not ejected.
                    let legs: Vec<&String> = match &c.kind {
                        ClusterKind::Aggregate(legs) => legs.iter().collect(),
                        _ => vec![cluster],
                    };
                    let mut chosen: Vec<Target> = Vec::new();
                    let mut sans = Vec::new();
                    let mut first_tls = None;
                    let mut first_leg = None;
                    let mut tier = 0;
                    for leg in legs {
                        let Some(lc) = self.clusters.get(leg) else {
                            return Assembly::Warming(format!(
                                "cluster {cluster}: waiting for leg {leg}"
                            ));
                        };
                        first_leg.get_or_insert(lc);
                        let Some(tls) = &lc.tls else {
                            return Assembly::Warming(format!("cluster {leg}: no upstream TLS"));
                        };
                        if first_tls.is_none() {
                            first_tls = Some(tls.clone());
                        }
                        let Some(eps) = self.endpoints.get(leg) else {
                            return Assembly::Warming(format!(
                                "cluster {leg}: waiting for endpoints"
                            ));
                        };
                        let identity: Arc<[String]> = tls.sans.clone().into();
                        for hosts in eps.0.values().filter(|h| !h.is_empty()) {
                            if chosen.is_empty() {
                                sans = tls.sans.clone();
                            }
                            chosen.extend(hosts.iter().map(|a| {
                                Target {
                                    addr: *a,
                                    server_name: ServerName::try_from(tls.sni.clone())
                                        .unwrap_or_else(|_| ServerName::IpAddress(a.ip().into())),
                                    tier,
                                    identity: Some(identity.clone()),
                                }
                            }));
                            tier += 1;
                        }
                    }
                    if pem.is_none() {
                        if let Some(t) = &first_tls {
                            match self.pem(&t.certs) {
                                Ok(p) => pem = Some(p),
                                Err(why) => {
                                    return Assembly::Warming(format!("cluster {cluster}: {why}"))
                                }
                            }
                        }
                    }
                    if sans.is_empty() {
                        if let Some(t) = &first_tls {
                            sans = t.sans.clone();
                        }
                    }
                    instances.insert(id.clone(), chosen);
                    expected.insert(id.clone(), sans);
                    // Connect timeout, circuit breaker and outlier detection
                    // are the hosts' cluster's: for an aggregate, its legs'
                    // (Consul gives every leg the upstream's settings and the
                    // aggregate none). One set applies to the upstream, the
                    // first leg's, so that a failover between legs does not
                    // change the listener's configuration.
                    let limits = first_leg.unwrap_or(c);
                    upstreams.push(UpstreamConfig {
                        name: id.clone(),
                        bind: bind.clone(),
                        discovery: Discovery::ControlPlane,
                        deadline: limits.connect_timeout,
                        max_conns: limits.max_conns,
                        ejection: limits.ejection,
                    });
                }
            }
        }
        let Some(pem) = pem else {
            return Assembly::Warming("no listener or cluster carries certificates yet".into());
        };
        let rbac_text = vec![format!("{rbac:?}")];
        Assembly::Ready(
            Box::new(Assembled {
                listeners: ListenerSet {
                    service: service.to_string(),
                    listen,
                    service_addr,
                    local_connect_timeout,
                    handshake_timeout: None,
                    max_inbound_conns,
                    upstreams,
                    // Exposed paths are HTTP listeners Consul sends as
                    // http_connection_manager, which ferry refuses (L4 only).
                    expose: Vec::new(),
                    // The bootstrap's Prometheus listener is served by
                    // `app::xds`; there is no stats listener over xDS.
                    metrics_bind: None,
                    stats_bind: None,
                },
                pem,
                rbac: rbac_text,
                instances,
                expected,
            }),
            rbac,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::LOCAL_APP;
    use super::*;
    use crate::config::{BindAddr, UnixBind};
    use crate::proxy::balancer::EjectionPolicy;
    use crate::proxy::net::LocalApp;

    fn inline() -> Certs {
        Certs::Inline {
            chain: "chain".into(),
            key: "key".into(),
            roots: "roots".into(),
        }
    }

    /// A public listener → `local_app` at `app`, and upstream `db` bound
    /// at `bind` with one instance.
    fn held(app: LocalApp, bind: BindAddr) -> Held {
        let mut held = Held::default();
        held.listeners.insert(
            "public_listener:127.0.0.1:21000".into(),
            ListenerSpec::Public {
                addr: "127.0.0.1:21000".parse().unwrap(),
                certs: inline(),
                rbac: RbacChain::default(),
                cluster: LOCAL_APP.into(),
                conn_limit: None,
            },
        );
        held.clusters.insert(
            LOCAL_APP.into(),
            ClusterSpec {
                kind: ClusterKind::Static(app),
                connect_timeout: None,
                max_conns: Some(7),
                ejection: None,
                tls: None,
            },
        );
        held.listeners.insert(
            format!("db:{bind}"),
            ListenerSpec::Upstream {
                id: "db".into(),
                bind,
                cluster: "db.c".into(),
            },
        );
        held.clusters.insert(
            "db.c".into(),
            ClusterSpec {
                kind: ClusterKind::Eds,
                connect_timeout: None,
                max_conns: Some(3),
                ejection: None,
                tls: Some(UpstreamTls {
                    sni: "db.default.dc1.internal.example".into(),
                    sans: vec!["spiffe://example/ns/default/dc/dc1/svc/db".into()],
                    certs: inline(),
                }),
            },
        );
        held.endpoints.insert(
            "db.c".into(),
            EndpointsSpec(BTreeMap::from([(0, vec!["127.0.0.1:1".parse().unwrap()])])),
        );
        held
    }

    #[test]
    fn a_view_caps_the_public_listener_by_the_local_app_breaker_and_binds_upstreams_on_tcp() {
        let tcp = BindAddr::Tcp("127.0.0.1:9191".parse().unwrap());
        let held = held(LocalApp::Tcp("127.0.0.1:8080".into()), tcp.clone());
        let Assembly::Ready(view, _) = held.assemble("web") else {
            panic!("every reference is held: the view is complete");
        };
        let set = &view.listeners;
        assert_eq!(set.max_inbound_conns, Some(7), "max_inbound_connections");
        assert_eq!(set.service_addr, "127.0.0.1:8080");
        let [db] = set.upstreams.as_slice() else {
            panic!("one upstream: {:?}", set.upstreams);
        };
        assert_eq!(db.bind, tcp);
        assert_eq!(db.max_conns, Some(3), "the upstream's own breaker");
        assert!(set.expose.is_empty(), "no exposed paths over xDS");
        assert_eq!((set.metrics_bind, set.stats_bind), (None, None));
    }

    #[test]
    fn an_aggregate_upstream_takes_its_first_legs_timeout_breaker_and_ejection() {
        use std::time::Duration;
        let tcp = BindAddr::Tcp("127.0.0.1:9191".parse().unwrap());
        let mut held = held(LocalApp::Tcp("127.0.0.1:8080".into()), tcp);
        // `clusters/connect-proxy-with-chain-and-failover`: the aggregate
        // carries none of the upstream's settings, each leg all of them.
        let leg = held.clusters["db.c"].clone();
        let policy = EjectionPolicy {
            after_failures: 2,
            duration: Duration::from_secs(45),
        };
        let legs = ["failover-target~0~db.c", "failover-target~1~db.c"];
        for (i, name) in legs.iter().enumerate() {
            let mut c = leg.clone();
            c.connect_timeout = Some(Duration::from_secs(2 + i as u64));
            c.max_conns = Some(5 + i);
            c.ejection = Some(policy);
            held.clusters.insert(name.to_string(), c);
            held.endpoints
                .insert(name.to_string(), held.endpoints["db.c"].clone());
        }
        held.clusters.insert(
            "db.c".into(),
            ClusterSpec {
                kind: ClusterKind::Aggregate(legs.iter().map(|l| l.to_string()).collect()),
                connect_timeout: Some(Duration::from_secs(5)),
                max_conns: None,
                ejection: None,
                tls: None,
            },
        );
        let Assembly::Ready(view, _) = held.assemble("web") else {
            panic!("every reference is held: the view is complete");
        };
        let [db] = view.listeners.upstreams.as_slice() else {
            panic!("one upstream: {:?}", view.listeners.upstreams);
        };
        assert_eq!(db.deadline, Some(Duration::from_secs(2)));
        assert_eq!(db.max_conns, Some(5));
        assert_eq!(db.ejection, Some(policy));
    }

    #[test]
    fn the_smaller_of_the_local_app_breaker_and_the_connection_limit_caps_the_public_listener() {
        let tcp = BindAddr::Tcp("127.0.0.1:9191".parse().unwrap());
        let cap = |breaker: Option<usize>, filter: Option<usize>| {
            let mut held = held(LocalApp::Tcp("127.0.0.1:8080".into()), tcp.clone());
            held.clusters.get_mut(LOCAL_APP).unwrap().max_conns = breaker;
            for l in held.listeners.values_mut() {
                if let ListenerSpec::Public { conn_limit, .. } = l {
                    *conn_limit = filter;
                }
            }
            let Assembly::Ready(view, _) = held.assemble("web") else {
                panic!("every reference is held: the view is complete");
            };
            view.listeners.max_inbound_conns
        };
        assert_eq!(cap(Some(7), Some(3)), Some(3));
        assert_eq!(cap(Some(2), Some(3)), Some(2));
        assert_eq!(cap(None, Some(3)), Some(3), "the filter alone");
        assert_eq!(cap(Some(7), None), Some(7), "the breaker alone");
        assert_eq!(cap(None, None), None, "ferry's own -max-conns");
    }

    #[test]
    fn a_view_carries_unix_sockets_for_the_local_app_and_an_upstream() {
        let sock = BindAddr::Unix(UnixBind {
            path: "/run/db.sock".into(),
            mode: Some(0o640),
        });
        let held = held(LocalApp::Unix("/run/web.sock".into()), sock.clone());
        let Assembly::Ready(view, _) = held.assemble("web") else {
            panic!("every reference is held: the view is complete");
        };
        let set = &view.listeners;
        assert_eq!(
            set.service_addr, "unix:/run/web.sock",
            "as registration mode spells it"
        );
        let [db] = set.upstreams.as_slice() else {
            panic!("one upstream: {:?}", set.upstreams);
        };
        assert_eq!(db.bind, sock, "the socket and its mode");
    }
}
