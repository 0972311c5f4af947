//! Counters at each decision point of the data plane.
//!
//! Plain relaxed atomics: an increment costs a few nanoseconds and nothing on
//! the hot path allocates or locks. The admin endpoint (issue-level work to
//! come) renders these; tests read them directly.

use std::sync::atomic::{AtomicU64, Ordering};

/// One counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Subtracts one (gauges only).
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every counter ferry keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Inbound connections accepted.
    pub inbound_accepted: Counter,
    /// Inbound connections open now (gauge).
    pub inbound_active: Counter,
    /// Inbound handshakes that failed or timed out.
    pub inbound_handshake_failed: Counter,
    /// Inbound connections allowed by intentions.
    pub authz_allowed: Counter,
    /// Inbound connections denied by intentions.
    pub authz_denied: Counter,
    /// Inbound connections refused because no decision could be made.
    pub authz_error: Counter,
    /// Live inbound connections closed because an intention now denies them.
    pub revoked: Counter,
    /// Inbound connections whose local application could not be reached.
    pub local_connect_failed: Counter,
    /// Bytes from mesh peers to the local application.
    pub inbound_bytes_in: Counter,
    /// Bytes from the local application to mesh peers.
    pub inbound_bytes_out: Counter,
    /// Upstream (outbound) connections accepted from the local app.
    pub upstream_accepted: Counter,
    /// Upstream connections open now (gauge).
    pub upstream_active: Counter,
    /// Failed attempts to connect to or handshake with an instance.
    pub upstream_attempt_failed: Counter,
    /// Attempts beyond the first for one connection.
    pub upstream_retries: Counter,
    /// Instances ejected.
    pub upstream_ejections: Counter,
    /// Upstream connections that found no instance to use.
    pub upstream_unavailable: Counter,
    /// Bytes from the local app to upstream instances.
    pub upstream_bytes_out: Counter,
    /// Bytes from upstream instances to the local app.
    pub upstream_bytes_in: Counter,
}
