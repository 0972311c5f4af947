//! xDS mode (`ferry envoy`): the agent's xDS server configures everything.
//! Starts the xDS source, waits for its first complete configuration,
//! splits each one into the snapshots the supervisor feeds its listeners
//! (listener set, certificates, RBAC, instances), then starts as usual.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{serve_admin, start_with, Feeds, Running, Shutdown, StartError};
use crate::config::Config;
use crate::control::agent::WatchPolicy;
use crate::control::xds::bootstrap::Bootstrap;
use crate::control::xds::{self, Applied, Backoff};
use crate::control::{Publisher, Receiver};
use crate::ops::metrics::Metrics;

/// Starts a proxy configured over xDS from `boot`; `config` carries
/// ferry's own operational settings (see
/// [`Config::for_control_plane`]). Returns once the first complete
/// configuration is served.
pub async fn start(
    boot: Bootstrap,
    mut config: Config,
    backoff: Backoff,
) -> Result<Running, StartError> {
    if config.admin.is_none() {
        config.admin = boot.admin;
    }
    for name in &boot.ignored_listeners {
        tracing::warn!(listener = %name, "bootstrap static listener ignored (ferry serves only the Prometheus metrics listener)");
    }
    let shutdown = Shutdown::new();
    let on_error = shutdown.abort_on_drop();
    let metrics = Arc::new(Metrics::default());
    let applied = Arc::new(Publisher::<Applied>::new());
    let mut rx = applied.subscribe();
    tracing::info!(node = %boot.node_id, agent = ?boot.agent, "waiting for the configuration from the agent's xDS server");
    shutdown.control.spawn(xds::run(
        boot.clone(),
        applied,
        backoff,
        shutdown.halt.clone(),
        metrics.clone(),
    ));
    let first = rx.ready().await.ok_or(StartError::Cancelled)?;
    let feeds = split(rx, &first, &shutdown);
    on_error.disarm();
    let running = start_with(
        config,
        WatchPolicy::default(),
        shutdown,
        metrics,
        Some(feeds),
    )
    .await?;
    if let Some(addr) = boot.prometheus {
        serve_metrics(addr, &running)?;
    }
    Ok(running)
}

/// The bootstrap's Prometheus listener: ferry's admin endpoints, whose
/// `/metrics` is the scrape path Consul configures by default.
fn serve_metrics(addr: SocketAddr, running: &Running) -> Result<(), StartError> {
    serve_admin(Some(addr), &running.admin_state, &running.shutdown).map(|_| ())
}

/// Republishes each part of every configuration on its own channel, only
/// when that part changed (the source reuses unchanged parts).
fn split(mut rx: Receiver<Applied>, first: &Arc<Applied>, shutdown: &Shutdown) -> Feeds {
    let sets = Arc::new(Publisher::new());
    let creds = Arc::new(Publisher::new());
    let rbac = Arc::new(Publisher::new());
    let instances = Arc::new(Publisher::new());
    sets.publish(first.listeners.clone());
    creds.publish(first.credentials.clone());
    rbac.publish(first.rbac.clone());
    instances.publish(first.instances.clone());
    let feeds = Feeds {
        sets: (sets.subscribe(), first.listeners.clone()),
        credentials: creds.subscribe(),
        rbac: rbac.subscribe(),
        instances: instances.subscribe(),
    };
    let halt = shutdown.halt.clone();
    let mut last = first.clone();
    shutdown.control.spawn(async move {
        loop {
            let next = tokio::select! {
                n = rx.changed() => match n {
                    Some(n) => n,
                    None => return,
                },
                _ = halt.cancelled() => return,
            };
            // Instances and identities before the listeners that use them.
            if !Arc::ptr_eq(&next.credentials, &last.credentials) {
                creds.publish(next.credentials.clone());
            }
            if !Arc::ptr_eq(&next.instances, &last.instances) {
                instances.publish(next.instances.clone());
            }
            if !Arc::ptr_eq(&next.rbac, &last.rbac) {
                rbac.publish(next.rbac.clone());
            }
            if !Arc::ptr_eq(&next.listeners, &last.listeners) {
                sets.publish(next.listeners.clone());
            }
            last = next;
        }
    });
    feeds
}
