//! The operator's listeners: `-admin-addr`, and in registration mode
//! Envoy's stats and Prometheus bind addresses, all served by the one
//! [`Admin`].

use std::net::SocketAddr;
use std::sync::Arc;

use crate::control::ListenerSet;
use crate::ops::admin::{self, Admin};

use super::{bind, Shutdown, StartError};

/// Phase 1: the admin listener, so `/ready` can say "not yet" while the
/// rest starts.
pub(super) fn serve_admin(
    addr: Option<SocketAddr>,
    admin: &Arc<Admin>,
    shutdown: &Shutdown,
) -> Result<Option<SocketAddr>, StartError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = bind("-admin-addr", addr)?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(listen = %bound, "admin listener ready (/metrics /ready /live /status)");
    shutdown.control.spawn(admin::serve(
        listener,
        admin.clone(),
        shutdown.control.clone(),
        shutdown.halt.clone(),
    ));
    Ok(Some(bound))
}

/// Registration mode: Envoy's `envoy_stats_bind_addr` (the admin
/// endpoints) and `envoy_prometheus_bind_addr` (`/metrics`), served
/// beside `-admin-addr` so that scrapers configured for Envoy find ferry.
pub(super) fn serve_envoy_compat(
    set: &ListenerSet,
    admin: &Arc<Admin>,
    shutdown: &Shutdown,
) -> Result<(), StartError> {
    if let Some(addr) = set.stats_bind {
        let listener = bind("envoy_stats_bind_addr", addr)?;
        tracing::info!(listen = %listener.local_addr().unwrap_or(addr), "admin endpoints on envoy_stats_bind_addr");
        shutdown.control.spawn(admin::serve(
            listener,
            admin.clone(),
            shutdown.control.clone(),
            shutdown.halt.clone(),
        ));
    }
    if let Some(addr) = set.metrics_bind {
        let listener = bind("envoy_prometheus_bind_addr", addr)?;
        tracing::info!(listen = %listener.local_addr().unwrap_or(addr), "/metrics on envoy_prometheus_bind_addr");
        shutdown.control.spawn(admin::serve_metrics(
            listener,
            admin.clone(),
            shutdown.control.clone(),
            shutdown.halt.clone(),
        ));
    }
    Ok(())
}
