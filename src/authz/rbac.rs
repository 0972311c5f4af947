//! Envoy's network RBAC filter as a policy ferry evaluates: the form in
//! which Consul's xDS server hands a sidecar its intentions (Consul has
//! already compiled precedence and defaults into it; the proxy only
//! evaluates).
//!
//! Semantics followed (Envoy's `envoy.filters.network.rbac`, L4 only):
//! - a filter has an action and named policies; a policy matches when its
//!   permissions match (ferry supports only `any`, which is all Consul
//!   emits for TCP) and any one of its principals matches the peer;
//! - `ALLOW`: allowed iff some policy matches (no policies: nobody);
//!   `DENY`: denied iff some policy matches (no policies: everybody passes);
//! - a chain of filters is evaluated in order and the first that denies
//!   decides; a filter without rules allows everything;
//! - a principal names the peer by the URI SAN of its certificate (its
//!   SPIFFE ID), exactly, by prefix/suffix/substring, or by a regex.
//!
//! Anything else Envoy's RBAC can express (IP principals, headers, L7
//! permissions) is refused when the policy is built, so a policy ferry
//! cannot evaluate exactly is never half-applied.

use regex::Regex;

use super::Decision;
use crate::identity::PeerIdentity;

/// What a filter does with the peers its policies match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RbacAction {
    /// Only matching peers pass.
    Allow,
    /// Matching peers are refused; the rest pass.
    Deny,
}

/// How a principal's name is compared with the peer's SPIFFE ID.
#[derive(Debug, Clone)]
pub enum NameMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    /// A whole-string match (Envoy's `safe_regex` is anchored).
    Regex(Regex),
}

impl NameMatch {
    /// A regex matcher; the pattern is anchored to the whole name, as
    /// Envoy's `safe_regex` (RE2 full match) is.
    pub fn regex(pattern: &str) -> Result<NameMatch, RbacError> {
        Regex::new(&format!("^(?:{pattern})$"))
            .map(NameMatch::Regex)
            .map_err(|e| RbacError(format!("regex {pattern:?}: {e}")))
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            NameMatch::Exact(s) => name == s,
            NameMatch::Prefix(s) => name.starts_with(s.as_str()),
            NameMatch::Suffix(s) => name.ends_with(s.as_str()),
            NameMatch::Contains(s) => name.contains(s.as_str()),
            NameMatch::Regex(r) => r.is_match(name),
        }
    }
}

/// Who a policy applies to.
#[derive(Debug, Clone)]
pub enum Principal {
    /// Every peer.
    Any,
    /// A peer whose certificate's URI SAN matches.
    Authenticated(NameMatch),
    /// All of these.
    And(Vec<Principal>),
    /// Any of these.
    Or(Vec<Principal>),
    /// Not this one.
    Not(Box<Principal>),
}

impl Principal {
    fn matches(&self, uri: &str) -> bool {
        match self {
            Principal::Any => true,
            Principal::Authenticated(m) => m.matches(uri),
            Principal::And(all) => all.iter().all(|p| p.matches(uri)),
            Principal::Or(any) => any.iter().any(|p| p.matches(uri)),
            Principal::Not(p) => !p.matches(uri),
        }
    }
}

/// One named policy: it matches a peer that any of its principals matches.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub principals: Vec<Principal>,
}

/// One RBAC filter. `rules: None` is a filter without rules, which Envoy
/// treats as allowing everything.
#[derive(Debug, Clone)]
pub struct Rbac {
    pub rules: Option<(RbacAction, Vec<Policy>)>,
}

/// The RBAC filters of a listener, in order.
#[derive(Debug, Clone, Default)]
pub struct RbacChain(pub Vec<Rbac>);

/// A policy ferry cannot evaluate exactly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("RBAC: {0}")]
pub struct RbacError(pub String);

impl Rbac {
    /// The decision of this filter alone.
    fn decide(&self, uri: &str) -> Decision {
        let Some((action, policies)) = &self.rules else {
            return allow("RBAC filter without rules");
        };
        // Envoy reports the first matching policy by name; policies arrive
        // as a map, so ferry keeps them sorted by name for a stable answer.
        let hit = policies
            .iter()
            .find(|p| p.principals.iter().any(|pr| pr.matches(uri)));
        match (action, hit) {
            (RbacAction::Allow, Some(p)) => allow(&format!("RBAC policy {} (allow)", p.name)),
            (RbacAction::Allow, None) => deny("no RBAC policy allows it (default deny)"),
            (RbacAction::Deny, Some(p)) => deny(&format!("RBAC policy {} (deny)", p.name)),
            (RbacAction::Deny, None) => allow("no RBAC policy denies it"),
        }
    }
}

impl RbacChain {
    /// Decides for a verified peer: every filter must allow.
    pub fn decide(&self, peer: &PeerIdentity) -> Decision {
        let uri = peer.id.to_string();
        let mut last = allow("no RBAC filter");
        for f in &self.0 {
            last = f.decide(&uri);
            if !last.allowed {
                return last;
            }
        }
        last
    }
}

fn allow(reason: &str) -> Decision {
    Decision {
        allowed: true,
        reason: reason.to_string(),
    }
}

fn deny(reason: &str) -> Decision {
    Decision {
        allowed: false,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SpiffeId;

    fn peer(svc: &str, dc: &str) -> PeerIdentity {
        PeerIdentity {
            id: SpiffeId::service("11111111-2222-3333-4444-555555555555.consul", dc, svc),
            serial: "01".into(),
        }
    }

    /// Consul's regex for a source service in any datacenter, dots escaped.
    fn consul_source(svc: &str) -> Principal {
        Principal::Authenticated(
            NameMatch::regex(&format!(
                r"^spiffe://11111111-2222-3333-4444-555555555555\.consul/ns/default/dc/[^/]+/svc/{svc}$"
            ))
            .unwrap(),
        )
    }

    fn filter(action: RbacAction, policies: Vec<(&str, Vec<Principal>)>) -> Rbac {
        Rbac {
            rules: Some((
                action,
                policies
                    .into_iter()
                    .map(|(n, p)| Policy {
                        name: n.into(),
                        principals: p,
                    })
                    .collect(),
            )),
        }
    }

    #[test]
    fn decides_like_envoy_for_consuls_shapes() {
        // Default deny with web allowed (ALLOW, one policy).
        let allow_web = RbacChain(vec![filter(
            RbacAction::Allow,
            vec![("consul-intentions-layer4", vec![consul_source("web")])],
        )]);
        // Default allow with billing denied (DENY, one policy).
        let deny_billing = RbacChain(vec![filter(
            RbacAction::Deny,
            vec![("consul-intentions-layer4", vec![consul_source("billing")])],
        )]);
        // Allow everyone except billing: "*" allow with a not_id carve-out.
        let star_but_billing = RbacChain(vec![filter(
            RbacAction::Allow,
            vec![(
                "consul-intentions-layer4",
                vec![Principal::And(vec![
                    consul_source("[^/]+"),
                    Principal::Not(Box::new(consul_source("billing"))),
                ])],
            )],
        )]);
        let nobody = RbacChain(vec![filter(RbacAction::Allow, vec![])]);
        let no_rules = RbacChain(vec![Rbac { rules: None }]);
        let cases = [
            ("allow web: web", &allow_web, peer("web", "dc1"), true),
            (
                "allow web: web in dc2",
                &allow_web,
                peer("web", "dc2"),
                true,
            ),
            (
                "allow web: billing",
                &allow_web,
                peer("billing", "dc1"),
                false,
            ),
            (
                "allow web: webx is not web",
                &allow_web,
                peer("webx", "dc1"),
                false,
            ),
            (
                "deny billing: billing",
                &deny_billing,
                peer("billing", "dc1"),
                false,
            ),
            ("deny billing: web", &deny_billing, peer("web", "dc1"), true),
            (
                "* but billing: web",
                &star_but_billing,
                peer("web", "dc1"),
                true,
            ),
            (
                "* but billing: billing",
                &star_but_billing,
                peer("billing", "dc1"),
                false,
            ),
            ("rules {}: nobody", &nobody, peer("web", "dc1"), false),
            (
                "no rules: everybody",
                &no_rules,
                peer("billing", "dc1"),
                true,
            ),
        ];
        for (name, chain, p, want) in cases {
            let d = chain.decide(&p);
            assert_eq!(d.allowed, want, "{name}: {}", d.reason);
        }
    }

    #[test]
    fn every_filter_of_a_chain_must_allow() {
        let chain = RbacChain(vec![
            filter(RbacAction::Allow, vec![("a", vec![Principal::Any])]),
            filter(RbacAction::Deny, vec![("b", vec![consul_source("web")])]),
        ]);
        let d = chain.decide(&peer("web", "dc1"));
        assert!(!d.allowed);
        assert_eq!(d.reason, "RBAC policy b (deny)");
        assert!(chain.decide(&peer("api", "dc1")).allowed);
    }

    #[test]
    fn matchers_and_anchoring() {
        let uri = "spiffe://td.consul/ns/default/dc/dc1/svc/web";
        assert!(NameMatch::Exact(uri.into()).matches(uri));
        assert!(NameMatch::Prefix("spiffe://td.consul/".into()).matches(uri));
        assert!(NameMatch::Suffix("/svc/web".into()).matches(uri));
        assert!(NameMatch::Contains("/dc/dc1/".into()).matches(uri));
        // Anchored: a regex for `web` does not match inside a longer name.
        assert!(!NameMatch::regex("svc/web").unwrap().matches(uri));
        assert!(NameMatch::regex(".*/svc/web").unwrap().matches(uri));
        assert!(NameMatch::regex("(").is_err());
    }
}
