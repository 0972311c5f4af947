//! The control-plane source built on the Consul agent's HTTP API: the
//! client and every body it sends or reads, HTTPS to the agent, the
//! blocking-query loop, and the watchers that publish snapshots from it.
//!
//! - [`client`], [`api`], `https`: speaking the API (spec §1);
//! - [`watch`]: the blocking-query loop every watcher runs, and its timing;
//! - [`credentials`]: roots + leaf → the credentials snapshot;
//! - [`instances`]: healthy instances → each upstream's balancer;
//! - [`authorize`]: the agent's authorize call as the inbound policy;
//! - [`revoke`]: re-checking live connections when intentions change;
//! - [`registration`]: registration mode (`-proxy-id`, `-sidecar-for`) →
//!   the listener set;
//! - [`register`]: `-register`, the proxy registering itself.
//!
//! Must never import: `proxy::inbound`, `proxy::upstream`, `app`, `cli`.

pub mod api;
pub mod authorize;
pub mod client;
pub mod credentials;
mod https;
pub mod instances;
pub mod register;
pub mod registration;
pub mod revoke;
pub mod tuning;
pub mod watch;

pub use api::{Blocking, Reply};
pub use client::{AgentClient, AgentError};

use std::time::Duration;

/// Timing of everything that talks to the agent: the watch loops and the
/// `-register` heartbeat. Tests shorten it; `Default` is production.
#[derive(Debug, Clone, Copy)]
pub struct WatchPolicy {
    /// `wait` sent with each blocking call. Default 5 min, Consul's default.
    pub wait: Duration,
    /// Steady-state minimum interval between calls (token refill). Default
    /// 1 s: faster than any human change, slow enough to spare the agent
    /// under churn.
    pub min_interval: Duration,
    /// First retry delay after an error. Default 1 s.
    pub backoff_base: Duration,
    /// Longest retry delay. Default 30 s: the agent coming back is noticed
    /// within that, and a down agent sees two calls a minute per watcher.
    pub backoff_max: Duration,
    /// `-register`'s TTL heartbeat interval. Default 10 s, a third of the
    /// 30 s TTL, as Consul's proxy does.
    pub heartbeat: Duration,
}

impl Default for WatchPolicy {
    fn default() -> WatchPolicy {
        WatchPolicy {
            wait: Duration::from_secs(300),
            min_interval: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            heartbeat: register::HEARTBEAT,
        }
    }
}
