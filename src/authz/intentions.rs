//! Static intentions (standalone mode), evaluated the way Consul evaluates
//! intentions for one destination (spec §3): an intention naming the
//! source exactly beats the `*` wildcard; with no match the default policy
//! applies (allow, unless `-default-deny`). Consul's agent does not look at
//! the source's trust domain or datacenter, and neither do we here — the TLS
//! layer has already pinned the trust domain.

use std::collections::HashMap;

use super::Decision;
use crate::identity::SpiffeId;

/// What an intention says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
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
