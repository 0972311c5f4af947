//! Envoy's network RBAC filter → ferry's [`Rbac`]: principals by
//! authenticated name (exact, prefix, suffix, contains, regex), any,
//! and/or/not; ALLOW or DENY; `any` permissions only (L4).

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac, Principal as EnvoyPrincipal,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as RbacFilter;
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};

use super::{refuse, Refused};
use crate::authz::rbac::{NameMatch, Policy, Principal, Rbac, RbacAction};

fn string_match(m: &Option<StringMatcher>, what: &str) -> Result<NameMatch, Refused> {
    let Some(m) = m else {
        return refuse(what, "principal_name missing");
    };
    if m.ignore_case {
        return refuse(what, "ignore_case is not supported");
    }
    Ok(match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(s)) => NameMatch::Exact(s.clone()),
        Some(string_matcher::MatchPattern::Prefix(s)) => NameMatch::Prefix(s.clone()),
        Some(string_matcher::MatchPattern::Suffix(s)) => NameMatch::Suffix(s.clone()),
        Some(string_matcher::MatchPattern::Contains(s)) => NameMatch::Contains(s.clone()),
        Some(string_matcher::MatchPattern::SafeRegex(r)) => {
            NameMatch::regex(&r.regex).or_else(|e| refuse(what, e))?
        }
        _ => return refuse(what, "unsupported string matcher"),
    })
}

fn principal(p: &EnvoyPrincipal, what: &str, depth: usize) -> Result<Principal, Refused> {
    if depth > 16 {
        return refuse(what, "principals nested too deeply");
    }
    Ok(match &p.identifier {
        Some(principal::Identifier::Any(true)) => Principal::Any,
        Some(principal::Identifier::Authenticated(a)) => {
            Principal::Authenticated(string_match(&a.principal_name, what)?)
        }
        Some(principal::Identifier::AndIds(s)) => Principal::And(
            s.ids.iter().map(|p| principal(p, what, depth + 1)).collect::<Result<_, _>>()?,
        ),
        Some(principal::Identifier::OrIds(s)) => Principal::Or(
            s.ids.iter().map(|p| principal(p, what, depth + 1)).collect::<Result<_, _>>()?,
        ),
        Some(principal::Identifier::NotId(p)) => Principal::Not(Box::new(principal(p, what, depth + 1)?)),
        _ => return refuse(what, "only authenticated, any, and/or/not principals are supported (no IP or header principals)"),
    })
}

pub(super) fn rbac_filter(f: &RbacFilter, what: &str) -> Result<Rbac, Refused> {
    if f.matcher.is_some() || f.shadow_rules.is_some() || f.shadow_matcher.is_some() {
        return refuse(what, "RBAC matcher and shadow rules are not supported");
    }
    let Some(rules) = &f.rules else {
        return Ok(Rbac { rules: None });
    };
    let action = match rbac::Action::try_from(rules.action) {
        Ok(rbac::Action::Allow) => RbacAction::Allow,
        Ok(rbac::Action::Deny) => RbacAction::Deny,
        _ => return refuse(what, "only ALLOW and DENY actions are supported"),
    };
    let mut policies = Vec::new();
    // A map on the wire; sorted by name for a stable first match.
    let names: BTreeSet<&String> = rules.policies.keys().collect();
    for name in names {
        let p = &rules.policies[name];
        let pwhat = format!("{what} policy {name}");
        if p.condition.is_some() || p.checked_condition.is_some() {
            return refuse(&pwhat, "conditions are not supported");
        }
        let any = p
            .permissions
            .iter()
            .all(|perm| matches!(perm.rule, Some(permission::Rule::Any(true))));
        if !any || p.permissions.is_empty() {
            return refuse(
                &pwhat,
                "only `any` permissions are supported (L7 permissions are not)",
            );
        }
        policies.push(Policy {
            name: name.clone(),
            principals: p
                .principals
                .iter()
                .map(|pr| principal(pr, &pwhat, 0))
                .collect::<Result<_, _>>()?,
        });
    }
    Ok(Rbac {
        rules: Some((action, policies)),
    })
}
