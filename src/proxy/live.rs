//! The authorized inbound connections that are open now, so that a policy
//! change can close exactly the ones it no longer allows. The public
//! listener registers each connection; a control-plane watcher (intention
//! re-checks today, an RBAC update from xDS later) closes by source.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio_util::sync::CancellationToken;

use crate::authz::Decision;
use crate::identity::PeerIdentity;

/// The authorized inbound connections that are open now.
#[derive(Default)]
pub struct LiveConns {
    next: AtomicU64,
    /// Per connection: the peer and the token that closes it. std lock:
    /// held only to insert, remove or snapshot.
    conns: Mutex<HashMap<u64, Entry>>,
}

struct Entry {
    peer: PeerIdentity,
    close: CancellationToken,
    why: Arc<OnceLock<String>>,
}

/// Keeps a connection in [`LiveConns`] while it lives.
pub struct Registered {
    live: Arc<LiveConns>,
    id: u64,
    /// Fires when the connection must close because it was revoked.
    pub close: CancellationToken,
    why: Arc<OnceLock<String>>,
}

impl Registered {
    /// Why the connection was revoked, if it was.
    pub fn revoked(&self) -> Option<&str> {
        self.why.get().map(String::as_str)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.live
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl LiveConns {
    /// Records a connection from `peer`; `close` is the token its splice
    /// watches (a child of the proxy's kill token).
    pub fn register(self: &Arc<Self>, peer: PeerIdentity, close: CancellationToken) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let why = Arc::new(OnceLock::new());
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Entry {
                peer,
                close: close.clone(),
                why: why.clone(),
            },
        );
        Registered {
            live: self.clone(),
            id,
            close,
            why,
        }
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each distinct peer with a live connection.
    pub fn sources(&self) -> Vec<PeerIdentity> {
        let map = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashSet::new();
        map.values()
            .filter(|e| seen.insert(e.peer.id.to_string()))
            .map(|e| e.peer.clone())
            .collect()
    }

    /// Closes every connection from `uri`; returns how many.
    pub fn close_from(&self, uri: &str, reason: &str) -> usize {
        let map = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for e in map.values().filter(|e| e.peer.id.to_string() == uri) {
            let _ = e.why.set(format!("intention revoked: {reason}"));
            e.close.cancel();
            n += 1;
        }
        n
    }

    /// Closes every live connection whose source `decide` now denies (a
    /// new policy snapshot); returns how many. Sources are asked once each.
    pub fn close_denied(&self, decide: impl Fn(&PeerIdentity) -> Decision) -> usize {
        let mut closed = 0;
        for peer in self.sources() {
            let d = decide(&peer);
            if !d.allowed {
                closed += self.close_from(&peer.id.to_string(), &d.reason);
            }
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SpiffeId;

    #[test]
    fn a_new_policy_closes_exactly_the_sources_it_denies() {
        let live = Arc::new(LiveConns::default());
        let peer = |svc: &str| PeerIdentity {
            id: SpiffeId::service("td.consul", "dc1", svc),
            serial: "01".into(),
        };
        let web = live.register(peer("web"), CancellationToken::new());
        let billing1 = live.register(peer("billing"), CancellationToken::new());
        let billing2 = live.register(peer("billing"), CancellationToken::new());
        let closed = live.close_denied(|p| Decision {
            allowed: p.id.service != "billing",
            reason: "RBAC policy deny-billing (deny)".into(),
        });
        assert_eq!(closed, 2);
        assert!(billing1.close.is_cancelled() && billing2.close.is_cancelled());
        assert!(!web.close.is_cancelled());
        assert_eq!(
            billing1.revoked(),
            Some("intention revoked: RBAC policy deny-billing (deny)")
        );
        drop((billing1, billing2));
        assert_eq!(live.len(), 1, "closed connections leave the table");
    }
}
