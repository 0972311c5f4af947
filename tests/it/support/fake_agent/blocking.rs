//! Blocking queries (spec §1.0): query parameters, `index`, `hash` and
//! `wait`, Go's durations and booleans, and waiting on the state until it
//! changes, the wait ends, or the agent pauses.

use std::time::Duration;

use axum::http::StatusCode;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::reply::{bad, refuse, Refusal};
use super::serve::Caller;
use super::state::{AgentState, Shared};

/// `wait` when a blocking query sends none (spec §1.0).
const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// The largest `wait` the agent honours.
const MAX_WAIT: Duration = Duration::from_secs(10 * 60);

impl Shared {
    /// Waits until `done` holds, or `deadline` passes (both `Ok`), or the
    /// agent pauses (`Err`: the connection is being cut anyway).
    pub(super) async fn wait_until(
        &self,
        alive: &CancellationToken,
        deadline: Option<Instant>,
        mut done: impl FnMut(&AgentState) -> bool,
    ) -> Result<(), Refusal> {
        loop {
            let mut bell = self.bell.subscribe();
            let ready = done(&self.lock());
            if ready {
                return Ok(());
            }
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let down = || refuse(StatusCode::INTERNAL_SERVER_ERROR, "agent is shutting down");
            tokio::select! {
                _ = bell.changed() => {}
                () = expired => return Ok(()),
                () = alive.cancelled() => return Err(down()),
            }
        }
    }

    /// Index-blocking: with `index` > 0, waits until `index_of` moves past it.
    pub(super) async fn block_on_index(
        &self,
        caller: &Caller,
        b: &Blocking,
        index_of: impl Fn(&AgentState) -> u64,
    ) -> Result<(), Refusal> {
        if b.index == 0 {
            return Ok(());
        }
        let deadline = Some(b.deadline());
        self.wait_until(&caller.alive, deadline, |s| index_of(s) > b.index)
            .await
    }
}

/// Query parameters in order; repeated names kept.
#[derive(serde::Deserialize, Default)]
#[serde(transparent)]
pub(super) struct Params(Vec<(String, String)>);

impl Params {
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// `index`, `hash` and `wait` of a blocking query (spec §1.0).
pub(super) struct Blocking {
    /// 0: answer at once.
    index: u64,
    pub(super) hash: Option<String>,
    wait: Duration,
}

impl Blocking {
    pub(super) fn parse(q: &Params) -> Result<Blocking, Refusal> {
        let wait = match q.get("wait") {
            Some(w) => go_duration(w).ok_or_else(|| bad("Invalid wait time"))?,
            None => Duration::ZERO,
        };
        let wait = if wait.is_zero() {
            DEFAULT_WAIT
        } else {
            wait.min(MAX_WAIT)
        };
        let index = match q.get("index") {
            Some(i) => i.parse().map_err(|_| bad("Invalid index"))?,
            None => 0,
        };
        let hash = q.get("hash").filter(|h| !h.is_empty()).map(String::from);
        Ok(Blocking { index, hash, wait })
    }

    /// When an unchanged query returns: `wait` plus the most jitter
    /// Consul adds (`wait/16`).
    pub(super) fn deadline(&self) -> Instant {
        Instant::now() + self.wait + self.wait / 16
    }
}

/// Go's `time.ParseDuration` (`300ms`, `1.5s`, `1m30s`, `300000ms`);
/// `None` where Go errs. Negative durations come back as zero.
pub(super) fn go_duration(s: &str) -> Option<Duration> {
    let (negative, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        nanos += number * unit;
        rest = &rest[unit_end..];
    }
    Some(if negative {
        Duration::ZERO
    } else {
        Duration::from_nanos(nanos as u64)
    })
}

/// Go's `strconv.ParseBool`.
pub(super) fn go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}
