//! Admission control for connections that have not finished their TLS
//! handshake: a budget of its own, which makes room instead of refusing.
//!
//! A flood of clients that connect and never finish (half-open sockets,
//! stalled ClientHellos) must neither hold memory without bound nor lock
//! honest peers out. A cap that refuses newcomers does the first and fails
//! the second: the junk takes every slot first, and then every honest
//! handshake is refused until the junk times out. So this budget, when
//! full, closes the pending handshake that is worth least and admits the
//! newcomer:
//!
//! 1. least progress first: a connection that has sent nothing is the
//!    cheapest to drop (it costs the peer nothing to open another, and an
//!    honest client sends its ClientHello at once); then one whose
//!    ClientHello is still incomplete; then one waiting on the rest;
//! 2. among equals, the oldest: an honest handshake finishes in a few round
//!    trips, so the one that has waited longest is the likeliest junk.
//!
//! A connection younger than [`FIRST_LOOK`] is spared while an older one
//! remains: until its task has read what the peer sent, an honest client
//! looks as silent as junk.
//!
//! An honest client has sent a complete ClientHello within one round trip
//! of connecting, so it is evicted only after every silent and partial
//! connection, and then only after `budget` newer arrivals. Among pending
//! handshakes that made the same progress, one from an address holding more
//! than its share (`per_source`) that has lasted past [`SHARE_GRACE`] gives
//! first, so one address cannot keep the budget from others; a busy honest address (a sidecar opening many connections
//! at once) is still never evicted ahead of silent or stalled junk, and
//! while there is room nothing is limited at all.
//! While the budget is under pressure (three quarters full), a pending
//! handshake older than [`PRESSURE_DEADLINE`] is closed too. Established
//! connections have their own budget (`-max-conns`) and are never closed
//! to make room.
//!
//! Each eviction is counted in `ferry_handshake_evictions_total{listener,
//! reason}` and logged once per burst; `ferry_handshakes_pending{listener}`
//! is the gauge of what is held.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::limits::BurstLog;
use crate::ops::metrics::{Counter, Gauge, Metrics};

/// The handshake deadline while the budget is under pressure: ten times a
/// slow intercontinental round trip, and a fifth of the default
/// `-handshake-timeout`.
pub const PRESSURE_DEADLINE: Duration = Duration::from_secs(2);

/// How long a new connection is spared eviction while older ones remain:
/// time for its task to read what the peer sent, so its progress is seen.
/// An honest client's ClientHello is already in the socket by then.
pub const FIRST_LOOK: Duration = Duration::from_millis(100);

/// How long a pending handshake is spared the per-address share: an honest
/// handshake is done within a round trip or two, so one that has lasted this
/// long from an address holding more than its share is likely junk.
pub const SHARE_GRACE: Duration = Duration::from_millis(250);

/// How far a pending handshake has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Progress {
    /// Connected, nothing received.
    Silent = 0,
    /// Some bytes received; the ClientHello is not complete.
    Partial = 1,
    /// A whole ClientHello received; waiting for certificates or the
    /// rest of the handshake.
    Hello = 2,
}

impl Progress {
    fn from_u8(v: u8) -> Progress {
        match v {
            0 => Progress::Silent,
            1 => Progress::Partial,
            _ => Progress::Hello,
        }
    }
}

/// Why a pending handshake was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// The budget was full.
    Budget,
    /// The budget was full, and among the least advanced its source address
    /// held more than its share.
    Source,
    /// Older than [`PRESSURE_DEADLINE`] while the budget was under pressure.
    Slow,
}

impl Eviction {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Eviction::Budget => "budget",
            Eviction::Source => "source",
            Eviction::Slow => "slow",
        }
    }

    /// In words, for the connection's log line.
    pub fn describe(self) -> &'static str {
        match self {
            Eviction::Budget => "closed to make room: the pending-handshake budget was full",
            Eviction::Source => "closed to make room: the pending-handshake budget was full and its address held more than its share",
            Eviction::Slow => "closed: handshake too slow while the pending-handshake budget was under pressure",
        }
    }
}

/// The budget of pending handshakes of one listener.
pub struct Admission {
    listener: String,
    /// Most pending handshakes (0: no budget, nothing is evicted).
    budget: usize,
    /// Most pending handshakes per source address (0: no cap).
    per_source: usize,
    /// std lock: held for a scan of at most `budget` entries, never across
    /// an await.
    state: Mutex<State>,
    pending: Gauge,
    evicted: [Counter; 3],
    burst: BurstLog,
}

#[derive(Default)]
struct State {
    next: u64,
    entries: HashMap<u64, Entry>,
    by_source: HashMap<IpAddr, usize>,
}

struct Entry {
    source: IpAddr,
    since: Instant,
    progress: Arc<AtomicU8>,
    evict: CancellationToken,
    why: Arc<Mutex<Option<Eviction>>>,
}

/// One admitted pending handshake; dropping it frees its place.
pub struct Pending {
    admission: Arc<Admission>,
    id: u64,
    progress: Arc<AtomicU8>,
    /// Fires when this handshake is evicted.
    evict: CancellationToken,
    why: Arc<Mutex<Option<Eviction>>>,
}

impl Admission {
    /// A budget of `budget` pending handshakes on `listener`, at most
    /// `per_source` from one address.
    pub fn new(listener: &str, budget: usize, per_source: usize, metrics: &Metrics) -> Admission {
        Admission {
            listener: listener.to_string(),
            budget,
            per_source,
            state: Mutex::new(State::default()),
            pending: metrics.pending(listener),
            evicted: [Eviction::Budget, Eviction::Source, Eviction::Slow]
                .map(|e| metrics.evictions(listener, e.label())),
            burst: BurstLog::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection from `source`, closing older pending
    /// handshakes first where the budget requires it. Never refuses.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Pending {
        let now = Instant::now();
        let mut evicted = 0u64;
        let mut st = self.lock();
        if self.budget > 0 {
            if st.entries.len() >= self.budget {
                // Full: a handshake younger than FIRST_LOOK is spared while
                // there is an older one (an unpolled honest connection looks
                // silent); then the least progress gives first; among equals, an
                // address over its share whose handshake has lasted past
                // SHARE_GRACE; then the oldest. The grace spares a busy
                // honest address: its handshakes are young (an honest one
                // is done in a round trip), a junk one ages at once.
                let over = |e: &Entry| {
                    self.per_source > 0
                        && now.duration_since(e.since) >= SHARE_GRACE
                        && st.by_source.get(&e.source).copied().unwrap_or(0) > self.per_source
                };
                let victim = st
                    .entries
                    .iter()
                    .min_by_key(|(id, e)| {
                        let fresh = now.duration_since(e.since) < FIRST_LOOK;
                        (
                            fresh,
                            e.progress.load(Ordering::Relaxed),
                            !over(e),
                            e.since,
                            **id,
                        )
                    })
                    .map(|(id, e)| {
                        (
                            *id,
                            if over(e) {
                                Eviction::Source
                            } else {
                                Eviction::Budget
                            },
                        )
                    });
                if let Some((id, why)) = victim {
                    self.evict(&mut st, id, why);
                    evicted += 1;
                }
            }
            if st.entries.len() * 4 >= self.budget * 3 {
                let slow: Vec<u64> = st
                    .entries
                    .iter()
                    .filter(|(_, e)| now.duration_since(e.since) >= PRESSURE_DEADLINE)
                    .map(|(id, _)| *id)
                    .collect();
                for id in slow {
                    self.evict(&mut st, id, Eviction::Slow);
                    evicted += 1;
                }
            }
        }
        let id = st.next;
        st.next += 1;
        let progress = Arc::new(AtomicU8::new(Progress::Silent as u8));
        let evict = CancellationToken::new();
        let why = Arc::new(Mutex::new(None));
        st.entries.insert(
            id,
            Entry {
                source,
                since: now,
                progress: progress.clone(),
                evict: evict.clone(),
                why: why.clone(),
            },
        );
        *st.by_source.entry(source).or_default() += 1;
        let held = st.entries.len();
        drop(st);
        self.pending.set(held as i64);
        if evicted > 0 {
            if let Some(n) = self.burst.note(evicted) {
                tracing::warn!(
                    listener = %self.listener,
                    evicted = n,
                    pending = held,
                    budget = self.budget,
                    per_source = self.per_source,
                    "pending-handshake budget under pressure: closing the handshakes that made least progress (logged at most every 10s)"
                );
            }
        }
        Pending {
            admission: self.clone(),
            id,
            progress,
            evict,
            why,
        }
    }

    /// Removes entry `id` and fires its token; the connection's task sees
    /// it at its next poll and closes the socket.
    fn evict(&self, st: &mut State, id: u64, reason: Eviction) {
        if let Some(e) = remove(st, id) {
            *e.why.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
            e.evict.cancel();
            self.evicted[reason as usize].inc();
        }
    }

    /// True when a newcomer would make room by closing another handshake.
    pub fn is_full(&self) -> bool {
        self.budget > 0 && self.lock().entries.len() >= self.budget
    }

    /// Pending handshakes held now.
    pub fn held(&self) -> usize {
        self.lock().entries.len()
    }
}

fn remove(st: &mut State, id: u64) -> Option<Entry> {
    let e = st.entries.remove(&id)?;
    if let Some(n) = st.by_source.get_mut(&e.source) {
        *n -= 1;
        if *n == 0 {
            st.by_source.remove(&e.source);
        }
    }
    Some(e)
}

impl Pending {
    /// Records how far the handshake has come (never goes back).
    pub fn advance(&self, to: Progress) {
        self.progress.fetch_max(to as u8, Ordering::Relaxed);
    }

    /// How far the handshake has come.
    pub fn progress(&self) -> Progress {
        Progress::from_u8(self.progress.load(Ordering::Relaxed))
    }

    /// Resolves when this handshake is evicted. Cancel-safe.
    pub async fn evicted(&self) -> Eviction {
        self.evict.cancelled().await;
        self.why
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(Eviction::Budget)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let held = {
            let mut st = self.admission.lock();
            remove(&mut st, self.id);
            st.entries.len()
        };
        self.admission.pending.set(held as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn admission(budget: usize, per_source: usize) -> (Arc<Admission>, Metrics) {
        let m = Metrics::default();
        (
            Arc::new(Admission::new("inbound", budget, per_source, &m)),
            m,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_closes_the_least_progress_then_the_oldest() {
        let (a, m) = admission(3, 0);
        let hello = a.admit(ip(1));
        hello.advance(Progress::Hello);
        tokio::time::advance(Duration::from_millis(10)).await;
        let silent_old = a.admit(ip(2));
        tokio::time::advance(Duration::from_millis(10)).await;
        let partial = a.admit(ip(3));
        partial.advance(Progress::Partial);

        let newcomer = a.admit(ip(4));
        assert!(silent_old.evict.is_cancelled(), "silent goes first");
        assert!(!hello.evict.is_cancelled() && !partial.evict.is_cancelled());
        assert_eq!(silent_old.evicted().await, Eviction::Budget);
        assert_eq!(a.held(), 3, "the budget holds");
        assert_eq!(m.evictions("inbound", "budget").get(), 1);

        newcomer.advance(Progress::Hello);
        let next = a.admit(ip(5));
        assert!(partial.evict.is_cancelled(), "then the partial hello");
        next.advance(Progress::Hello);
        let _again = a.admit(ip(6));
        assert!(hello.evict.is_cancelled(), "then the oldest complete hello");
        assert!(!newcomer.evict.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_over_its_share_gives_first_when_full() {
        let (a, m) = admission(4, 2);
        let other = a.admit(ip(9));
        let own: Vec<Pending> = (0..3).map(|_| a.admit(ip(1))).collect();
        assert!(
            own.iter().all(|p| !p.evict.is_cancelled()),
            "room: a burst is fine"
        );
        other.advance(Progress::Hello);
        own.iter().for_each(|p| p.advance(Progress::Hello));

        // Young: the share is not held against a busy address yet, and the
        // oldest gives.
        let young = a.admit(ip(8));
        assert!(other.evict.is_cancelled(), "the oldest, within its share");
        assert_eq!(m.evictions("inbound", "budget").get(), 1);
        young.advance(Progress::Hello);

        // Past the grace, the address over its share gives first, though
        // the newcomer's neighbour is older.
        tokio::time::advance(SHARE_GRACE).await;
        let newcomer = a.admit(ip(7));
        assert!(
            own[0].evict.is_cancelled(),
            "the over-share address's oldest gave"
        );
        assert_eq!(own[0].evicted().await, Eviction::Source);
        assert!(!young.evict.is_cancelled() && !newcomer.evict.is_cancelled());
        assert_eq!(m.evictions("inbound", "source").get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_honest_address_is_not_evicted_ahead_of_junk() {
        let (a, _) = admission(3, 1);
        let busy: Vec<Pending> = (0..2).map(|_| a.admit(ip(1))).collect();
        busy.iter().for_each(|p| p.advance(Progress::Hello));
        let junk = a.admit(ip(7));
        let _newcomer = a.admit(ip(8));
        assert!(
            junk.evict.is_cancelled(),
            "the silent one gives, though within its share"
        );
        assert!(busy.iter().all(|p| !p.evict.is_cancelled()));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_ones_go_by_age_whatever_their_address() {
        let (a, _) = admission(3, 1);
        let junk = a.admit(ip(7));
        tokio::time::advance(Duration::from_millis(1)).await;
        // A busy address's newest connections, not yet polled.
        let busy: Vec<Pending> = (0..2).map(|_| a.admit(ip(1))).collect();
        let _newcomer = a.admit(ip(8));
        assert!(junk.evict.is_cancelled(), "the oldest silent one gives");
        assert!(busy.iter().all(|p| !p.evict.is_cancelled()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_gets_a_first_look_before_it_can_be_evicted() {
        let (a, _) = admission(2, 0);
        let stalled = a.admit(ip(7));
        stalled.advance(Progress::Partial);
        tokio::time::advance(FIRST_LOOK).await;
        // Not yet polled: looks silent, but is younger than FIRST_LOOK.
        let unpolled = a.admit(ip(1));
        let _newcomer = a.admit(ip(8));
        assert!(stalled.evict.is_cancelled(), "the older stalled one gives");
        assert!(!unpolled.evict.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn under_pressure_slow_handshakes_are_closed() {
        let (a, m) = admission(4, 0);
        let old: Vec<Pending> = (1..=3).map(|i| a.admit(ip(i))).collect();
        tokio::time::advance(PRESSURE_DEADLINE).await;
        let _fresh = a.admit(ip(10));
        assert!(
            old.iter().all(|p| p.evict.is_cancelled()),
            "3 of 4 held: pressure, and all three are past the deadline"
        );
        assert_eq!(m.evictions("inbound", "slow").get(), 3);
        assert_eq!(a.held(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_frees_and_the_gauge_follows() {
        let (a, m) = admission(2, 0);
        let p = a.admit(ip(1));
        let q = a.admit(ip(1));
        assert_eq!(m.pending("inbound").get(), 2);
        drop(p);
        assert_eq!(m.pending("inbound").get(), 1);
        let _r = a.admit(ip(1));
        assert!(!q.evict.is_cancelled(), "a freed place needs no eviction");
        drop(q);
        assert_eq!(a.held(), 1);
    }

    #[test]
    fn no_budget_never_evicts() {
        let (a, _) = admission(0, 0);
        let held: Vec<Pending> = (0..1000).map(|i| a.admit(ip((i % 200) as u8))).collect();
        assert!(held.iter().all(|p| !p.evict.is_cancelled()));
    }
}
