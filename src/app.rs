//! The supervisor: turns a [`Config`] into bound listeners and running tasks,
//! keeps the set of upstream listeners in line with the registration in
//! registration mode, and stops everything.
//!
//! Two trackers, three tokens. The data plane (listeners and connections)
//! runs on `conns`; `stop` ends the accept loops and `kill` ends connections
//! still open after the grace period. The control plane (agent watchers) runs
//! on `control` until `halt`, which fires only once the data plane is done:
//! certificates can still rotate while connections drain. Each upstream
//! listener also has its own child tokens, so one can be removed at runtime
//! while its open connections finish.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Admin};
use crate::authz::{AgentAuthorizer, Authorizer};
use crate::balancer::{Balancer, EjectionPolicy, InstanceState};
use crate::config::agent::ProxyIdentity;
use crate::config::{
    AuthzSource, CertSource, Config, Discovery, InboundConfig, Timeouts, UpstreamConfig,
};
use crate::consul::{AgentClient, AgentError};
use crate::control;
use crate::identity::SpiffeId;
use crate::limits::Limit;
use crate::metrics::Metrics;
use crate::register::{self, Registration};
use crate::revoke::{self, LiveConns, Revoker};
use crate::sidecar::{self, SidecarConfig};
use crate::splice::Timers;
use crate::tls::Credentials;
use crate::watch::{backoff, WatchPolicy};
use crate::{inbound, upstream};

/// How long one authorize call may take before the connection is refused.
/// The agent answers from a local cache in well under a millisecond; two
/// seconds means it is in trouble.
const AUTHORIZE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a prepared-query upstream is re-executed (queries cannot block).
const QUERY_REFRESH: Duration = Duration::from_secs(30);

/// Errors starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{what}: cannot listen on {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Agent(#[from] AgentError),
    #[error("stopped before the agent delivered certificates")]
    Cancelled,
    #[error("configuration asks for the agent but no agent address was resolved")]
    NoAgent,
    #[error("proxy registration: {0}")]
    Registration(String),
}

/// A running proxy.
pub struct Running {
    /// Where the public mTLS listener is bound, if there is one.
    pub inbound: Option<SocketAddr>,
    /// Where the admin listener is bound, if there is one.
    pub admin: Option<SocketAddr>,
    /// What the admin endpoints report on.
    admin_state: Arc<Admin>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The upstream listeners, which registration mode changes at runtime.
    upstreams: Arc<UpstreamSet>,
    /// Publishes new credentials to every listener (rotation).
    credentials: Arc<watch::Sender<Arc<Credentials>>>,
    /// Our registration with the agent (`-register`), removed at shutdown.
    /// The heartbeat loop has its own token: it must stop before we
    /// deregister, or it would see the check gone and register again.
    registration: Option<(AgentClient, Registration, CancellationToken)>,
    stop: CancellationToken,
    kill: CancellationToken,
    halt: CancellationToken,
    conns: TaskTracker,
    control: TaskTracker,
}

/// Starts the proxy. With an agent, waits until it has delivered roots and a
/// leaf that validate (and, in registration mode, the registration); then
/// binds every listener and returns, so callers (and tests using port 0) can
/// connect at once. `watch_policy` times the agent watchers.
pub async fn start(mut config: Config, watch_policy: WatchPolicy) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::default());
    let stop = CancellationToken::new();
    let kill = CancellationToken::new();
    let halt = CancellationToken::new();
    let conns = TaskTracker::new();
    let control = TaskTracker::new();
    // If start fails part-way, stop whatever it already spawned.
    let on_error = (halt.clone().drop_guard(), stop.clone().drop_guard());
    let client = match &config.agent {
        Some(a) => Some(AgentClient::new(a)?.with_metrics(metrics.clone())),
        None => None,
    };
    // The admin listener comes first, so /ready can say "not yet" while we
    // wait for the agent.
    let admin = Arc::new(Admin::new(metrics.clone()));
    let mut admin_addr = None;
    if let Some(addr) = config.admin {
        let listener = bind("-admin-addr", addr)?;
        admin_addr = Some(listener.local_addr().unwrap_or(addr));
        tracing::info!(listen = %admin_addr.unwrap_or(addr), "admin listener ready (/metrics /ready /live /status)");
        control.spawn(admin::serve(
            listener,
            admin.clone(),
            control.clone(),
            halt.clone(),
        ));
    }

    // Registration mode: the registration says what to do.
    let mut registration_rx = None;
    if let Some(identity) = config.sidecar.clone() {
        let client = client.as_ref().ok_or(StartError::NoAgent)?;
        let proxy_id = match identity {
            ProxyIdentity::ProxyId(id) => id,
            ProxyIdentity::SidecarFor(id) => sidecar::sidecar_for(client, &id)
                .await
                .map_err(StartError::Registration)?,
            ProxyIdentity::None => return Err(StartError::Registration("no proxy ID".into())),
        };
        let (tx, mut rx) = watch::channel(None);
        control.spawn(follow_registration(
            client.clone(),
            proxy_id.clone(),
            tx,
            watch_policy,
            halt.clone(),
        ));
        tracing::info!(proxy_id = %proxy_id, "waiting for the proxy registration");
        let first = first_value(&mut rx).await?;
        apply_registration(&mut config, &first);
        registration_rx = Some((rx, first));
    }

    // Certificates next: nothing is bound before we can do mTLS.
    let (first, from_agent) = match (&config.certs, &client) {
        (CertSource::Files(c), _) => (c.clone(), None),
        (CertSource::Agent, None) => return Err(StartError::NoAgent),
        (CertSource::Agent, Some(client)) => {
            let (tx, mut rx) = watch::channel(None);
            control.spawn(control::credentials(
                client.clone(),
                config.service.clone(),
                tx,
                watch_policy,
                halt.clone(),
            ));
            tracing::info!(service = %config.service, "waiting for certificates from the agent");
            let first = first_value(&mut rx).await?;
            (first, Some(rx))
        }
    };
    let (creds_tx, creds_rx) = watch::channel(first.clone());
    let creds_tx = Arc::new(creds_tx);
    metrics.leaf_expiry.set(first.leaf_not_after);
    if let Some(mut rx) = from_agent {
        let (tx, metrics) = (creds_tx.clone(), metrics.clone());
        control.spawn(async move {
            while rx.changed().await.is_ok() {
                if let Some(c) = rx.borrow_and_update().clone() {
                    install(&tx, &metrics, c);
                }
            }
        });
    }

    let me = first.identity.id.clone();
    let upstreams = Arc::new(UpstreamSet {
        me: me.clone(),
        client: client.clone(),
        credentials: creds_rx.clone(),
        metrics: metrics.clone(),
        timeouts: config.timeouts,
        attempts: config.upstream_attempts,
        timers: Timers {
            idle: config.idle_timeout,
            lifetime: config.max_lifetime,
        },
        max_conns: config.limits.upstream_conns,
        ejection: config.ejection,
        policy: watch_policy,
        stop: stop.clone(),
        kill: kill.clone(),
        halt: halt.clone(),
        conns: conns.clone(),
        control: control.clone(),
        live: Mutex::new(BTreeMap::new()),
    });

    // Bind everything before serving, so a failure leaves nothing behind.
    let inbound_listener = match &config.inbound {
        Some(i) => Some(bind("-listen", i.listen)?),
        None => None,
    };
    let mut bound = Vec::new();
    for u in &config.upstreams {
        bound.push((u.clone(), bind(&format!("-upstream {}", u.name), u.bind)?));
    }
    for (u, listener) in bound {
        upstreams.serve(u, listener);
    }

    let mut running = Running {
        inbound: None,
        admin: admin_addr,
        admin_state: admin.clone(),
        metrics: metrics.clone(),
        upstreams: upstreams.clone(),
        credentials: creds_tx,
        registration: None,
        stop: stop.clone(),
        kill: kill.clone(),
        halt: halt.clone(),
        conns: conns.clone(),
        control: control.clone(),
    };

    if let (Some(listener), Some(i)) = (inbound_listener, &config.inbound) {
        let addr = listener.local_addr().unwrap_or(i.listen);
        let (authz, live) = authorizer(
            i,
            &config.service,
            &client,
            &metrics,
            watch_policy,
            &control,
            &halt,
        )?;
        let ctx = Arc::new(inbound::Inbound {
            service: config.service.clone(),
            service_addr: i.service_addr.clone(),
            authz,
            credentials: creds_rx.clone(),
            timeouts: config.timeouts,
            timers: Timers {
                idle: config.idle_timeout,
                lifetime: config.max_lifetime,
            },
            conn_limit: Limit::new(
                config.limits.conns,
                "-max-conns",
                "inbound",
                metrics.refusals("inbound", "max_conns"),
            ),
            handshake_limit: Limit::new(
                config.limits.handshakes,
                "-max-handshakes",
                "inbound",
                metrics.refusals("inbound", "max_handshakes"),
            ),
            metrics: metrics.clone(),
            live,
        });
        tracing::info!(identity = %me, listen = %addr, service_addr = %i.service_addr, "inbound listener ready");
        conns.spawn(inbound::serve(
            listener,
            ctx,
            stop.clone(),
            kill.clone(),
            conns.clone(),
        ));
        running.inbound = Some(addr);
        if let (Some(suffix), Some(client)) = (&config.register, &client) {
            let reg = Registration::new(&config.service, suffix.as_deref(), addr);
            match register::register(client, &reg).await {
                Ok(()) => tracing::info!(id = %reg.id, "registered with the agent"),
                // The heartbeat loop registers again as soon as the agent answers.
                Err(e) => {
                    tracing::warn!(id = %reg.id, error = %e, "registration failed; will retry")
                }
            }
            let beat = halt.child_token();
            control.spawn(register::keep(
                client.clone(),
                reg.clone(),
                watch_policy.heartbeat,
                creds_rx.clone(),
                beat.clone(),
            ));
            running.registration = Some((client.clone(), reg, beat));
        }
    }

    admin.set_status(status_fn(
        config.service.clone(),
        running.inbound,
        creds_rx.clone(),
        upstreams.clone(),
    ));
    admin.set_ready(true);
    on_error.0.disarm();
    on_error.1.disarm();

    // Registration mode: keep the upstream listeners in line with it.
    if let Some((mut rx, mut current)) = registration_rx {
        let set = upstreams.clone();
        control.spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(next) = rx.borrow_and_update().clone() else { continue };
                if next.service != current.service || next.listen != current.listen || next.service_addr != current.service_addr {
                    tracing::warn!(service = %next.service, listen = ?next.listen, service_addr = %next.service_addr,
                        "the registration changed the identity, public listener or local app; restart ferry to apply (upstream changes apply live)");
                }
                set.reconcile(&next.upstreams).await;
                current = next;
            }
        });
    }
    Ok(running)
}

/// Waits for a watcher's first value.
async fn first_value<T: Clone>(rx: &mut watch::Receiver<Option<T>>) -> Result<T, StartError> {
    loop {
        if let Some(v) = rx.borrow_and_update().clone() {
            return Ok(v);
        }
        if rx.changed().await.is_err() {
            return Err(StartError::Cancelled);
        }
    }
}

fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    crate::net::listen(addr).map_err(|source| StartError::Bind {
        what: what.to_string(),
        addr,
        source,
    })
}

/// The authorizer for the public listener, and the live-connection table
/// when decisions can change under open connections (agent mode).
fn authorizer(
    i: &InboundConfig,
    service: &str,
    client: &Option<AgentClient>,
    metrics: &Arc<Metrics>,
    policy: WatchPolicy,
    control: &TaskTracker,
    halt: &CancellationToken,
) -> Result<(Authorizer, Option<Arc<LiveConns>>), StartError> {
    match (&i.authz, client) {
        (AuthzSource::Static(set), _) => Ok((Authorizer::Static(set.clone()), None)),
        (
            AuthzSource::Agent {
                fallback_window,
                recheck_every,
            },
            Some(client),
        ) => {
            let live = Arc::new(LiveConns::default());
            control.spawn(revoke::run(
                Revoker {
                    client: client.clone(),
                    target: service.to_string(),
                    live: live.clone(),
                    every: *recheck_every,
                    timeout: AUTHORIZE_TIMEOUT,
                    policy,
                    metrics: metrics.clone(),
                },
                halt.clone(),
            ));
            let authz = AgentAuthorizer::new(
                client.clone(),
                service.to_string(),
                AUTHORIZE_TIMEOUT,
                *fallback_window,
            );
            Ok((Authorizer::Agent(authz), Some(live)))
        }
        (AuthzSource::Agent { .. }, None) => Err(StartError::NoAgent),
    }
}

/// Fills the parts of `config` a registration decides.
fn apply_registration(config: &mut Config, reg: &SidecarConfig) {
    config.service = reg.service.clone();
    config.inbound = reg.listen.map(|listen| InboundConfig {
        listen,
        service_addr: reg.service_addr.clone(),
        authz: AuthzSource::Agent {
            fallback_window: config.authz_fallback_window,
            recheck_every: config.reauthorize_interval,
        },
    });
    config.upstreams = reg.upstreams.clone();
    if let Some(t) = reg.local_connect_timeout {
        config.timeouts.local_connect = t;
    }
    if let Some(t) = reg.handshake_timeout {
        config.timeouts.handshake = t;
    }
}

/// Watches the proxy's registration (hash-blocking) and publishes each
/// valid derived config. A registration that cannot be used, or that has
/// gone, is logged once and the last good one stays in force.
async fn follow_registration(
    client: AgentClient,
    proxy_id: String,
    tx: watch::Sender<Option<SidecarConfig>>,
    policy: WatchPolicy,
    cancel: CancellationToken,
) {
    let mut hash: Option<String> = None;
    let mut failures = 0u32;
    let mut failing: Option<String> = None;
    loop {
        let fetched = tokio::select! {
            _ = cancel.cancelled() => return,
            r = sidecar::fetch(&client, &proxy_id, hash.as_deref(), policy.wait) => r,
        };
        let problem = match fetched {
            Ok((svc, h)) => {
                hash = h;
                match sidecar::derive(&svc) {
                    Ok(c) => {
                        if failing.take().is_some() {
                            tracing::info!(proxy_id = %proxy_id, "proxy registration usable again");
                        }
                        failures = 0;
                        tx.send_if_modified(|cur| {
                            let changed = cur.as_ref() != Some(&c);
                            *cur = Some(c);
                            changed
                        });
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

/// The upstream listeners, keyed by upstream name.
struct UpstreamSet {
    /// Our identity; an upstream's expected identity is this with its name.
    me: SpiffeId,
    client: Option<AgentClient>,
    credentials: watch::Receiver<Arc<Credentials>>,
    metrics: Arc<Metrics>,
    timeouts: Timeouts,
    attempts: u32,
    timers: Timers,
    /// `-max-upstream-conns`, for each upstream listener.
    max_conns: usize,
    ejection: EjectionPolicy,
    policy: WatchPolicy,
    stop: CancellationToken,
    kill: CancellationToken,
    halt: CancellationToken,
    conns: TaskTracker,
    control: TaskTracker,
    /// std lock: held for map updates only, never across an await.
    live: Mutex<BTreeMap<String, UpstreamHandle>>,
}

/// One running upstream listener.
struct UpstreamHandle {
    config: UpstreamConfig,
    addr: SocketAddr,
    balancer: Arc<Balancer>,
    /// Ends this listener's accept loop (child of `stop`).
    stop: CancellationToken,
    /// Ends this upstream's discovery watch (child of `halt`).
    discovery: CancellationToken,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl UpstreamSet {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, UpstreamHandle>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts serving upstream `u` on an already bound listener.
    fn serve(&self, u: UpstreamConfig, listener: TcpListener) {
        let addr = listener.local_addr().unwrap_or(u.bind);
        let m = self.metrics.upstream(&u.name);
        let balancer = Arc::new(Balancer::new(self.ejection).with_gauge(m.instances.clone()));
        let discovery = self.discover(&u, &balancer);
        let mut timeouts = self.timeouts;
        if let Some(d) = u.deadline {
            timeouts.upstream_deadline = d;
        }
        let ctx = Arc::new(upstream::Upstream {
            name: u.name.clone(),
            balancer: balancer.clone(),
            credentials: self.credentials.clone(),
            attempts: self.attempts,
            timeouts,
            timers: self.timers,
            conn_limit: Limit::new(
                self.max_conns,
                "-max-upstream-conns",
                &u.name,
                self.metrics.refusals(&u.name, "max_upstream_conns"),
            ),
            metrics: self.metrics.clone(),
            m,
        });
        let stop = self.stop.child_token();
        let target = self.target(&u.name);
        tracing::info!(upstream = %u.name, listen = %addr, sni = %target.sni(), "upstream listener ready");
        let accept_loop = self.conns.spawn(upstream::serve(
            listener,
            ctx,
            stop.clone(),
            self.kill.clone(),
            self.conns.clone(),
        ));
        let name = u.name.clone();
        self.lock().insert(
            name,
            UpstreamHandle {
                config: u,
                addr,
                balancer,
                stop,
                discovery,
                accept_loop,
            },
        );
    }

    fn target(&self, name: &str) -> SpiffeId {
        SpiffeId {
            service: name.to_string(),
            ..self.me.clone()
        }
    }

    /// Fills `balancer` from static addresses, or starts its discovery watch.
    fn discover(&self, u: &UpstreamConfig, balancer: &Arc<Balancer>) -> CancellationToken {
        let token = self.halt.child_token();
        let target = self.target(&u.name);
        let d = match &u.discovery {
            Discovery::Static(list) => {
                balancer.set_instances(
                    list.iter()
                        .map(|a| (*a, server_name(&target, *a)))
                        .collect(),
                );
                return token;
            }
            Discovery::Service { datacenter } => control::Discovery::Service {
                name: u.name.clone(),
                datacenter: datacenter.clone(),
            },
            Discovery::Query { datacenter } => control::Discovery::Query {
                name: u.name.clone(),
                datacenter: datacenter.clone(),
                every: QUERY_REFRESH,
            },
        };
        match &self.client {
            Some(client) => {
                self.control.spawn(control::instances(
                    client.clone(),
                    d,
                    target,
                    balancer.clone(),
                    self.policy,
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
        h.discovery.cancel();
        // Wait for the accept loop to drop its socket, so the port can be
        // bound again at once (a changed upstream often keeps its port).
        let _ = h.accept_loop.await;
        tracing::info!(upstream = %name, listen = %h.addr, "upstream listener stopped");
    }

    /// Makes the running set match `desired`: removes upstreams no longer
    /// wanted, restarts changed ones, adds new ones. A bind failure is
    /// logged and the rest still applied.
    async fn reconcile(&self, desired: &[UpstreamConfig]) {
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
            match bind(&format!("-upstream {}", d.name), d.bind) {
                Ok(listener) => self.serve(d.clone(), listener),
                Err(e) => {
                    tracing::error!(upstream = %d.name, error = %e, "cannot start upstream listener")
                }
            }
        }
    }
}

/// The `/status` document: identity, leaf, roots, listeners, instances.
fn status_fn(
    service: String,
    inbound: Option<SocketAddr>,
    credentials: watch::Receiver<Arc<Credentials>>,
    upstreams: Arc<UpstreamSet>,
) -> admin::StatusFn {
    Box::new(move || {
        let c = credentials.borrow().clone();
        let ups: Vec<serde_json::Value> = upstreams
            .lock()
            .iter()
            .map(|(name, h)| {
                let instances: Vec<serde_json::Value> = h
                    .balancer
                    .states()
                    .iter()
                    .map(|i| {
                        serde_json::json!({
                            "address": i.addr.to_string(),
                            "consecutive_failures": i.consecutive_failures,
                            "state": if i.ejected { "ejected" } else { "in rotation" },
                        })
                    })
                    .collect();
                serde_json::json!({ "name": name, "listen": h.addr.to_string(), "instances": instances })
            })
            .collect();
        serde_json::json!({
            "service": service,
            "identity": c.identity.id.to_string(),
            "leaf": { "serial": c.identity.serial, "not_after_unix": c.leaf_not_after },
            "roots": c.root_count(),
            "inbound": inbound.map(|a| a.to_string()),
            "upstreams": ups,
        })
    })
}

/// Puts new credentials in use for new connections, and says so in metrics.
fn install(tx: &watch::Sender<Arc<Credentials>>, metrics: &Metrics, c: Arc<Credentials>) {
    metrics.leaf_expiry.set(c.leaf_not_after);
    metrics.rotations.inc();
    tx.send_replace(c);
}

/// The TLS server name for an instance: Consul's SNI for the service, or —
/// when that is not a valid DNS name (Consul allows `_` in datacenter names)
/// — the instance IP, which makes rustls send no SNI at all.
fn server_name(target: &SpiffeId, addr: SocketAddr) -> ServerName<'static> {
    ServerName::try_from(target.sni()).unwrap_or_else(|_| ServerName::IpAddress(addr.ip().into()))
}

impl Running {
    /// The bound address of upstream `name`.
    pub fn upstream(&self, name: &str) -> Option<SocketAddr> {
        self.upstreams.lock().get(name).map(|h| h.addr)
    }

    /// The names of the upstreams being served.
    pub fn upstream_names(&self) -> Vec<String> {
        self.upstreams.lock().keys().cloned().collect()
    }

    /// Upstream `name`'s instances and their passive health.
    pub fn instances(&self, name: &str) -> Option<Vec<InstanceState>> {
        self.upstreams.lock().get(name).map(|h| h.balancer.states())
    }

    /// Replaces the credentials used by new connections. Connections already
    /// established keep the ones they started with.
    pub fn rotate(&self, credentials: Arc<Credentials>) {
        install(&self.credentials, &self.metrics, credentials);
    }

    /// The credentials new connections use now.
    pub fn credentials(&self) -> Arc<Credentials> {
        self.credentials.borrow().clone()
    }

    /// Deregisters (with `-register`), stops accepting, lets open
    /// connections finish for up to `grace`, closes the rest, then stops the
    /// control plane. Returns true if every connection finished on its own.
    pub async fn shutdown(self, grace: Duration) -> bool {
        // Not ready any more: health checks stop sending work first.
        self.admin_state.set_ready(false);
        // Deregister first, so the catalog stops sending traffic our way
        // while we drain.
        if let Some((client, reg, beat)) = &self.registration {
            beat.cancel();
            match register::deregister(client, reg).await {
                Ok(()) => tracing::info!(id = %reg.id, "deregistered from the agent"),
                Err(e) => tracing::warn!(id = %reg.id, error = %e, "deregistration failed"),
            }
        }
        self.stop.cancel();
        self.conns.close();
        let clean = tokio::time::timeout(grace, self.conns.wait()).await.is_ok();
        if !clean {
            self.kill.cancel();
            self.conns.wait().await;
        }
        self.halt.cancel();
        self.control.close();
        self.control.wait().await;
        clean
    }
}
