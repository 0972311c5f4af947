//! The control plane: where the proxy learns what to do, and the snapshots
//! it hands the data plane.
//!
//! A control-plane source produces four kinds of snapshot, each built whole,
//! validated, and only then published (see [`crate::snapshot`]):
//!
//! | snapshot | type | read by |
//! | --- | --- | --- |
//! | credentials (leaf + roots) | [`Publisher`]`<`[`Credentials`](crate::identity::tls::Credentials)`>` | every listener, per connection |
//! | authorization policy | [`Authorizer`](crate::authz::Authorizer) | the public listener, per connection |
//! | each upstream's instances | [`Balancer::set_instances`](crate::proxy::balancer::Balancer::set_instances) | that upstream's listener, per connection |
//! | the listener set | [`Publisher`]`<`[`ListenerSet`]`>` | the supervisor, which binds and stops listeners |
//!
//! [`agent`] is the source built on the Consul agent's HTTP API; `xds`
//! (feature `xds`) beside it is the source built on Consul's Delta ADS over
//! gRPC, and produces the same types: nothing under `proxy/` knows which
//! one is in use.
//!
//! Owns: talking to a control plane and turning its answers into those
//! snapshots. Must never import: `proxy::inbound`, `proxy::upstream` or
//! `app` (the data plane and the supervisor consume snapshots; they are
//! not called from here), nor `cli`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::UpstreamConfig;
pub use crate::proxy::expose::{ExposePath, Protocol as ExposeProtocol};
pub use crate::snapshot::{Publisher, Receiver};

pub mod agent;
#[cfg(feature = "xds")]
pub mod xds;

/// Each upstream's instances, by upstream name, each with the TLS server
/// name (SNI) to send, its failover tier and identity: what a control plane
/// that pushes endpoints (xDS) hands the upstream listeners.
pub type Instances = std::collections::BTreeMap<String, Vec<crate::proxy::balancer::Target>>;

/// What the proxy should serve: its identity, public listener, local app
/// and upstreams. A registration (agent mode) describes it today, a
/// listener set from xDS later; the supervisor applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerSet {
    /// The service we represent (`Proxy.DestinationServiceName`).
    pub service: String,
    /// The public listener, unless the port is 0.
    pub listen: Option<SocketAddr>,
    /// The local app.
    pub service_addr: String,
    /// `local_connect_timeout_ms`, if set.
    pub local_connect_timeout: Option<Duration>,
    /// `handshake_timeout_ms`, if set.
    pub handshake_timeout: Option<Duration>,
    /// `max_inbound_connections`: the public listener's cap on established
    /// connections, if set (else `-max-conns`).
    pub max_inbound_conns: Option<usize>,
    /// The upstreams, in registration order.
    pub upstreams: Vec<UpstreamConfig>,
    /// Exposed paths (`Proxy.Expose.Paths`).
    pub expose: Vec<ExposePath>,
    /// `envoy_prometheus_bind_addr`: where to serve `/metrics` too.
    pub metrics_bind: Option<SocketAddr>,
    /// `envoy_stats_bind_addr`: where to serve the admin endpoints too.
    pub stats_bind: Option<SocketAddr>,
}
