//! The exposed paths of a registration: one plain-HTTP listener per
//! listener address, bound at start (all before any is served) and kept in
//! line with the registration while ferry runs: a listener whose paths
//! changed is restarted, one no longer wanted is stopped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{bind, Shutdown, StartError};
use crate::control::ExposePath;
use crate::ops::metrics::Metrics;
use crate::proxy::expose::{self, Bounds, Exposed};

/// The running exposed-path listeners, by listener address.
pub(super) struct ExposeSet {
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    /// std lock: held for map updates only, never across an await.
    live: Mutex<BTreeMap<SocketAddr, Handle>>,
}

struct Handle {
    paths: Vec<ExposePath>,
    /// Ends this listener and its connections (child of `stop`).
    stop: CancellationToken,
    accept_loop: tokio::task::JoinHandle<()>,
}

/// `paths` grouped by listener address.
fn by_listener(paths: &[ExposePath]) -> BTreeMap<SocketAddr, Vec<ExposePath>> {
    let mut out: BTreeMap<SocketAddr, Vec<ExposePath>> = BTreeMap::new();
    for p in paths {
        out.entry(p.listen).or_default().push(p.clone());
    }
    out
}

impl ExposeSet {
    pub fn new(metrics: Arc<Metrics>, shutdown: Shutdown) -> ExposeSet {
        ExposeSet {
            metrics,
            shutdown,
            live: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<SocketAddr, Handle>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds every listener of `paths`, then serves them all, so that a
    /// bind failure leaves nothing behind.
    pub fn bind_all(&self, paths: &[ExposePath]) -> Result<(), StartError> {
        let grouped = by_listener(paths);
        let mut bound = Vec::with_capacity(grouped.len());
        for (addr, paths) in grouped {
            bound.push((addr, bind("Proxy.Expose ListenerPort", addr)?, paths));
        }
        for (addr, listener, paths) in bound {
            self.serve(addr, listener, paths);
        }
        Ok(())
    }

    fn serve(&self, addr: SocketAddr, listener: TcpListener, paths: Vec<ExposePath>) {
        let listen = listener.local_addr().unwrap_or(addr);
        let names: Vec<&str> = paths.iter().map(|p| p.path.as_str()).collect();
        tracing::info!(listen = %listen, paths = ?names, "exposed paths listener ready");
        let ctx = Arc::new(Exposed::new(
            &paths,
            Bounds::default(),
            self.metrics.clone(),
        ));
        let stop = self.shutdown.stop.child_token();
        let accept_loop = self.shutdown.conns.spawn(expose::serve(
            listener,
            ctx,
            stop.clone(),
            self.shutdown.conns.clone(),
        ));
        self.lock().insert(
            addr,
            Handle {
                paths,
                stop,
                accept_loop,
            },
        );
    }

    /// Makes the running listeners match `desired`. A bind failure is
    /// logged and the rest still applied.
    pub async fn reconcile(&self, desired: &[ExposePath]) {
        let want = by_listener(desired);
        let stale: Vec<SocketAddr> = self
            .lock()
            .iter()
            .filter(|(addr, h)| want.get(addr) != Some(&h.paths))
            .map(|(addr, _)| *addr)
            .collect();
        for addr in stale {
            let Some(h) = self.lock().remove(&addr) else {
                continue;
            };
            h.stop.cancel();
            // The port is free again once the accept loop has returned.
            let _ = h.accept_loop.await;
            tracing::info!(listen = %addr, "exposed paths listener stopped");
        }
        for (addr, paths) in want {
            if self.lock().contains_key(&addr) {
                continue;
            }
            match bind("Proxy.Expose ListenerPort", addr) {
                Ok(listener) => self.serve(addr, listener, paths),
                Err(e) => {
                    tracing::error!(listen = %addr, error = %e, "cannot start exposed paths listener")
                }
            }
        }
    }
}
