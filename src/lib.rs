//! ferry: an L4 sidecar proxy for Consul service mesh (Consul Connect).
//!
//! The folders are the architecture; data flows one way through them:
//!
//! ```text
//! argv/env ─► cli ─► config (validated once, before anything binds)
//!                      │
//!                      ▼
//!                 app::start ── the supervisor: owns every task (one Shutdown),
//!                      │        binds admin, waits for certificates, binds listeners
//!                      │
//!   control plane      │      snapshot (the seam)          data plane
//!   control::agent ────┼──►  credentials (leaf + roots) ──► proxy::inbound  (mTLS in)
//!   (the HTTP API)     │     authorization policy ───────► proxy::inbound
//!   control::xds ──────┤     each upstream's instances ──► proxy::upstream (mTLS out)
//!   (Delta ADS, gRPC)  │     the listener set ──► app        │
//!                      │                                     ▼
//!                      │               identity (SPIFFE, TLS verifiers) · authz (decisions)
//!                      │                                     │
//!                      └────────────── ops (metrics, admin, signals) ◄── every part
//! ```
//!
//! - [`cli`]: the command line, flag for flag with `consul connect proxy`.
//! - [`config`]: what the proxy will do; [`config::agent`]: reaching the agent.
//! - [`app`]: start in named phases, [`Running`], and [`app::Shutdown`].
//! - [`control`]: the control plane and the snapshot types any source must
//!   produce; [`control::agent`]: the source built on the agent's HTTP API;
//!   `control::xds` (feature `xds`, on by default): the source built on
//!   Consul's Delta ADS, behind `ferry envoy` (the `ferry-envoy` binary,
//!   so that flag mode's `ferry` links none of it).
//! - [`snapshot`]: the publisher/receiver pair those snapshots travel in.
//! - [`identity`]: SPIFFE IDs, credentials, verifiers, tickets, the dev CA.
//! - [`authz`]: intentions and the policy the public listener asks.
//! - [`proxy`]: the data plane: listeners, balancer, splice, limits, sockets.
//! - [`ops`]: metrics, the admin endpoints, signals.
//! - [`demo`]: `ferry demo`, the local mesh walk-through.
//!
//! Imports point down this list's flow: `proxy`, `identity` and `authz`
//! never import `control`, `app`, `cli` or `config`; `control` never imports
//! `app`, `cli` or the listeners; nothing imports `app`.

pub mod app;
pub mod authz;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod identity;
pub mod ops;
pub mod proxy;
pub mod snapshot;

pub use app::{start, Running};
pub use config::Config;
