//! Phase 3 of start-up: the one credentials channel every listener reads,
//! and what fills it (files, the agent, or a control plane's feed).

use std::sync::Arc;

use super::{Shutdown, StartError};
use crate::config::{CertSource, Config};
use crate::control::agent::{credentials, AgentClient, WatchPolicy};
use crate::control::{Publisher, Receiver};
use crate::identity::tls::Credentials;
use crate::ops::metrics::Metrics;

/// Phase 3: the credentials channel: filled at once from files, or by the
/// agent watcher it starts (start waits for the first value after binding).
pub(super) fn credentials(
    config: &Config,
    client: &Option<AgentClient>,
    metrics: &Arc<Metrics>,
    policy: WatchPolicy,
    shutdown: &Shutdown,
    feed: Option<Receiver<Credentials>>,
) -> Result<Arc<Publisher<Credentials>>, StartError> {
    let m = metrics.clone();
    let publisher = Arc::new(Publisher::new().on_publish(move |c: &Credentials, first| {
        m.leaf_expiry.set(c.leaf_not_after);
        if !first {
            m.rotations.inc();
        }
    }));
    match (&config.certs, client) {
        (CertSource::Files(c), _) => publisher.publish(c.clone()),
        (CertSource::Agent, None) => return Err(StartError::NoAgent),
        (CertSource::ControlPlane, _) => {
            let mut feed = feed.ok_or(StartError::ControlPlane(
                "no certificate feed from the control plane".into(),
            ))?;
            let out = publisher.clone();
            let halt = shutdown.halt.clone();
            shutdown.control.spawn(async move {
                let mut next = feed.ready().await;
                while let Some(c) = next {
                    out.publish(c);
                    next = tokio::select! {
                        n = feed.changed() => n,
                        _ = halt.cancelled() => None,
                    };
                }
            });
        }
        (CertSource::Agent, Some(client)) => {
            shutdown.control.spawn(credentials::credentials(
                client.clone(),
                config.service.clone(),
                publisher.clone(),
                policy,
                shutdown.halt.clone(),
            ));
            tracing::info!(service = %config.service, "waiting for certificates from the agent");
        }
    }
    Ok(publisher)
}
