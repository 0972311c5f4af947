//! The blocking-query loop every watcher runs, following Consul's rules
//! (spec §1.0, and `api/watch/plan.go` for the reference behaviour):
//!
//! - every call sends an explicit `wait`; the client's HTTP timeout is above
//!   `wait + wait/16` (see `consul`);
//! - the index sent is at least 1 once we have one, so the call really blocks;
//! - an index that goes backwards (snapshot restore, agent restart) resets to
//!   0: one non-blocking fetch, then block again from there;
//! - a return is only "maybe changed": the publisher compares values and
//!   publishes only real changes;
//! - a token bucket (burst 2) bounds the request rate under churn, with no
//!   fixed sleep per iteration;
//! - errors back off exponentially with jitter, capped;
//! - the loop logs once per change of state (healthy → failing, one failure
//!   kind → another, failing → recovered), never once per retry.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{AgentError, Blocking, Reply, WatchPolicy};

/// Runs `fetch` as a blocking query until `cancel` fires, handing each
/// successful value to `publish`. `name` identifies the watch in logs.
pub async fn watch<T, F, Fut, P>(
    name: &str,
    policy: WatchPolicy,
    cancel: &CancellationToken,
    mut fetch: F,
    mut publish: P,
) where
    F: FnMut(Blocking) -> Fut,
    Fut: Future<Output = Result<Reply<T>, AgentError>>,
    P: FnMut(T),
{
    let mut index = 0u64;
    let mut bucket = TokenBucket::new(2, policy.min_interval);
    let mut failures = 0u32;
    let mut failing: Option<String> = None;
    loop {
        if let Some(delay) = bucket.take() {
            if sleep_or_cancel(delay, cancel).await {
                return;
            }
        }
        let b = Blocking {
            index,
            wait: policy.wait,
        };
        let result = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = fetch(b) => r,
        };
        match result {
            Ok(reply) => {
                if let Some(kind) = failing.take() {
                    tracing::info!(watch = name, after = %kind, failures, "agent answering again");
                }
                failures = 0;
                if reply.index != 0 && reply.index < index {
                    tracing::debug!(
                        watch = name,
                        old = index,
                        new = reply.index,
                        "index went backwards; resetting"
                    );
                    index = 0;
                    continue;
                }
                index = reply.index.max(1);
                publish(reply.value);
            }
            Err(e) => {
                failures += 1;
                let kind = e.kind();
                if failing.as_deref() != Some(kind.as_str()) {
                    match e.missing_permission() {
                        Some(perm) => {
                            tracing::warn!(watch = name, error = %e, missing_permission = %perm, "agent refused: the ACL token lacks a permission; serving on the last good state")
                        }
                        None => {
                            tracing::warn!(watch = name, error = %e, "agent call failing; serving on the last good state, retrying with backoff")
                        }
                    }
                    failing = Some(kind);
                }
                if sleep_or_cancel(backoff(policy, failures), cancel).await {
                    return;
                }
            }
        }
    }
}

/// `base * 2^(failures-1)`, capped, with ±25 % jitter so that many proxies
/// restarted together do not retry in lockstep.
pub fn backoff(policy: WatchPolicy, failures: u32) -> Duration {
    let exp = policy
        .backoff_base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let capped = exp.min(policy.backoff_max);
    let mut b = [0u8; 2];
    let _ = crate::identity::tls::provider().secure_random.fill(&mut b);
    let unit = u16::from_le_bytes(b) as f64 / u16::MAX as f64; // 0..=1
    capped.mul_f64(0.75 + unit * 0.5)
}

/// Returns true if cancelled during the sleep.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// A token bucket: `burst` calls at once, then one per `interval`.
struct TokenBucket {
    burst: u32,
    tokens: f64,
    interval: Duration,
    last: Instant,
}

impl TokenBucket {
    fn new(burst: u32, interval: Duration) -> TokenBucket {
        TokenBucket {
            burst,
            tokens: burst as f64,
            interval,
            last: Instant::now(),
        }
    }

    /// Takes a token; returns how long to wait first if none is left.
    fn take(&mut self) -> Option<Duration> {
        if self.interval.is_zero() {
            return None;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() / self.interval.as_secs_f64();
        self.tokens = (self.tokens + refill).min(self.burst as f64);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            let wait = self.interval.mul_f64(1.0 - self.tokens);
            self.tokens = 0.0;
            self.last = now + wait;
            Some(wait)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn policy() -> WatchPolicy {
        WatchPolicy {
            wait: Duration::from_secs(10),
            min_interval: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
        }
    }

    /// Replays scripted replies and records the index each call sent.
    async fn run(script: Vec<Result<(u32, u64), u16>>) -> (Vec<u64>, Vec<u32>) {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let published = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let script = Arc::new(Mutex::new(script.into_iter()));
        let (s, p, c) = (sent.clone(), published.clone(), cancel.clone());
        watch(
            "test",
            policy(),
            &cancel,
            move |b: Blocking| {
                s.lock().unwrap().push(b.index);
                let next = script.lock().unwrap().next();
                let c = c.clone();
                async move {
                    match next {
                        Some(Ok((value, index))) => Ok(Reply { value, index }),
                        Some(Err(status)) => Err(AgentError::Status {
                            endpoint: "x".into(),
                            status,
                            body: String::new(),
                        }),
                        None => {
                            c.cancel();
                            std::future::pending().await
                        }
                    }
                }
            },
            move |v| p.lock().unwrap().push(v),
        )
        .await;
        let sent = sent.lock().unwrap().clone();
        let published = published.lock().unwrap().clone();
        (sent, published)
    }

    #[tokio::test(start_paused = true)]
    async fn follows_consul_index_rules() {
        let (sent, published) = run(vec![
            Ok((1, 0)),  // first answer without an index: next index is clamped to 1
            Ok((2, 10)), // normal progress
            Ok((3, 12)),
            Ok((4, 5)), // went backwards: not published, reset to 0
            Ok((5, 6)),
        ])
        .await;
        assert_eq!(sent, [0, 1, 10, 12, 0, 6]);
        assert_eq!(published, [1, 2, 3, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_its_index_through_errors() {
        let start = Instant::now();
        let (sent, published) = run(vec![Ok((1, 7)), Err(500), Err(500), Ok((2, 8))]).await;
        assert_eq!(sent, [0, 7, 7, 7, 8]);
        assert_eq!(published, [1, 2]);
        assert!(
            start.elapsed() >= Duration::from_millis(750 + 1500),
            "backed off twice"
        );
    }

    #[test]
    fn backoff_grows_and_caps_with_jitter() {
        let p = policy();
        for (failures, base) in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0), (40, 30.0)] {
            let d = backoff(p, failures).as_secs_f64();
            assert!(
                d >= base * 0.75 - 1e-9 && d <= base * 1.25 + 1e-9,
                "{failures}: {d}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_after_a_burst_of_two() {
        let mut b = TokenBucket::new(2, Duration::from_secs(1));
        assert_eq!(b.take(), None);
        assert_eq!(b.take(), None);
        let wait = b.take().expect("third call waits");
        assert!(wait > Duration::from_millis(900));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.take(), None, "refilled");
    }
}
