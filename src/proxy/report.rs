//! What one connection did, and the single log line that says so.
//!
//! Both listeners build a [`Report`] as the connection moves through its
//! phases and hand it to [`Report::log`] exactly once, when it ends. Inner
//! code returns errors; it does not log them.

use std::net::SocketAddr;

use tokio::time::Instant;

use crate::proxy::net::Phase;
use crate::proxy::splice::{End, Leg, Spliced};

/// Which way the connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A mesh peer to our local app.
    Inbound,
    /// Our local app to an upstream service.
    Upstream,
}

/// How a connection ended: the access log's `outcome` and the `outcome`
/// label of `ferry_connections_closed_total`. A fixed set; `detail` says
/// the rest in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Bytes flowed and both sides closed, or the idle timeout or maximum
    /// lifetime ended it (`detail` says which).
    Done,
    /// Refused by intentions.
    Denied,
    /// Failed in `phase` (handshake, dial, a reset mid-stream, ...).
    Failed,
    /// Closed before it was served because a limit or a bound was reached
    /// (e.g. still no certificates when the wait for them ran out).
    Refused,
    /// An established connection closed because intentions no longer allow
    /// its source.
    Revoked,
    /// Still open when the drain timeout ended; closed by shutdown.
    Drained,
    /// A handshake closed to make room for newer ones while the budget of
    /// pending handshakes was full.
    Evicted,
}

impl Outcome {
    /// The stable name, for the log and the metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
            Outcome::Revoked => "revoked",
            Outcome::Drained => "drained",
            Outcome::Evicted => "evicted",
        }
    }
}

/// Who connected: a TCP peer's address, or a process on a Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Addr(SocketAddr),
    Unix,
}

impl From<SocketAddr> for Peer {
    fn from(a: SocketAddr) -> Peer {
        Peer::Addr(a)
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Addr(a) => write!(f, "{a}"),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// Everything the close log line says.
#[derive(Debug)]
pub struct Report {
    pub direction: Direction,
    /// The downstream peer.
    pub peer: Peer,
    /// The upstream name (upstream connections) or our service (inbound).
    pub service: String,
    /// Who is connecting: inbound, the client's SPIFFE ID once verified;
    /// upstream, our own.
    pub source: Option<String>,
    /// Who is reached: inbound, our own SPIFFE ID; upstream, the server's
    /// once verified.
    pub destination: Option<String>,
    /// The upstream instance or local app address dialed.
    pub target: Option<String>,
    /// The phase reached.
    pub phase: Phase,
    pub outcome: Outcome,
    /// The reason for a denial or failure, or how a done connection ended.
    pub detail: String,
    /// Attempts made to reach an upstream instance.
    pub attempts: u32,
    /// Bytes from the downstream peer onward.
    pub bytes_in: u64,
    /// Bytes back to the downstream peer.
    pub bytes_out: u64,
    started: Instant,
}

impl Report {
    /// A fresh report for a connection accepted now; `me` is our own SPIFFE
    /// ID, when we have certificates.
    pub fn new(
        direction: Direction,
        peer: impl Into<Peer>,
        service: &str,
        me: Option<String>,
    ) -> Report {
        let (source, destination) = match direction {
            Direction::Inbound => (None, me),
            Direction::Upstream => (me, None),
        };
        Report {
            direction,
            peer: peer.into(),
            service: service.to_string(),
            source,
            destination,
            target: None,
            phase: Phase::Handshake,
            outcome: Outcome::Done,
            detail: String::new(),
            attempts: 0,
            bytes_in: 0,
            bytes_out: 0,
            started: Instant::now(),
        }
    }

    /// Marks the connection failed in `phase` for `why`.
    pub fn fail(&mut self, phase: Phase, why: impl std::fmt::Display) {
        self.phase = phase;
        self.outcome = Outcome::Failed;
        self.detail = why.to_string();
    }

    /// Records a finished splice where leg A was the downstream peer.
    pub fn spliced(&mut self, s: Spliced, a_name: &str, b_name: &str) {
        self.phase = Phase::Splice;
        self.bytes_in = s.a_to_b;
        self.bytes_out = s.b_to_a;
        let trunc = if s.truncated {
            " (a TLS peer closed without close_notify)"
        } else {
            ""
        };
        match s.end {
            End::Closed => self.detail = format!("closed{trunc}"),
            End::Idle => self.detail = "idle timeout".into(),
            End::Lifetime => self.detail = "maximum lifetime reached".into(),
            End::Cancelled => {
                self.outcome = Outcome::Drained;
                self.detail = "proxy shutting down".into();
            }
            End::Error(leg, e) => {
                let side = if leg == Leg::A { a_name } else { b_name };
                self.outcome = Outcome::Failed;
                self.detail = format!("{side}: {e}");
            }
        }
    }

    /// Marks an established connection closed by a policy change.
    pub fn revoked(&mut self, why: &str) {
        self.outcome = Outcome::Revoked;
        self.detail = why.to_string();
    }

    /// Logs the one line for this connection, under the log target
    /// `ferry::access` (so it can be filtered and never collides with the
    /// connection's own fields). Evicted handshakes log at debug: a flood
    /// is reported once per burst by the admission control instead.
    pub fn log(&self) {
        let dir = match self.direction {
            Direction::Inbound => "inbound",
            Direction::Upstream => "upstream",
        };
        // Milliseconds to the microsecond, as a JSON number.
        let ms = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        let source = self.source.as_deref().unwrap_or("-");
        let destination = self.destination.as_deref().unwrap_or("-");
        let target = self.target.as_deref().unwrap_or("-");
        macro_rules! line {
            ($lvl:ident, $msg:literal) => {
                tracing::$lvl!(
                    target: "ferry::access",
                    direction = dir,
                    peer = %self.peer,
                    service = %self.service,
                    source,
                    destination,
                    target_addr = target,
                    phase = self.phase.as_str(),
                    attempts = self.attempts,
                    bytes_in = self.bytes_in,
                    bytes_out = self.bytes_out,
                    duration_ms = ms,
                    outcome = self.outcome.label(),
                    detail = %self.detail,
                    $msg
                )
            };
        }
        match self.outcome {
            Outcome::Done | Outcome::Drained => line!(info, "connection closed"),
            Outcome::Revoked => line!(warn, "connection revoked"),
            Outcome::Denied => line!(warn, "connection denied"),
            Outcome::Failed => line!(warn, "connection failed"),
            Outcome::Refused => line!(warn, "connection refused"),
            Outcome::Evicted => line!(debug, "connection evicted"),
        }
    }
}
