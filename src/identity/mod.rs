//! Identity: who we are and who a peer is, and the TLS that proves it.
//!
//! - [`spiffe`]: SPIFFE IDs, Consul serials, SNI, reading peer certificates;
//! - [`tls`]: validated credentials and the mesh verifiers for both directions;
//! - [`tickets`]: TLS session tickets kept per upstream instance;
//! - [`chain_only`]: a client that checks only the chain (the agent's gRPC
//!   port over TLS, as an xDS bootstrap asks);
//! - [`dev_ca`]: the development CA behind `ferry certs`, tests and benches.
//!
//! Owns: certificates and their checks. Must never import: the control
//! plane, the data plane, `app`, `cli`, `config`.

pub mod chain_only;
pub mod dev_ca;
pub mod spiffe;
pub mod tickets;
pub mod tls;

pub use spiffe::{colon_hex, peer_identity, IdentityError, PeerIdentity, SpiffeId};
