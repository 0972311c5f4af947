//! The supervisor: turns a [`Config`] into bound listeners and running
//! tasks, in named phases, and stops everything through one [`Shutdown`].
//!
//! Start, in order: admin listener (so `/ready` can say "not yet") →
//! registration (registration mode: the listener set) → the credentials
//! channel → bind and serve every listener → wait for the first
//! credentials → upstream discovery → `-register` → follow the listener
//! set. Each phase is a function below (the admin listeners' in `ops`, the
//! credentials channel in `certs`); a failure in any of them stops what the
//! earlier ones spawned. xDS mode (`xds`) starts the same phases with feeds
//! from the control plane.
//!
//! Owns: the order of start-up and shutdown, and which source feeds which
//! listener. May import every part; no part imports it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::authz::RbacChain;
use crate::config::agent::ProxyIdentity;
use crate::config::{AuthzSource, BindAddr, Config, InboundConfig};
use crate::control::agent::register::{self, Registration};
use crate::control::agent::{registration, AgentClient, AgentError, WatchPolicy};
use crate::control::{Instances, ListenerSet, Publisher, Receiver};
use crate::identity::tls::Credentials;
use crate::ops::admin::Admin;
use crate::ops::metrics::Metrics;
use crate::proxy::balancer::InstanceState;
use crate::proxy::net::Listener;
use crate::proxy::splice::Timers;

mod certs;
mod expose;
mod inbound;
mod ops;
pub mod run;
mod shutdown;
mod status;
mod upstreams;
#[cfg(feature = "xds")]
pub mod xds;

use certs::credentials;
use expose::ExposeSet;
use inbound::{register_self, SelfRegistration, Wiring};
use ops::{serve_admin, serve_envoy_compat};
pub use shutdown::Shutdown;
use upstreams::{Settings, UpstreamSet};

/// Errors starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{what}: cannot listen on {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what}: cannot listen on {addr}: {source}")]
    BindLocal {
        what: String,
        addr: BindAddr,
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
    #[error("{0}")]
    ControlPlane(String),
}

/// What a control plane that configures everything (xDS) feeds the
/// supervisor: the listener set (and its first value), certificates,
/// RBAC and each upstream's instances.
pub(crate) struct Feeds {
    pub sets: (Receiver<ListenerSet>, Arc<ListenerSet>),
    pub credentials: Receiver<Credentials>,
    pub rbac: Receiver<RbacChain>,
    pub instances: Receiver<Instances>,
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
    /// The one credentials channel: watchers and [`Running::rotate`]
    /// publish, every listener reads.
    credentials: Arc<Publisher<Credentials>>,
    /// Our registration with the agent (`-register`), removed at shutdown.
    registration: Option<SelfRegistration>,
    shutdown: Shutdown,
}

/// Starts the proxy. In registration mode, waits for the registration;
/// then binds every listener, so connections are accepted from then on;
/// then, with an agent, waits until it has delivered roots and a leaf that
/// validate, and returns. Connections that arrive before the certificates
/// wait for them, bounded by the handshake timeout (inbound) or the
/// upstream deadline, so callers (and tests using port 0) can connect at
/// once and `/ready` turns 200 only when everything serves. `policy` times everything that talks to the agent.
pub async fn start(config: Config, policy: WatchPolicy) -> Result<Running, StartError> {
    start_with(config, policy, Shutdown::new(), Arc::default(), None).await
}

/// [`start`], on `shutdown`, counting in `metrics` (which a control-plane
/// source may already count in), with everything from `feeds` when a
/// control plane configures the whole proxy.
pub(crate) async fn start_with(
    mut config: Config,
    policy: WatchPolicy,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    feeds: Option<Feeds>,
) -> Result<Running, StartError> {
    let on_error = shutdown.abort_on_drop();
    let client = match &config.agent {
        Some(a) => Some(AgentClient::new(a)?.with_metrics(metrics.clone())),
        None => None,
    };
    let admin = Arc::new(Admin::new(metrics.clone()));
    let admin_addr = serve_admin(config.admin, &admin, &shutdown)?;
    let (feed_creds, rbac, instances, from_control) = match feeds {
        Some(f) => (
            Some(f.credentials),
            Some(f.rbac),
            Some(f.instances),
            Some(f.sets),
        ),
        None => (None, None, None, None),
    };
    let listener_sets = match (config.sidecar.clone(), from_control) {
        (_, Some((rx, first))) => {
            apply_registration(&mut config, &first, AuthzSource::ControlPlane);
            Some((rx, first))
        }
        (Some(identity), None) => {
            let client = client.as_ref().ok_or(StartError::NoAgent)?;
            let (rx, first) = follow_registration(client, &identity, policy, &shutdown).await?;
            let authz = AuthzSource::Agent {
                fallback_window: config.authz_fallback_window,
                recheck_every: config.reauthorize_interval,
            };
            apply_registration(&mut config, &first, authz);
            serve_envoy_compat(&first, &admin, &shutdown)?;
            Some((rx, first))
        }
        (None, None) => None,
    };
    let credentials = credentials(&config, &client, &metrics, policy, &shutdown, feed_creds)?;
    let mut creds_rx = credentials.subscribe();

    let upstreams = Arc::new(UpstreamSet::new(
        Settings {
            client: client.clone(),
            credentials: creds_rx.clone(),
            metrics: metrics.clone(),
            timeouts: config.timeouts,
            attempts: config.upstream_attempts,
            timers: timers(&config),
            max_conns: config.limits.upstream_conns,
            ejection: config.ejection,
            policy,
            instances,
        },
        shutdown.clone(),
    ));
    // Bind everything before serving, so a failure leaves nothing behind,
    // and before the certificates arrive, so an app that starts first is
    // never refused: its connections wait (bounded) for them.
    let inbound_listener = match &config.inbound {
        Some(i) => Some((bind("-listen", i.listen)?, i)),
        None => None,
    };
    upstreams.bind_all(&config.upstreams)?;
    let exposed = Arc::new(ExposeSet::new(metrics.clone(), shutdown.clone()));
    if let Some((_, first)) = &listener_sets {
        exposed.bind_all(&first.expose)?;
    }
    let mut inbound_addr = None;
    if let Some((listener, i)) = inbound_listener {
        let wiring = Wiring {
            config: &config,
            client: &client,
            metrics: &metrics,
            policy,
            shutdown: &shutdown,
            rbac,
        };
        inbound_addr = Some(wiring.serve_inbound(listener, i, creds_rx.clone())?);
    }

    let me = creds_rx
        .ready()
        .await
        .ok_or(StartError::Cancelled)?
        .identity
        .id
        .clone();
    upstreams.start_discovery(&me);
    tracing::info!(identity = %me, "certificates ready: serving");
    let mut self_registration = None;
    if let (Some(suffix), Some(client), Some(addr)) = (&config.register, &client, inbound_addr) {
        let reg = Registration::new(&config.service, suffix.as_deref(), addr);
        self_registration =
            Some(register_self(client, reg, policy.heartbeat, creds_rx.clone(), &shutdown).await);
    }

    admin.set_status(status::status_fn(
        config.service.clone(),
        inbound_addr,
        creds_rx,
        upstreams.clone(),
    ));
    admin.set_ready(true);
    on_error.disarm();

    if let Some((rx, first)) = listener_sets {
        let set = upstreams.clone();
        shutdown
            .control
            .spawn(async move { set.follow(rx, first, &exposed).await });
    }
    Ok(Running {
        inbound: inbound_addr,
        admin: admin_addr,
        admin_state: admin,
        metrics,
        upstreams,
        credentials,
        registration: self_registration,
        shutdown,
    })
}

/// Phase 2 (registration mode): follows the proxy's registration and waits
/// for its first usable listener set.
async fn follow_registration(
    client: &AgentClient,
    identity: &ProxyIdentity,
    policy: WatchPolicy,
    shutdown: &Shutdown,
) -> Result<(Receiver<ListenerSet>, Arc<ListenerSet>), StartError> {
    let proxy_id = registration::proxy_id(client, identity)
        .await
        .map_err(StartError::Registration)?;
    let publisher = Arc::new(Publisher::new());
    let mut rx = publisher.subscribe();
    shutdown.control.spawn(registration::follow(
        client.clone(),
        proxy_id.clone(),
        publisher,
        policy,
        shutdown.halt.clone(),
    ));
    tracing::info!(proxy_id = %proxy_id, "waiting for the proxy registration");
    let first = rx.ready().await.ok_or(StartError::Cancelled)?;
    Ok((rx, first))
}

/// Fills the parts of `config` a listener set decides; the public
/// listener's policy comes from `authz`.
fn apply_registration(config: &mut Config, set: &ListenerSet, authz: AuthzSource) {
    config.service = set.service.clone();
    config.inbound = set.listen.map(|listen| InboundConfig {
        listen,
        service_addr: set.service_addr.clone(),
        authz,
    });
    config.upstreams = set.upstreams.clone();
    if let Some(t) = set.local_connect_timeout {
        config.timeouts.local_connect = t;
    }
    if let Some(t) = set.handshake_timeout {
        config.timeouts.handshake = t;
    }
    if let Some(n) = set.max_inbound_conns {
        config.limits.conns = n;
    }
}

/// Binds `addr` for the listener `what` names (a flag, for the error).
fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    crate::proxy::net::listen(addr).map_err(|source| StartError::Bind {
        what: what.to_string(),
        addr,
        source,
    })
}

/// Binds a local listener (TCP or a Unix socket) for `what`.
fn bind_local(what: &str, addr: &BindAddr) -> Result<Listener, StartError> {
    Listener::bind(addr).map_err(|source| StartError::BindLocal {
        what: what.to_string(),
        addr: addr.clone(),
        source,
    })
}

fn timers(config: &Config) -> Timers {
    Timers {
        idle: config.idle_timeout,
        lifetime: config.max_lifetime,
    }
}

impl Running {
    /// The bound address of upstream `name`, when it listens on TCP.
    pub fn upstream(&self, name: &str) -> Option<SocketAddr> {
        self.upstreams.addr(name)
    }

    /// The socket file of upstream `name`, when it listens on a Unix socket.
    pub fn upstream_socket(&self, name: &str) -> Option<std::path::PathBuf> {
        self.upstreams.socket(name)
    }

    /// The names of the upstreams being served.
    pub fn upstream_names(&self) -> Vec<String> {
        self.upstreams.names()
    }

    /// Upstream `name`'s instances and their passive health.
    pub fn instances(&self, name: &str) -> Option<Vec<InstanceState>> {
        self.upstreams.instances(name)
    }

    /// Replaces the credentials used by new connections. Connections already
    /// established keep the ones they started with.
    pub fn rotate(&self, credentials: Arc<Credentials>) {
        self.credentials.publish(credentials);
    }

    /// The credentials new connections use now.
    pub fn credentials(&self) -> Option<Arc<Credentials>> {
        self.credentials.subscribe().latest()
    }

    /// Deregisters (with `-register`), stops accepting, lets open
    /// connections finish for up to `grace`, closes the rest, then stops the
    /// control plane. Returns true if every connection finished on its own.
    pub async fn shutdown(self, grace: Duration) -> bool {
        // Not ready any more: health checks stop sending work first.
        self.admin_state.set_ready(false);
        // Deregister first, so the catalog stops sending traffic our way
        // while we drain.
        if let Some(r) = &self.registration {
            r.beat.cancel();
            match register::deregister(&r.client, &r.reg).await {
                Ok(()) => tracing::info!(id = %r.reg.id, "deregistered from the agent"),
                Err(e) => tracing::warn!(id = %r.reg.id, error = %e, "deregistration failed"),
            }
        }
        self.shutdown.drain(grace).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Discovery, UpstreamConfig};

    #[test]
    fn a_listener_set_decides_identity_listeners_and_its_timeouts() {
        let args = crate::cli::parse(["ferry", "-sidecar-for", "api-1"]).unwrap();
        let (mut config, _) =
            Config::from_args(&args.proxy, &[("CONSUL_HTTP_ADDR", "127.0.0.1:8500")]).unwrap();
        let before = config.timeouts;
        let db = UpstreamConfig {
            name: "db".into(),
            bind: BindAddr::Tcp("127.0.0.1:9191".parse().unwrap()),
            discovery: Discovery::Service { datacenter: None },
            deadline: None,
            max_conns: None,
            ejection: None,
        };
        let agent = AuthzSource::Agent {
            fallback_window: config.authz_fallback_window,
            recheck_every: config.reauthorize_interval,
        };
        apply_registration(
            &mut config,
            &ListenerSet {
                service: "api".into(),
                listen: Some("0.0.0.0:21000".parse().unwrap()),
                service_addr: "127.0.0.1:8080".into(),
                local_connect_timeout: None,
                handshake_timeout: Some(Duration::from_secs(3)),
                max_inbound_conns: Some(7),
                expose: Vec::new(),
                metrics_bind: None,
                stats_bind: None,
                upstreams: vec![db.clone()],
            },
            agent.clone(),
        );
        assert_eq!(config.service, "api");
        let i = config.inbound.as_ref().expect("public listener");
        assert_eq!(i.listen, "0.0.0.0:21000".parse().unwrap());
        assert_eq!(i.service_addr, "127.0.0.1:8080");
        assert!(
            matches!(i.authz, AuthzSource::Agent { recheck_every, .. } if recheck_every == config.reauthorize_interval),
            "intentions come from the agent, with the flags' timing"
        );
        assert_eq!(config.upstreams, [db]);
        assert_eq!(config.timeouts.handshake, Duration::from_secs(3));
        assert_eq!(
            config.limits.conns, 7,
            "max_inbound_connections caps -max-conns"
        );
        assert_eq!(
            config.timeouts.local_connect, before.local_connect,
            "unset: flag value kept"
        );

        let mut no_listener = config.clone();
        apply_registration(
            &mut no_listener,
            &ListenerSet {
                service: "api".into(),
                listen: None,
                service_addr: String::new(),
                local_connect_timeout: None,
                handshake_timeout: None,
                max_inbound_conns: None,
                expose: Vec::new(),
                metrics_bind: None,
                stats_bind: None,
                upstreams: Vec::new(),
            },
            agent,
        );
        assert!(no_listener.inbound.is_none(), "port 0: no public listener");
    }

    #[tokio::test]
    async fn a_bind_failure_names_the_flag() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = bind("-listen", addr).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("-listen: cannot listen on {addr}")),
            "{text}"
        );
    }
}
