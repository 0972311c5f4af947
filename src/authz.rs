//! Deciding whether a verified peer may reach our service.
//!
//! Two sources of truth: static intentions (standalone mode) and the Consul
//! agent's authorize API (spec §1.3), behind one [`Authorizer`].
//!
//! Standalone mode evaluates static intentions from the command line the way
//! Consul evaluates intentions for one destination (spec §3): an intention
//! naming the source exactly beats the `*` wildcard; with no match the
//! default policy applies (allow, unless `-default-deny`). Consul's agent
//! does not look at the source's trust domain or datacenter, and neither do
//! we here — the TLS layer has already pinned the trust domain.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::consul::{AgentClient, AgentError};
use crate::identity::{PeerIdentity, SpiffeId};

/// What an intention says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// A decision and the reason, for the connection log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// True if the connection may proceed.
    pub allowed: bool,
    /// Which rule decided, in words.
    pub reason: String,
}

/// Errors in a static intention set.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IntentionError {
    #[error("source {0:?} is both allowed (-allow) and denied (-deny)")]
    Conflict(String),
    #[error("invalid source {0:?} in -allow/-deny: expected a service name or *")]
    BadSource(String),
}

/// Intentions for our one destination service.
#[derive(Debug, Clone, Default)]
pub struct Intentions {
    exact: HashMap<String, Action>,
    wildcard: Option<Action>,
    default_allow: bool,
}

impl Intentions {
    /// Builds the set from `-allow`, `-deny` and `-default-deny`.
    pub fn new(
        allow: &[String],
        deny: &[String],
        default_deny: bool,
    ) -> Result<Intentions, IntentionError> {
        let mut set = Intentions {
            default_allow: !default_deny,
            ..Intentions::default()
        };
        for (list, action) in [(allow, Action::Allow), (deny, Action::Deny)] {
            for src in list {
                let src = src.trim();
                let valid = src == "*"
                    || (!src.is_empty()
                        && src
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
                if !valid {
                    return Err(IntentionError::BadSource(src.to_string()));
                }
                let prev = if src == "*" {
                    set.wildcard.replace(action)
                } else {
                    set.exact.insert(src.to_string(), action)
                };
                if prev.is_some_and(|p| p != action) {
                    return Err(IntentionError::Conflict(src.to_string()));
                }
            }
        }
        Ok(set)
    }

    /// Everyone in the trust domain may connect (no flags given).
    pub fn allow_all() -> Intentions {
        Intentions {
            default_allow: true,
            ..Intentions::default()
        }
    }

    /// True if `-allow` rules exist but cannot change anything, because the
    /// default is already allow and nothing denies. Worth a startup warning.
    pub fn allows_are_moot(&self) -> bool {
        self.default_allow
            && self.wildcard != Some(Action::Deny)
            && !self.exact.is_empty()
            && self.exact.values().all(|a| *a == Action::Allow)
    }

    /// Decides for a peer.
    pub fn decide(&self, source: &SpiffeId) -> Decision {
        let (action, rule) = if let Some(a) = self.exact.get(&source.service) {
            (*a, format!("intention {} => this service", source.service))
        } else if let Some(a) = self.wildcard {
            (a, "intention * => this service".to_string())
        } else if self.default_allow {
            (Action::Allow, "default allow".to_string())
        } else {
            (Action::Deny, "default deny".to_string())
        };
        let verb = match action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        Decision {
            allowed: action == Action::Allow,
            reason: format!("{rule} ({verb})"),
        }
    }
}

/// Why no decision could be made. The connection is refused: ferry fails
/// closed when it cannot prove a peer is allowed.
#[derive(Debug, thiserror::Error)]
#[error("cannot ask the agent ({0}); failing closed")]
pub struct AuthzError(#[from] pub AgentError);

/// Where decisions come from.
pub enum Authorizer {
    /// Static intentions from flags.
    Static(Intentions),
    /// The local agent.
    Agent(AgentAuthorizer),
}

impl Authorizer {
    /// Decides for a verified peer.
    pub async fn decide(&self, peer: &PeerIdentity) -> Result<Decision, AuthzError> {
        match self {
            Authorizer::Static(i) => Ok(i.decide(&peer.id)),
            Authorizer::Agent(a) => a.decide(peer).await,
        }
    }
}

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
                None => Err(AuthzError(e)),
            },
            Err(e) => Err(AuthzError(e)),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(svc: &str) -> SpiffeId {
        SpiffeId::service("td.consul", "dc1", svc)
    }
    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn evaluates_like_consul() {
        // (name, allow, deny, default_deny, source, expected)
        type Case<'a> = (&'a str, &'a [&'a str], &'a [&'a str], bool, &'a str, bool);
        let cases: &[Case] = &[
            ("no rules allow everyone", &[], &[], false, "web", true),
            ("default deny with no rules", &[], &[], true, "web", false),
            (
                "exact allow under default deny",
                &["web"],
                &[],
                true,
                "web",
                true,
            ),
            (
                "other source under default deny",
                &["web"],
                &[],
                true,
                "db",
                false,
            ),
            ("exact deny", &[], &["web"], false, "web", false),
            ("wildcard deny", &[], &["*"], false, "db", false),
            (
                "exact allow beats wildcard deny",
                &["web"],
                &["*"],
                false,
                "web",
                true,
            ),
            (
                "exact deny beats wildcard allow",
                &["*"],
                &["web"],
                true,
                "web",
                false,
            ),
            (
                "wildcard allow beats default deny",
                &["*"],
                &[],
                true,
                "db",
                true,
            ),
        ];
        for (name, allow, deny, dd, src, want) in cases {
            let set = Intentions::new(&s(allow), &s(deny), *dd).unwrap();
            assert_eq!(set.decide(&id(src)).allowed, *want, "{name}");
        }
    }

    #[test]
    fn rejects_conflicts_and_bad_names() {
        assert_eq!(
            Intentions::new(&s(&["web"]), &s(&["web"]), false).unwrap_err(),
            IntentionError::Conflict("web".into())
        );
        assert_eq!(
            Intentions::new(&s(&["*"]), &s(&["*"]), false).unwrap_err(),
            IntentionError::Conflict("*".into())
        );
        assert!(matches!(
            Intentions::new(&s(&["a/b"]), &[], false),
            Err(IntentionError::BadSource(_))
        ));
    }

    #[test]
    fn notices_moot_allows() {
        assert!(Intentions::new(&s(&["web"]), &[], false)
            .unwrap()
            .allows_are_moot());
        assert!(!Intentions::new(&s(&["web"]), &[], true)
            .unwrap()
            .allows_are_moot());
        assert!(!Intentions::new(&s(&["web"]), &s(&["*"]), false)
            .unwrap()
            .allows_are_moot());
    }
}
