//! The data plane: listeners, connections and the bytes between them.
//!
//! - [`inbound`]: the public mTLS listener (mesh peers in, local app out);
//! - [`upstream`]: the local listeners (our app in, mTLS to an instance out);
//! - [`balancer`]: round robin over an upstream's instances, with ejection;
//! - [`expose`]: plain-HTTP listeners for exposed paths (`Proxy.Expose`);
//! - [`splice`]: moving bytes both ways with half-close;
//! - [`limits`]: caps on what a flood can make ferry hold;
//! - [`net`]: sockets, accept, phase timeouts; [`report`]: the per-connection
//!   log line; [`live`]: the open inbound connections a policy change may close.
//!
//! Owns: everything per connection. Reads snapshots (credentials, policy,
//! instances) and never asks for them. Must never import: `control`, `app`,
//! `cli`, `config`.

use std::time::Duration;

pub mod admission;
pub mod balancer;
pub mod expose;
pub mod inbound;
pub mod limits;
pub mod live;
pub mod net;
pub mod report;
pub mod splice;
pub mod upstream;

/// Timeouts for each slow phase of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TLS handshake, inbound and outbound. Default 10 s, as Consul's
    /// `handshake_timeout_ms`: bounds how long a client that never finishes
    /// can hold a socket and a task.
    pub handshake: Duration,
    /// TCP connect to the local app. Default 1 s (Consul's
    /// `local_connect_timeout_ms`): the app is on loopback, so a slow
    /// connect means it is not there.
    pub local_connect: Duration,
    /// One TCP connect to an upstream instance. Default 1 s: an instance that
    /// does not answer a SYN that fast is better skipped for the next one.
    pub upstream_connect: Duration,
    /// Everything needed to find a working instance for one connection.
    /// Default 10 s, Consul's upstream `connect_timeout_ms`.
    pub upstream_deadline: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            handshake: Duration::from_secs(10),
            local_connect: Duration::from_secs(1),
            upstream_connect: Duration::from_secs(1),
            upstream_deadline: Duration::from_secs(10),
        }
    }
}
