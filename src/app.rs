//! The supervisor: turns a [`Config`] into bound listeners and running tasks,
//! and stops them.
//!
//! Two trackers, three tokens. The data plane (listeners and connections)
//! runs on `conns`; `stop` ends the accept loops and `kill` ends connections
//! still open after the grace period. The control plane (agent watchers) runs
//! on `control` until `halt`, which fires only once the data plane is done:
//! certificates can still rotate while connections drain.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authz::{AgentAuthorizer, Authorizer};
use crate::balancer::Balancer;
use crate::config::{AuthzSource, CertSource, Config, Discovery};
use crate::consul::{AgentClient, AgentError};
use crate::control;
use crate::identity::SpiffeId;
use crate::metrics::Metrics;
use crate::register::{self, Registration};
use crate::revoke::{self, LiveConns, Revoker};
use crate::tls::Credentials;
use crate::watch::WatchPolicy;
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
}

/// A running proxy.
pub struct Running {
    /// Where the public mTLS listener is bound, if there is one.
    pub inbound: Option<SocketAddr>,
    /// Where each upstream listener is bound, by upstream name.
    pub upstreams: BTreeMap<String, SocketAddr>,
    /// Each upstream's balancer, by name (for status and tests).
    pub balancers: BTreeMap<String, Arc<Balancer>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
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
/// leaf that validate; then binds every listener and returns, so callers
/// (and tests using port 0) can connect at once. `watch_policy` times the
/// agent watchers (tests shorten it).
pub async fn start(config: Config, watch_policy: WatchPolicy) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::default());
    let stop = CancellationToken::new();
    let kill = CancellationToken::new();
    let halt = CancellationToken::new();
    let conns = TaskTracker::new();
    let control = TaskTracker::new();
    let client = match &config.agent {
        Some(a) => Some(AgentClient::new(a)?),
        None => None,
    };

    // Certificates first: nothing is bound before we can do mTLS.
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
            let first = loop {
                if let Some(c) = rx.borrow_and_update().clone() {
                    break c;
                }
                if rx.changed().await.is_err() {
                    return Err(StartError::Cancelled);
                }
            };
            (first, Some(rx))
        }
    };
    let (creds_tx, creds_rx) = watch::channel(first.clone());
    let creds_tx = Arc::new(creds_tx);
    if let Some(mut rx) = from_agent {
        let tx = creds_tx.clone();
        control.spawn(async move {
            while rx.changed().await.is_ok() {
                if let Some(c) = rx.borrow_and_update().clone() {
                    tx.send_replace(c);
                }
            }
        });
    }

    let bind = |what: String, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    // Bind everything before spawning listeners, so a failure leaves none behind.
    let inbound_listener = match &config.inbound {
        Some(i) => Some(bind("-listen".into(), i.listen).await?),
        None => None,
    };
    let mut upstream_listeners = Vec::new();
    for u in &config.upstreams {
        upstream_listeners.push(bind(format!("-upstream {}", u.name), u.bind).await?);
    }

    let mut running = Running {
        inbound: None,
        upstreams: BTreeMap::new(),
        balancers: BTreeMap::new(),
        metrics: metrics.clone(),
        credentials: creds_tx,
        registration: None,
        stop: stop.clone(),
        kill: kill.clone(),
        halt: halt.clone(),
        conns: conns.clone(),
        control: control.clone(),
    };
    let me = &first.identity.id;

    if let (Some(listener), Some(i)) = (inbound_listener, &config.inbound) {
        let addr = listener.local_addr().unwrap_or(i.listen);
        let (authz, live) = match (&i.authz, &client) {
            (AuthzSource::Static(set), _) => (Authorizer::Static(set.clone()), None),
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
                        target: config.service.clone(),
                        live: live.clone(),
                        every: *recheck_every,
                        timeout: AUTHORIZE_TIMEOUT,
                        policy: watch_policy,
                        metrics: metrics.clone(),
                    },
                    halt.clone(),
                ));
                let authz = AgentAuthorizer::new(
                    client.clone(),
                    config.service.clone(),
                    AUTHORIZE_TIMEOUT,
                    *fallback_window,
                );
                (Authorizer::Agent(authz), Some(live))
            }
            (AuthzSource::Agent { .. }, None) => return Err(StartError::NoAgent),
        };
        let ctx = Arc::new(inbound::Inbound {
            service: config.service.clone(),
            service_addr: i.service_addr.clone(),
            authz,
            credentials: creds_rx.clone(),
            timeouts: config.timeouts,
            idle_timeout: config.idle_timeout,
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
    }

    for (listener, u) in upstream_listeners.into_iter().zip(&config.upstreams) {
        let addr = listener.local_addr().unwrap_or(u.bind);
        let balancer = Arc::new(Balancer::new(config.ejection));
        let target = SpiffeId {
            service: u.name.clone(),
            ..me.clone()
        };
        let discovery = match (&u.discovery, &client) {
            (Discovery::Static(list), _) => {
                balancer.set_instances(
                    list.iter()
                        .map(|a| (*a, server_name(&target, *a)))
                        .collect(),
                );
                None
            }
            (Discovery::Service { datacenter }, Some(_)) => Some(control::Discovery::Service {
                name: u.name.clone(),
                datacenter: datacenter.clone(),
            }),
            (Discovery::Query { datacenter }, Some(_)) => Some(control::Discovery::Query {
                name: u.name.clone(),
                datacenter: datacenter.clone(),
                every: QUERY_REFRESH,
            }),
            (_, None) => return Err(StartError::NoAgent),
        };
        if let (Some(d), Some(client)) = (discovery, &client) {
            control.spawn(control::instances(
                client.clone(),
                d,
                target.clone(),
                balancer.clone(),
                watch_policy,
                halt.clone(),
            ));
        }
        let ctx = Arc::new(upstream::Upstream {
            name: u.name.clone(),
            balancer: balancer.clone(),
            credentials: creds_rx.clone(),
            attempts: config.upstream_attempts,
            timeouts: config.timeouts,
            idle_timeout: config.idle_timeout,
            metrics: metrics.clone(),
        });
        tracing::info!(upstream = %u.name, listen = %addr, sni = %target.sni(), "upstream listener ready");
        conns.spawn(upstream::serve(
            listener,
            ctx,
            stop.clone(),
            kill.clone(),
            conns.clone(),
        ));
        running.upstreams.insert(u.name.clone(), addr);
        running.balancers.insert(u.name.clone(), balancer);
    }
    Ok(running)
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
        self.upstreams.get(name).copied()
    }

    /// Replaces the credentials used by new connections. Connections already
    /// established keep the ones they started with.
    pub fn rotate(&self, credentials: Arc<Credentials>) {
        self.credentials.send_replace(credentials);
    }

    /// The credentials new connections use now.
    pub fn credentials(&self) -> Arc<Credentials> {
        self.credentials.borrow().clone()
    }

    /// Stops accepting, lets open connections finish for up to `grace`, then
    /// closes the rest, then stops the control plane. Returns true if every
    /// connection finished on its own.
    pub async fn shutdown(self, grace: Duration) -> bool {
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
