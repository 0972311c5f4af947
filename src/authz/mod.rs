//! Policy: deciding whether a verified peer may reach our service.
//!
//! Three kinds of source behind one [`Authorizer`]: static intentions
//! ([`intentions`], standalone mode), a remote [`Authority`] asked per
//! connection (the agent's authorize API, in `control::agent::authorize`),
//! and RBAC filters a control plane pushes as a snapshot ([`rbac`], xDS).
//! The data plane sees only this module: it never learns which control
//! plane answered.
//!
//! Owns: the decision and its reason. Must never import: the control plane,
//! the data plane, `app`, `cli`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::identity::PeerIdentity;
use crate::snapshot::Receiver;

pub mod intentions;
pub mod rbac;

pub use intentions::{Action, IntentionError, Intentions};
pub use rbac::RbacChain;

/// A decision and the reason, for the connection log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// True if the connection may proceed.
    pub allowed: bool,
    /// Which rule decided, in words.
    pub reason: String,
}

/// Why no decision could be made. The connection is refused: ferry fails
/// closed when it cannot prove a peer is allowed.
#[derive(Debug, thiserror::Error)]
#[error("cannot ask the {authority} ({why}); failing closed")]
pub struct AuthzError {
    /// Who could not be asked, e.g. "agent".
    pub authority: &'static str,
    /// What went wrong, in words.
    pub why: String,
}

/// A decision made elsewhere, asked once per connection.
pub type Pending<'a> = Pin<Box<dyn Future<Output = Result<Decision, AuthzError>> + Send + 'a>>;

/// A remote source of decisions: the narrow handle the public listener
/// holds instead of a control-plane client.
pub trait Authority: Send + Sync {
    /// Decides for a verified peer.
    fn decide<'a>(&'a self, peer: &'a PeerIdentity) -> Pending<'a>;
}

/// Where decisions come from.
#[derive(Clone)]
pub enum Authorizer {
    /// Static intentions from flags.
    Static(Intentions),
    /// A remote authority (the local agent).
    Remote(Arc<dyn Authority>),
    /// RBAC filters pushed by a control plane (xDS), latest snapshot.
    Rbac(Receiver<RbacChain>),
}

impl Authorizer {
    /// Decides for a verified peer.
    pub async fn decide(&self, peer: &PeerIdentity) -> Result<Decision, AuthzError> {
        match self {
            Authorizer::Static(i) => Ok(i.decide(&peer.id)),
            Authorizer::Remote(a) => a.decide(peer).await,
            Authorizer::Rbac(rx) => match rx.latest() {
                Some(chain) => Ok(chain.decide(peer)),
                None => Err(AuthzError {
                    authority: "control plane",
                    why: "no RBAC policy received yet".into(),
                }),
            },
        }
    }
}
