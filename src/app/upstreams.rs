//! The set of upstream listeners, keyed by upstream name: started at
//! startup, and in registration mode kept in line with the listener set
//! while the proxy runs (added, restarted when changed, stopped when gone).
//! Each listener has its own child tokens, so one can be removed at runtime
//! while its open connections finish.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;

use super::expose::ExposeSet;
use super::shutdown::Shutdown;
use super::{bind_local, StartError};
use crate::config::{BindAddr, Discovery, Timeouts, UpstreamConfig};
use crate::control::agent::{instances, AgentClient, WatchPolicy};
use crate::control::{Instances, ListenerSet, Receiver};
use crate::identity::tls::Credentials;
use crate::identity::SpiffeId;
use crate::ops::metrics::Metrics;
use crate::proxy::balancer::{Balancer, EjectionPolicy, InstanceState};
use crate::proxy::limits::Limit;
use crate::proxy::net::Listener;
use crate::proxy::splice::Timers;
use crate::proxy::upstream;

/// How often a prepared-query upstream is re-executed (queries cannot block).
const QUERY_REFRESH: Duration = Duration::from_secs(30);

/// What every upstream listener shares.
pub struct Settings {
    /// Where instances are discovered, when not static.
    pub client: Option<AgentClient>,
    /// Our credentials, read per connection.
    pub credentials: Receiver<Credentials>,
    pub metrics: Arc<Metrics>,
    pub timeouts: Timeouts,
    /// Instances tried per connection.
    pub attempts: u32,
    pub timers: Timers,
    /// `-max-upstream-conns`, for each upstream listener.
    pub max_conns: usize,
    pub ejection: EjectionPolicy,
    pub policy: WatchPolicy,
    /// Instances a control plane pushes (xDS), for `Discovery::ControlPlane`.
    pub instances: Option<Receiver<Instances>>,
}

/// The upstream listeners.
pub struct UpstreamSet {
    settings: Settings,
    shutdown: Shutdown,
    /// Our identity, once the first certificates arrived; an upstream's
    /// expected identity is this with its name. Until then listeners accept
    /// and their connections wait, but discovery cannot start: the SNI and
    /// the identity to verify depend on our trust domain.
    me: OnceLock<SpiffeId>,
    /// std lock: held for map updates only, never across an await.
    live: Mutex<BTreeMap<String, Handle>>,
}

/// One running upstream listener.
struct Handle {
    config: UpstreamConfig,
    /// Where it is bound (the actual port when 0 was asked for).
    addr: BindAddr,
    balancer: Arc<Balancer>,
    /// Ends this listener's accept loop (child of `stop`).
    stop: CancellationToken,
    /// Ends this upstream's discovery watch (child of `halt`); `None` until
    /// discovery started.
    discovery: Option<CancellationToken>,
    accept_loop: tokio::task::JoinHandle<()>,
}

/// What `/status` shows of one upstream.
pub struct UpstreamStatus {
    pub name: String,
    pub listen: BindAddr,
    pub instances: Vec<InstanceState>,
}

impl UpstreamSet {
    /// An empty set whose listeners run on `shutdown`'s trackers.
    pub fn new(settings: Settings, shutdown: Shutdown) -> UpstreamSet {
        UpstreamSet {
            settings,
            shutdown,
            me: OnceLock::new(),
            live: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Handle>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds every upstream in `upstreams` first, then serves them all, so
    /// that a bind failure leaves nothing behind.
    pub fn bind_all(&self, upstreams: &[UpstreamConfig]) -> Result<(), StartError> {
        let mut bound = Vec::with_capacity(upstreams.len());
        for u in upstreams {
            bound.push((
                u.clone(),
                bind_local(&format!("-upstream {}", u.name), &u.bind)?,
            ));
        }
        for (u, listener) in bound {
            self.serve(u, listener);
        }
        Ok(())
    }

    /// Starts serving upstream `u` on an already bound listener.
    fn serve(&self, u: UpstreamConfig, listener: Listener) {
        let s = &self.settings;
        let addr = listener.bound(&u.bind);
        let m = s.metrics.upstream(&u.name);
        let ejection = u.ejection.unwrap_or(s.ejection);
        let balancer = Arc::new(Balancer::new(ejection).with_gauge(m.instances.clone()));
        let discovery = self.me.get().map(|me| self.discover(me, &u, &balancer));
        let mut timeouts = s.timeouts;
        if let Some(d) = u.deadline {
            timeouts.upstream_deadline = d;
        }
        let ctx = Arc::new(upstream::Upstream {
            name: u.name.clone(),
            balancer: balancer.clone(),
            credentials: s.credentials.clone(),
            attempts: s.attempts,
            timeouts,
            timers: s.timers,
            conn_limit: Limit::new(
                u.max_conns.unwrap_or(s.max_conns),
                "-max-upstream-conns",
                &u.name,
                s.metrics.refusals(&u.name, "max_upstream_conns"),
            ),
            metrics: s.metrics.clone(),
            m,
        });
        let stop = self.shutdown.stop.child_token();
        tracing::info!(upstream = %u.name, listen = %addr, "upstream listener ready");
        let accept_loop = self.shutdown.conns.spawn(upstream::serve(
            listener,
            ctx,
            stop.clone(),
            self.shutdown.kill.clone(),
            self.shutdown.conns.clone(),
        ));
        let name = u.name.clone();
        self.lock().insert(
            name,
            Handle {
                config: u,
                addr,
                balancer,
                stop,
                discovery,
                accept_loop,
            },
        );
    }

    /// Our identity is known (first certificates): starts discovery for
    /// every listener bound so far; later ones start at once.
    pub fn start_discovery(&self, me: &SpiffeId) {
        if self.me.set(me.clone()).is_err() {
            return;
        }
        let mut live = self.lock();
        for h in live.values_mut() {
            if h.discovery.is_none() {
                h.discovery = Some(self.discover(me, &h.config, &h.balancer));
            }
        }
    }

    /// Fills `balancer` from static addresses, or starts its discovery watch.
    fn discover(
        &self,
        me: &SpiffeId,
        u: &UpstreamConfig,
        balancer: &Arc<Balancer>,
    ) -> CancellationToken {
        let token = self.shutdown.halt.child_token();
        if u.discovery == Discovery::ControlPlane {
            match &self.settings.instances {
                Some(rx) => {
                    self.shutdown.control.spawn(follow_instances(
                        rx.clone(),
                        u.name.clone(),
                        balancer.clone(),
                        token.clone(),
                    ));
                }
                None => {
                    tracing::error!(upstream = %u.name, "no control plane to take instances from")
                }
            }
            return token;
        }
        let target = SpiffeId {
            service: u.name.clone(),
            ..me.clone()
        };
        tracing::info!(upstream = %u.name, sni = %target.sni(), "discovering upstream instances");
        let d = match &u.discovery {
            Discovery::Static(list) => {
                balancer.set_instances(
                    list.iter()
                        .map(|a| (*a, server_name(&target, *a)))
                        .collect(),
                );
                return token;
            }
            Discovery::Service { datacenter } => instances::Discovery::Service {
                name: u.name.clone(),
                datacenter: datacenter.clone(),
            },
            Discovery::Query { datacenter } => instances::Discovery::Query {
                name: u.name.clone(),
                datacenter: datacenter.clone(),
                every: QUERY_REFRESH,
            },
            Discovery::ControlPlane => return token,
        };
        match &self.settings.client {
            Some(client) => {
                self.shutdown.control.spawn(instances::instances(
                    client.clone(),
                    d,
                    target,
                    balancer.clone(),
                    self.settings.policy,
                    token.clone(),
                ));
            }
            None => tracing::error!(upstream = %u.name, "no agent to discover instances from"),
        }
        token
    }

    /// Stops upstream `name`: no new connections; open ones finish.
    async fn remove(&self, name: &str) {
        let Some(h) = self.lock().remove(name) else {
            return;
        };
        h.stop.cancel();
        if let Some(d) = &h.discovery {
            d.cancel();
        }
        // Wait for the accept loop to drop its socket, so the port can be
        // bound again at once (a changed upstream often keeps its port).
        let _ = h.accept_loop.await;
        tracing::info!(upstream = %name, listen = %h.addr, "upstream listener stopped");
    }

    /// Makes the running set match `desired`: removes upstreams no longer
    /// wanted, restarts changed ones, adds new ones. A bind failure is
    /// logged and the rest still applied.
    pub async fn reconcile(&self, desired: &[UpstreamConfig]) {
        let current: Vec<(String, UpstreamConfig)> = self
            .lock()
            .iter()
            .map(|(k, h)| (k.clone(), h.config.clone()))
            .collect();
        for (name, cfg) in &current {
            match desired.iter().find(|d| &d.name == name) {
                Some(d) if d == cfg => {}
                _ => self.remove(name).await,
            }
        }
        for d in desired {
            if self.lock().contains_key(&d.name) {
                continue;
            }
            match bind_local(&format!("-upstream {}", d.name), &d.bind) {
                Ok(listener) => self.serve(d.clone(), listener),
                Err(e) => {
                    tracing::error!(upstream = %d.name, error = %e, "cannot start upstream listener")
                }
            }
        }
    }

    /// Applies each new listener set until its publisher goes away. The
    /// upstreams and the exposed paths apply live; a change of identity,
    /// public listener or local app is logged and needs a restart.
    pub(super) async fn follow(
        &self,
        mut sets: Receiver<ListenerSet>,
        mut current: Arc<ListenerSet>,
        exposed: &ExposeSet,
    ) {
        while let Some(next) = sets.changed().await {
            if needs_restart(&current, &next) {
                tracing::warn!(service = %next.service, listen = ?next.listen, service_addr = %next.service_addr,
                    "the registration changed the identity, public listener (or its max_inbound_connections), local app or metrics/stats listeners; restart ferry to apply (upstream and exposed path changes apply live)");
            }
            self.reconcile(&next.upstreams).await;
            exposed.reconcile(&next.expose).await;
            current = next;
        }
    }

    /// The bound address of upstream `name`, when it listens on TCP.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        match self.lock().get(name).map(|h| &h.addr) {
            Some(BindAddr::Tcp(a)) => Some(*a),
            _ => None,
        }
    }

    /// The socket file of upstream `name`, when it listens on a Unix socket.
    pub fn socket(&self, name: &str) -> Option<PathBuf> {
        match self.lock().get(name).map(|h| &h.addr) {
            Some(BindAddr::Unix(u)) => Some(u.path.clone()),
            _ => None,
        }
    }

    /// The names of the upstreams being served.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Upstream `name`'s instances and their passive health.
    pub fn instances(&self, name: &str) -> Option<Vec<InstanceState>> {
        self.lock().get(name).map(|h| h.balancer.states())
    }

    /// Every upstream, for `/status`.
    pub fn status(&self) -> Vec<UpstreamStatus> {
        self.lock()
            .iter()
            .map(|(name, h)| UpstreamStatus {
                name: name.clone(),
                listen: h.addr.clone(),
                instances: h.balancer.states(),
            })
            .collect()
    }
}

/// Keeps `balancer` at upstream `name`'s instances in each snapshot a
/// control plane pushes, until `stop`. Only new connections see a change.
async fn follow_instances(
    mut rx: Receiver<Instances>,
    name: String,
    balancer: Arc<Balancer>,
    stop: CancellationToken,
) {
    let mut current = None;
    let mut next = rx.latest();
    loop {
        if let Some(all) = next {
            let mine = all.get(&name).cloned().unwrap_or_default();
            if current.as_ref() != Some(&mine) {
                balancer.set_targets(mine.clone());
                current = Some(mine);
            }
        }
        next = tokio::select! {
            n = rx.changed() => match n {
                Some(n) => Some(n),
                None => return,
            },
            _ = stop.cancelled() => return,
        };
    }
}

/// Whether going from `old` to `new` changes what only a restart applies.
fn needs_restart(old: &ListenerSet, new: &ListenerSet) -> bool {
    old.service != new.service
        || old.listen != new.listen
        || old.service_addr != new.service_addr
        || old.max_inbound_conns != new.max_inbound_conns
        || old.metrics_bind != new.metrics_bind
        || old.stats_bind != new.stats_bind
}

/// The TLS server name for an instance: Consul's SNI for the service, or —
/// when that is not a valid DNS name (a datacenter name Consul accepts but
/// DNS does not) — the instance IP, which makes rustls send no SNI at all.
fn server_name(target: &SpiffeId, addr: SocketAddr) -> ServerName<'static> {
    ServerName::try_from(target.sni()).unwrap_or_else(|_| ServerName::IpAddress(addr.ip().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(service: &str, listen: Option<&str>, app: &str) -> ListenerSet {
        ListenerSet {
            service: service.into(),
            listen: listen.map(|l| l.parse().unwrap()),
            service_addr: app.into(),
            local_connect_timeout: None,
            handshake_timeout: None,
            max_inbound_conns: None,
            expose: Vec::new(),
            metrics_bind: None,
            stats_bind: None,
            upstreams: Vec::new(),
        }
    }

    #[test]
    fn only_identity_listener_and_app_changes_need_a_restart() {
        let base = set("api", Some("0.0.0.0:21000"), "127.0.0.1:8080");
        let cases = [
            ("same", base.clone(), false),
            (
                "other service",
                set("db", Some("0.0.0.0:21000"), "127.0.0.1:8080"),
                true,
            ),
            (
                "other listener",
                set("api", Some("0.0.0.0:21001"), "127.0.0.1:8080"),
                true,
            ),
            ("no listener", set("api", None, "127.0.0.1:8080"), true),
            (
                "other app",
                set("api", Some("0.0.0.0:21000"), "127.0.0.1:9090"),
                true,
            ),
            (
                "upstreams and timeouts only",
                ListenerSet {
                    handshake_timeout: Some(Duration::from_secs(3)),
                    upstreams: vec![UpstreamConfig {
                        name: "db".into(),
                        bind: BindAddr::Tcp("127.0.0.1:9191".parse().unwrap()),
                        discovery: Discovery::Service { datacenter: None },
                        deadline: None,
                        max_conns: None,
                        ejection: None,
                    }],
                    ..base.clone()
                },
                false,
            ),
        ];
        for (name, next, want) in cases {
            assert_eq!(needs_restart(&base, &next), want, "{name}");
        }
    }

    #[test]
    fn server_name_is_consuls_sni_or_no_sni_when_not_a_dns_name() {
        let addr: SocketAddr = "10.0.0.1:21000".parse().unwrap();
        let ok = SpiffeId::service("td.consul", "dc1", "api");
        assert_eq!(
            format!("{:?}", server_name(&ok, addr)),
            format!(
                "{:?}",
                ServerName::try_from("api.default.dc1.internal.td.consul").unwrap()
            )
        );
        let not_dns = SpiffeId::service("td.consul", "dc 1", "api");
        assert!(matches!(
            server_name(&not_dns, addr),
            ServerName::IpAddress(_)
        ));
    }
}
