//! Test support: what the scenarios in `tests/it/` share, so that each
//! test spells out only what it proves. Every socket is on 127.0.0.1.
//!
//! What support owns:
//! - Fakes: the Consul agent ([`fake_agent`]), and local apps and upstream
//!   instances without a ferry, plain and mTLS echo servers that count
//!   their connections (`apps`).
//! - PKI: a dev CA on disk laid out as `-certs` expects, leaves as specified,
//!   and raw mesh clients presenting any certificate (`pki`).
//! - Process helpers: ferry started in-process from real flags or as the
//!   real binary with its stderr collected, and the flags of a standalone
//!   ferry, spelled once (`proxy`); mesh pairs and mesh connections
//!   (`mesh`); bytes on sockets (`net`); what an operator reads (`ops`).
//! - Waits: [`eventually`] and [`within`], conditions and futures bounded by
//!   [`DEADLINE`], failing with what they waited for (`wait`).
//!
//! What it must never do:
//! - Sleep and hope: a wait is on a condition or an event, with a deadline;
//!   never a fixed pause after which a test assumes something happened.
//! - Use fixed ports: listeners bind 127.0.0.1:0 and report their address;
//!   a test that needs a port before anything binds it takes one from the
//!   kernel ([`dead_addr`]) and says why, or, when a proxy binds it later
//!   while other tests open many connections, one below the kernel's
//!   ephemeral range that no other socket is given meanwhile
//!   ([`spare_addr`]).
//! - Touch the process environment: nothing sets or removes variables;
//!   in-process ferries read their configuration with [`NO_ENV`], and the
//!   binary starts from a cleared environment (only allocator tuning,
//!   `MALLOC_*`, passes through, for the soak).

#![allow(dead_code)] // not every test module uses every helper

#[cfg(feature = "xds")]
pub mod ads;
pub mod envoy;
pub mod fake_agent;

mod apps;
mod mesh;
mod net;
mod ops;
mod pki;
mod proxy;
mod target;
mod wait;

pub use apps::*;
pub use mesh::*;
pub use net::*;
pub use ops::*;
pub use pki::*;
pub use proxy::*;
pub use target::*;
pub use wait::*;
