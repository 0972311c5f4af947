//! How everything the proxy runs is stopped: three tokens and two trackers,
//! fired in one order by [`Shutdown::drain`].
//!
//! The data plane (accept loops and connections) runs on `conns`; the
//! control plane (watchers, heartbeat, the admin server) on `control`.
//! The control plane stops last, so certificates can still rotate and
//! intentions still be re-checked while connections drain.

use std::time::Duration;

use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

/// The shutdown handles of one running proxy. Cheap to clone; every clone
/// controls the same tasks.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Fired first, by [`Shutdown::drain`]: accept loops return and their
    /// sockets close; open connections go on. Each upstream listener has a
    /// child of it, so one listener can stop alone at runtime.
    pub stop: CancellationToken,
    /// Fired by [`Shutdown::drain`] when the grace period ends with
    /// connections still open: every splice watches it and closes.
    pub kill: CancellationToken,
    /// Fired last, once the data plane is done: every control-plane task
    /// returns. Each upstream's discovery watch has a child of it.
    pub halt: CancellationToken,
    /// Tracks data-plane tasks: accept loops and every connection.
    pub conns: TaskTracker,
    /// Tracks control-plane tasks: watchers, heartbeat, admin server.
    pub control: TaskTracker,
}

/// Stops what a failed start already spawned, unless disarmed.
pub struct AbortOnDrop(Option<(DropGuard, DropGuard)>);

impl AbortOnDrop {
    /// Start succeeded: keep everything running.
    pub fn disarm(mut self) {
        if let Some((a, b)) = self.0.take() {
            a.disarm();
            b.disarm();
        }
    }
}

impl Shutdown {
    /// Fresh handles, nothing fired.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// A guard that fires `stop` and `halt` if start fails part-way.
    pub fn abort_on_drop(&self) -> AbortOnDrop {
        AbortOnDrop(Some((
            self.stop.clone().drop_guard(),
            self.halt.clone().drop_guard(),
        )))
    }

    /// Stops accepting, lets connections finish for up to `grace`, closes
    /// the rest, then stops the control plane and waits for it. Returns
    /// true if every connection finished on its own.
    pub async fn drain(&self, grace: Duration) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A connection that ignores `stop` and ends only at `kill`, and a
    /// watcher that ends at `halt`: drain fires them in that order.
    #[tokio::test(start_paused = true)]
    async fn drains_data_plane_before_control_plane() {
        let s = Shutdown::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        let (o, kill) = (order.clone(), s.kill.clone());
        s.conns.spawn(async move {
            kill.cancelled().await;
            o.lock().unwrap().push("connection closed");
        });
        let (o, halt, kill) = (order.clone(), s.halt.clone(), s.kill.clone());
        s.control.spawn(async move {
            halt.cancelled().await;
            assert!(kill.is_cancelled(), "control plane outlives the data plane");
            o.lock().unwrap().push("watcher stopped");
        });
        let clean = s.drain(Duration::from_secs(5)).await;
        assert!(!clean, "the connection had to be closed");
        assert_eq!(
            *order.lock().unwrap(),
            ["connection closed", "watcher stopped"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_finishes_in_grace_is_a_clean_drain() {
        let s = Shutdown::new();
        let stop = s.stop.clone();
        s.conns.spawn(async move { stop.cancelled().await });
        assert!(s.drain(Duration::from_secs(5)).await);
        assert!(!s.kill.is_cancelled());
    }

    #[test]
    fn a_failed_start_stops_what_it_spawned() {
        let s = Shutdown::new();
        drop(s.abort_on_drop());
        assert!(s.stop.is_cancelled() && s.halt.is_cancelled());
        let s = Shutdown::new();
        s.abort_on_drop().disarm();
        assert!(!s.stop.is_cancelled() && !s.halt.is_cancelled());
    }
}
