//! The agent's authorize API (spec §1.3) as the inbound policy: an
//! [`Authority`] the public listener asks for every connection.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{AgentClient, AgentError};
use crate::authz::{Authority, AuthzError, Decision, Pending};
use crate::identity::PeerIdentity;

/// Sources remembered for the fallback window at most; beyond this the
/// memory is cleared (a flood of distinct identities cannot grow it).
const MAX_REMEMBERED: usize = 4096;

/// Asks the agent for every inbound connection, as Consul's own proxy does.
///
/// The agent answers from its local intention cache in microseconds, so
/// there is no cache in front of it. There is one fallback: when the agent
/// cannot be reached at all (connection refused, timeout, 5xx, garbage), a
/// decision made for the same source within `window` is reused, so an agent
/// restart of a few seconds does not refuse every new connection. An answer
/// that is a refusal of the request itself (400, 403) is never papered over.
pub struct AgentAuthorizer {
    client: AgentClient,
    target: String,
    timeout: Duration,
    window: Duration,
    /// Last decision per source URI; std lock, never held across an await.
    recent: Mutex<HashMap<String, (bool, String, Instant)>>,
}

impl AgentAuthorizer {
    /// Authorizes connections to `target` (our service name).
    pub fn new(
        client: AgentClient,
        target: String,
        timeout: Duration,
        window: Duration,
    ) -> AgentAuthorizer {
        AgentAuthorizer {
            client,
            target,
            timeout,
            window,
            recent: Mutex::new(HashMap::new()),
        }
    }

    async fn decide(&self, peer: &PeerIdentity) -> Result<Decision, AuthzError> {
        let uri = peer.id.to_string();
        match self
            .client
            .authorize(&self.target, &uri, &peer.serial, self.timeout)
            .await
        {
            Ok(a) => {
                if !self.window.is_zero() {
                    self.remember(&uri, a.authorized, &a.reason);
                }
                Ok(Decision {
                    allowed: a.authorized,
                    reason: a.reason,
                })
            }
            Err(e) if agent_unreachable(&e) => match self.recall(&uri) {
                Some((allowed, reason, age)) => Ok(Decision {
                    allowed,
                    reason: format!(
                        "{reason} (agent unreachable: reusing the decision from {:.1}s ago)",
                        age.as_secs_f64()
                    ),
                }),
                None => Err(failed(e)),
            },
            Err(e) => Err(failed(e)),
        }
    }

    fn remember(&self, uri: &str, allowed: bool, reason: &str) {
        let mut map = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_REMEMBERED && !map.contains_key(uri) {
            let window = self.window;
            map.retain(|_, (_, _, at)| at.elapsed() <= window);
            if map.len() >= MAX_REMEMBERED {
                map.clear();
            }
        }
        map.insert(
            uri.to_string(),
            (allowed, reason.to_string(), Instant::now()),
        );
    }

    fn recall(&self, uri: &str) -> Option<(bool, String, Duration)> {
        let map = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let (allowed, reason, at) = map.get(uri)?;
        let age = at.elapsed();
        (age <= self.window).then(|| (*allowed, reason.clone(), age))
    }
}

/// The agent itself is not answering (as opposed to answering "no").
fn agent_unreachable(e: &AgentError) -> bool {
    match e {
        AgentError::Unreachable { .. }
        | AgentError::Timeout { .. }
        | AgentError::Malformed { .. } => true,
        AgentError::Status { status, .. } => *status >= 500 || *status == 429,
        AgentError::Setup(_) => false,
    }
}

impl Authority for AgentAuthorizer {
    fn decide<'a>(&'a self, peer: &'a PeerIdentity) -> Pending<'a> {
        Box::pin(AgentAuthorizer::decide(self, peer))
    }
}

fn failed(e: AgentError) -> AuthzError {
    AuthzError {
        authority: "agent",
        why: e.to_string(),
    }
}
