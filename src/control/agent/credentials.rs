//! Our credentials from the agent: roots and this service's leaf are
//! watched separately; whenever either changes, a new [`Credentials`] is
//! built and validated (leaf chains to the roots, names our service, matches
//! its key) and only then published. A set that does not validate is logged
//! and dropped: the last good one stays in use, so a bad delivery never
//! takes the proxy down. Runs until the cancellation token fires.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::api::{CaRoots, IssuedCert};
use super::watch::watch;
use super::AgentClient;
use super::WatchPolicy;
use crate::identity::tls::{Credentials, PemBundle};
use crate::snapshot::Publisher;

/// Watches roots and the leaf for `service` and publishes each new valid
/// [`Credentials`] on `tx`, the one credentials channel of the proxy.
///
/// Each watcher publishes its latest value into a `watch` channel (latest
/// wins: a burst of deliveries can never be lost or queue up), and one
/// combiner builds and validates a new set whenever either changed.
pub async fn credentials(
    client: AgentClient,
    service: String,
    tx: Arc<Publisher<Credentials>>,
    policy: WatchPolicy,
    cancel: CancellationToken,
) {
    let (roots_tx, mut roots_rx) = watch::channel(None::<CaRoots>);
    let (leaf_tx, mut leaf_rx) = watch::channel(None::<IssuedCert>);
    let roots_task = watch(
        "roots",
        policy,
        &cancel,
        |b| client.roots(b),
        |r| {
            roots_tx.send_if_modified(|cur| replace_if_changed(cur, r));
        },
    );
    let leaf_task = watch(
        "leaf",
        policy,
        &cancel,
        |b| client.leaf(&service, b),
        |l| {
            leaf_tx.send_if_modified(|cur| replace_if_changed(cur, l));
        },
    );
    let combine = async {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = roots_rx.changed() => if r.is_err() { return },
                r = leaf_rx.changed() => if r.is_err() { return },
            }
            let roots = roots_rx.borrow_and_update().clone();
            let leaf = leaf_rx.borrow_and_update().clone();
            let (Some(r), Some(l)) = (roots, leaf) else {
                continue;
            };
            match build(&r, &l, &service) {
                Ok(c) => {
                    tracing::info!(identity = %c.identity.id, serial = %c.identity.serial, roots = c.root_count(), "certificates loaded");
                    tx.publish(Arc::new(c));
                }
                Err(why) => {
                    tracing::error!(error = %why, "certificates from the agent refused; keeping the previous ones")
                }
            }
        }
    };
    tokio::join!(roots_task, leaf_task, combine);
}

/// Stores `next` if it differs; says whether it did.
fn replace_if_changed<T: PartialEq>(cur: &mut Option<T>, next: T) -> bool {
    if cur.as_ref() == Some(&next) {
        return false;
    }
    *cur = Some(next);
    true
}

fn build(roots: &CaRoots, leaf: &IssuedCert, service: &str) -> Result<Credentials, String> {
    if roots.roots.is_empty() {
        return Err("the agent returned no CA roots (is the Connect CA bootstrapped?)".into());
    }
    // Trust every root, not only the active one: during a CA rotation peers
    // still present leaves from the old one (spec §2.5).
    let pem: String = roots
        .roots
        .iter()
        .map(|r| {
            let mut p = r.root_cert.clone();
            if !p.ends_with('\n') {
                p.push('\n');
            }
            p
        })
        .collect();
    let bundle = PemBundle {
        roots: pem,
        chain: leaf.cert_pem.clone(),
        key: leaf.private_key_pem.clone(),
        origin: [
            "agent roots".into(),
            format!("agent leaf for {service}"),
            "agent leaf key".into(),
        ],
    };
    Credentials::new(&bundle, service).map_err(|e| e.to_string())
}
