//! Caps on what a flood can make ferry hold: concurrent connections per
//! listener. (Pending inbound handshakes have their own budget, which makes
//! room instead of refusing: see [`super::admission`].)
//!
//! A limit never queues: past the cap, the new connection is closed at once
//! (a queue would only hold more sockets). Each refusal is counted in
//! `ferry_connections_refused_total{listener, limit}`; the log says so once
//! when a burst starts and then at most every 10 s with the count, never
//! once per connection — a flood must not also flood the logs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::ops::metrics::Counter;

/// How often a continuing burst of refusals is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Counts events of a burst and says when to log them: at the first, then
/// at most every `LOG_EVERY` with the count since the last line.
#[derive(Default)]
pub struct BurstLog {
    /// Events not yet reported in a log line.
    unlogged: AtomicU64,
    /// When the burst was last logged; std lock, held for a comparison.
    logged_at: Mutex<Option<Instant>>,
}

impl BurstLog {
    /// Notes `n` events; returns how many to report if a line is due now.
    pub fn note(&self, n: u64) -> Option<u64> {
        self.unlogged.fetch_add(n, Ordering::Relaxed);
        let mut last = self.logged_at.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return None;
        }
        *last = Some(Instant::now());
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }

    #[cfg(test)]
    fn unlogged(&self) -> u64 {
        self.unlogged.load(Ordering::Relaxed)
    }
}

/// A cap on concurrent holders of a permit.
pub struct Limit {
    sem: Arc<Semaphore>,
    /// The flag that sets it, for the log line.
    flag: &'static str,
    /// The listener it guards, for the log line.
    listener: String,
    max: usize,
    refused: Counter,
    burst: BurstLog,
}

impl Limit {
    /// A limit of `max` (0: no limit) on `listener`, counting refusals in `refused`.
    pub fn new(max: usize, flag: &'static str, listener: &str, refused: Counter) -> Limit {
        let permits = if max == 0 {
            Semaphore::MAX_PERMITS
        } else {
            max
        };
        Limit {
            sem: Arc::new(Semaphore::new(permits)),
            flag,
            listener: listener.to_string(),
            max,
            refused,
            burst: BurstLog::default(),
        }
    }

    /// True when no permit is left (a racing release may free one).
    pub fn is_full(&self) -> bool {
        self.sem.available_permits() == 0
    }

    /// Counts and logs a refusal decided elsewhere (e.g. after a check of
    /// [`Limit::is_full`]).
    pub fn refuse(&self) {
        self.refused.inc();
        self.maybe_log();
    }

    /// A permit, or `None` (counted and logged) when the cap is reached.
    pub fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        match self.sem.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                self.refuse();
                None
            }
        }
    }

    fn maybe_log(&self) {
        let Some(n) = self.burst.note(1) else {
            return;
        };
        tracing::warn!(
            listener = %self.listener,
            limit = self.flag,
            max = self.max,
            refused = n,
            "limit reached: refusing new connections (logged at most every 10s)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refuses_past_the_cap_and_counts() {
        let refused = Counter::default();
        let l = Limit::new(2, "-max-conns", "inbound", refused.clone());
        let a = l.try_take().expect("first");
        let _b = l.try_take().expect("second");
        assert!(l.try_take().is_none(), "third refused");
        assert!(l.try_take().is_none());
        assert_eq!(refused.get(), 2);
        drop(a);
        let _c = l.try_take().expect("a released permit is reusable");
        // The second refusal came within LOG_EVERY of the first: not logged.
        assert_eq!(l.burst.unlogged(), 1);
        tokio::time::advance(LOG_EVERY).await;
        assert!(l.try_take().is_none());
        assert_eq!(l.burst.unlogged(), 0, "logged with the count");
    }

    #[test]
    fn zero_means_unlimited() {
        let l = Limit::new(0, "-max-conns", "inbound", Counter::default());
        let held: Vec<_> = (0..10_000).map(|_| l.try_take().expect("permit")).collect();
        assert_eq!(held.len(), 10_000);
    }
}
