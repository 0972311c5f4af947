//! Closing live connections that intentions no longer allow.
//!
//! Consul's built-in proxy never re-checks an established connection, and
//! Envoy drops all of them when its RBAC config changes. ferry re-asks the
//! agent about each distinct source of the live inbound connections whenever
//! intentions may have changed, and closes exactly the ones now denied.
//!
//! "May have changed" comes from a blocking query on the intention-match
//! endpoint for our service; if the ACL token may not read intentions (403),
//! ferry falls back to re-checking on a fixed interval.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::watch::watch;
use super::WatchPolicy;
use super::{AgentClient, Blocking};
use crate::ops::metrics::Metrics;
use crate::proxy::live::LiveConns;

/// Re-authorizes every distinct live source with the agent and closes the
/// connections of those now denied. An agent error leaves connections open:
/// without an answer there is nothing to act on (new connections still fail
/// closed).
pub async fn recheck(
    client: &AgentClient,
    target: &str,
    live: &LiveConns,
    timeout: Duration,
    metrics: &Metrics,
) {
    for peer in live.sources() {
        let uri = peer.id.to_string();
        match client.authorize(target, &uri, &peer.serial, timeout).await {
            Ok(a) if !a.authorized => {
                let n = live.close_from(&uri, &a.reason);
                metrics.revoked.inc_by(n as u64);
                tracing::warn!(source = %uri, connections = n, reason = %a.reason, "intention now denies this source; closing its connections");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(source = %uri, error = %e, "re-authorization failed; leaving its connections open")
            }
        }
    }
}

/// What the revocation watcher needs.
pub struct Revoker {
    pub client: AgentClient,
    /// Our service: the destination of the intentions.
    pub target: String,
    pub live: Arc<LiveConns>,
    /// Re-check interval when intentions cannot be watched.
    pub every: Duration,
    /// Bound on each authorize call.
    pub timeout: Duration,
    pub policy: WatchPolicy,
    pub metrics: Arc<Metrics>,
}

/// Watches for intention changes and re-checks live connections on each.
pub async fn run(r: Revoker, cancel: CancellationToken) {
    let Revoker {
        client,
        target,
        live,
        every,
        timeout,
        policy,
        metrics,
    } = r;
    let probe = client
        .intention_match(
            &target,
            Blocking {
                index: 0,
                wait: Duration::ZERO,
            },
        )
        .await;
    if let Err(e) = &probe {
        if e.status() == Some(403) {
            tracing::info!(every = ?every, "the ACL token cannot read intentions; re-checking live connections periodically instead");
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                recheck(&client, &target, &live, timeout, &metrics).await;
            }
        }
    }
    // The watch only notes that intentions changed; the re-check runs in
    // its own loop, so a slow agent answer never delays noticing the next
    // change, and a burst of changes costs one re-check.
    let changed = Notify::new();
    let mut last = probe.ok().map(|r| r.value);
    let watching = watch(
        "intentions",
        policy,
        &cancel,
        |b| client.intention_match(&target, b),
        |v| {
            if last.as_ref() != Some(&v) {
                if last.is_some() {
                    changed.notify_one();
                }
                last = Some(v);
            }
        },
    );
    let rechecking = async {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = changed.notified() => {}
            }
            recheck(&client, &target, &live, timeout, &metrics).await;
        }
    };
    tokio::join!(watching, rechecking);
}
