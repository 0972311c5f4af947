//! ferry: an L4 sidecar proxy for Consul service mesh (Consul Connect).
//!
//! Data flows one way through the modules:
//!
//! ```text
//! argv ─► cli ─► config (validated once; certificates read and checked)
//!                   │
//!                   ▼
//!                  app::start ─ binds listeners, owns every task
//!          ┌────────┴─────────────────────────┐
//!   inbound (mTLS in)                  upstream (plain in, mTLS out)
//!   handshake ─► identity ─► authz      balancer ─► dial ─► handshake ─► identity
//!          └──► dial local app               │
//!                   └────────► splice ◄──────┘   (both ways, half-close, counts)
//! ```
//!
//! - [`cli`]: the command line, Go-flag compatible with `consul connect proxy`.
//! - [`config`]: what the proxy will do, validated before anything binds.
//! - [`identity`]: SPIFFE IDs, Consul serials, SNI, reading peer certificates.
//! - [`tls`]: validated credentials and the mesh verifiers for both directions.
//! - [`authz`]: intentions (who may connect).
//! - [`balancer`]: round robin with passive ejection.
//! - [`inbound`], [`upstream`]: the two listeners; [`splice`]: moving bytes;
//!   [`net`]: sockets and phase timeouts; [`conn`]: the per-connection log line.
//! - [`metrics`]: counters at each decision point.
//! - [`certs`]: the development CA behind `ferry certs`, tests and benches.
//! - [`demo`]: `ferry demo`, the local mesh walk-through.

pub mod admin;
pub mod app;
pub mod authz;
pub mod balancer;
pub mod certs;
pub mod cli;
pub mod config;
pub mod conn;
pub mod consul;
pub mod control;
pub mod demo;
pub mod identity;
mod inbound;
pub mod metrics;
pub mod net;
pub mod register;
pub mod revoke;
pub mod sidecar;
pub mod signal;
pub mod splice;
pub mod tls;
mod upstream;
pub mod watch;

pub use app::{start, Running};
pub use config::Config;
