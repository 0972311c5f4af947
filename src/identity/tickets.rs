//! TLS session tickets for upstream connections, kept per instance.
//!
//! rustls' default client cache is keyed by server name and keeps eight TLS
//! 1.3 tickets per name. Both defaults hurt a sidecar:
//! - every instance of an upstream shares one name (Consul's SNI names the
//!   service, not the instance) while each instance can only redeem its own
//!   tickets, so a round-robin client would mostly offer a ticket to the
//!   wrong instance and pay for a full handshake anyway;
//! - eight tickets run out as soon as more than eight connections start at
//!   once, and every connection after that is a full handshake.
//!
//! So each instance gets its own small store. A resumed connection skips the
//! certificate signatures and chain checks; the server identity it carries
//! is the one verified at the full handshake that issued the ticket.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;
use rustls::NamedGroup;

/// TLS 1.3 tickets kept per instance: enough for a burst of this many
/// concurrent new connections to resume. Each holds the server's chain
/// (about 1–2 KiB), so this bounds the memory per instance too.
pub const TICKETS_PER_INSTANCE: usize = 32;

/// The session store of one upstream instance. Every name it is asked about
/// is that instance's, so names are ignored.
#[derive(Debug, Default)]
pub struct InstanceTickets {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    kx_hint: Option<NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
    tls13: VecDeque<Tls13ClientSessionValue>,
}

impl InstanceTickets {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing here can be left half-updated by a panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClientSessionStore for InstanceTickets {
    fn set_kx_hint(&self, _: ServerName<'static>, group: NamedGroup) {
        self.lock().kx_hint = Some(group);
    }

    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        self.lock().kx_hint
    }

    fn set_tls12_session(&self, _: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.lock().tls12 = Some(value);
    }

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.lock().tls12.clone()
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {
        self.lock().tls12 = None;
    }

    fn insert_tls13_ticket(&self, _: ServerName<'static>, value: Tls13ClientSessionValue) {
        let mut inner = self.lock();
        if inner.tls13.len() == TICKETS_PER_INSTANCE {
            inner.tls13.pop_front();
        }
        inner.tls13.push_back(value);
    }

    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        // The newest ticket is the least likely to have expired.
        self.lock().tls13.pop_back()
    }
}
