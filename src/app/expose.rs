//! Wiring the exposed paths of a registration: one plain-HTTP listener per
//! listener address, all bound before any is served.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::{bind, Shutdown, StartError};
use crate::control::ExposePath;
use crate::ops::metrics::Metrics;
use crate::proxy::expose::{self, Bounds, Exposed};

/// Binds a listener for every distinct listener address in `paths`, then
/// serves them all on the data-plane tracker (they stop with `stop`).
pub(super) fn serve_all(
    paths: &[ExposePath],
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> Result<(), StartError> {
    let mut by_listener: BTreeMap<SocketAddr, Vec<ExposePath>> = BTreeMap::new();
    for p in paths {
        by_listener.entry(p.listen).or_default().push(p.clone());
    }
    let mut bound = Vec::with_capacity(by_listener.len());
    for (addr, paths) in by_listener {
        bound.push((bind("Proxy.Expose ListenerPort", addr)?, paths));
    }
    for (listener, paths) in bound {
        let listen = listener.local_addr().ok();
        let names: Vec<&str> = paths.iter().map(|p| p.path.as_str()).collect();
        tracing::info!(listen = ?listen, paths = ?names, "exposed paths listener ready");
        let ctx = Arc::new(Exposed::new(&paths, Bounds::default(), metrics.clone()));
        shutdown.conns.spawn(expose::serve(
            listener,
            ctx,
            shutdown.stop.clone(),
            shutdown.conns.clone(),
        ));
    }
    Ok(())
}
