//! ferry: an L4 sidecar proxy for Consul service mesh (Consul Connect).
//!
//! Data flows one way through the modules:
//!
//! ```text
//! argv/env ─► cli ─► config (validated once, before anything binds)
//!                      │
//!                      ▼
//!                 app::start ─ owns every task; binds admin, then waits for
//!                      │        certificates, then binds the listeners
//!   control plane      │                         data plane
//!   (agent mode)       │
//!   consul (HTTP) ◄─ watch ◄─ control: roots+leaf ─► tls::Credentials ──┐
//!                            control: health ─► balancer                │
//!                            sidecar: registration ─► upstream set      │
//!                            revoke: intention changes ─► live conns    │
//!                            register: -register heartbeat              ▼
//!                                        inbound (mTLS in): handshake ─► identity ─► authz ─► dial app ─┐
//!                                        upstream (plain in): balancer ─► dial ─► handshake ─► identity ─┤
//!                                                                                 splice ◄───────────────┘
//! ```
//!
//! - [`cli`]: the command line, flag for flag with `consul connect proxy`.
//! - [`config`]: what the proxy will do; [`config::agent`]: reaching the agent.
//! - [`consul`]: the agent's HTTP API (the only module that knows URLs).
//! - [`watch`]: the blocking-query loop; [`control`]: roots, leaf and
//!   instance watchers; [`sidecar`]: registration mode; [`register`]:
//!   `-register`; [`revoke`]: closing connections intentions no longer allow.
//! - [`identity`]: SPIFFE IDs, Consul serials, SNI, reading peer certificates.
//! - [`tls`]: validated credentials and the mesh verifiers for both directions.
//! - [`authz`]: intentions, static or from the agent.
//! - [`balancer`]: round robin with passive ejection.
//! - `inbound`, `upstream`: the two listeners; [`splice`]: moving bytes;
//!   [`net`]: sockets and phase timeouts; [`conn`]: the per-connection log line.
//! - [`metrics`]: counters and gauges; [`admin`]: `/metrics`, `/ready`,
//!   `/live`, `/status`.
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
pub mod limits;
pub mod metrics;
pub mod net;
pub mod register;
pub mod revoke;
pub mod sidecar;
pub mod signal;
pub mod splice;
pub mod tickets;
pub mod tls;
mod upstream;
pub mod watch;

pub use app::{start, Running};
pub use config::Config;
