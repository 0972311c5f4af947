//! The supervisor: turns a [`Config`] into bound listeners and running tasks,
//! and stops them.
//!
//! Shutdown uses two tokens and one tracker: `stop` ends the accept loops,
//! `kill` ends connections still open after the grace period. Every task
//! (listeners and connections) is spawned on the tracker, so `shutdown` can
//! wait for all of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balancer::Balancer;
use crate::config::Config;
use crate::identity::SpiffeId;
use crate::metrics::Metrics;
use crate::tls::Credentials;
use crate::{inbound, upstream};

/// Errors starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{what}: cannot listen on {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
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
    credentials: watch::Sender<Arc<Credentials>>,
    stop: CancellationToken,
    kill: CancellationToken,
    tracker: TaskTracker,
}

/// Binds every listener and starts serving. Returns once all listeners are
/// bound, so callers (and tests using port 0) can connect immediately.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::default());
    let (credentials, creds_rx) = watch::channel(config.credentials.clone());
    let stop = CancellationToken::new();
    let kill = CancellationToken::new();
    let tracker = TaskTracker::new();
    let bind = |what: String, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };

    // Bind everything before spawning anything, so a failure leaves nothing behind.
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
        credentials,
        stop: stop.clone(),
        kill: kill.clone(),
        tracker: tracker.clone(),
    };
    let me = &config.credentials.identity.id;

    if let (Some(listener), Some(i)) = (inbound_listener, &config.inbound) {
        let addr = listener.local_addr().unwrap_or(i.listen);
        let ctx = Arc::new(inbound::Inbound {
            service: config.service.clone(),
            service_addr: i.service_addr.clone(),
            authz: crate::authz::Authorizer::Static(i.intentions.clone()),
            credentials: creds_rx.clone(),
            timeouts: config.timeouts,
            idle_timeout: config.idle_timeout,
            metrics: metrics.clone(),
        });
        tracing::info!(identity = %me, listen = %addr, service_addr = %i.service_addr, "inbound listener ready");
        tracker.spawn(inbound::serve(
            listener,
            ctx,
            stop.clone(),
            kill.clone(),
            tracker.clone(),
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
        balancer.set_instances(
            u.instances
                .iter()
                .map(|a| (*a, server_name(&target, *a)))
                .collect(),
        );
        let ctx = Arc::new(upstream::Upstream {
            name: u.name.clone(),
            balancer: balancer.clone(),
            credentials: creds_rx.clone(),
            attempts: config.upstream_attempts,
            timeouts: config.timeouts,
            idle_timeout: config.idle_timeout,
            metrics: metrics.clone(),
        });
        tracing::info!(upstream = %u.name, listen = %addr, instances = u.instances.len(), sni = %target.sni(), "upstream listener ready");
        tracker.spawn(upstream::serve(
            listener,
            ctx,
            stop.clone(),
            kill.clone(),
            tracker.clone(),
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

    /// Stops accepting, lets open connections finish for up to `grace`, then
    /// closes the rest. Returns true if every connection finished on its own.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.stop.cancel();
        self.tracker.close();
        let clean = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok();
        if !clean {
            self.kill.cancel();
            self.tracker.wait().await;
        }
        clean
    }
}
