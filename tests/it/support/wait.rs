//! Waits: every one is on a condition or an event, with a deadline, and
//! fails naming what it waited for. Nothing here sleeps and hopes.

use std::future::Future;
use std::time::Duration;

/// How long any single wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Waits until `check` returns true, polling every 10 ms, or panics after
/// DEADLINE with `what`.
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut check: F) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {DEADLINE:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the async `check` returns true, polling every 10 ms, or
/// panics after DEADLINE with `what`.
pub async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {DEADLINE:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `fut` for at most DEADLINE.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?}: {what}"))
}
