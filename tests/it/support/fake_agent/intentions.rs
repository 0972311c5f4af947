//! Intentions (spec §1.3, §1.11, §3): authorize, the match endpoint,
//! precedence, and SPIFFE IDs as Consul's parser classifies them.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::Extension;
use serde_json::{json, Map, Value};

use super::blocking::{Blocking, Params};
use super::body::{decode_body, str_of, AUTHORIZE};
use super::encoding::fake_uuid;
use super::reply::{bad, indexed, json_reply, Reply};
use super::serve::{Caller, Sh};
use super::state::AgentState;
use super::{Action, Intention};

impl Intention {
    /// Consul CE precedence: exact beats wildcard, destination first.
    fn precedence(&self) -> u8 {
        match (self.source == "*", self.destination == "*") {
            (false, false) => 9,
            (true, false) => 8,
            (false, true) => 6,
            (true, true) => 5,
        }
    }

    fn id(&self) -> String {
        fake_uuid(&format!("{} => {}", self.source, self.destination))
    }

    fn describe(&self) -> String {
        let detail = if self.l7 {
            "Permissions: 1".to_string()
        } else {
            format!("Action: {}", self.action_str().to_uppercase())
        };
        format!(
            "{} => {} (ID: {}, Precedence: {}, {detail})",
            self.source,
            self.destination,
            self.id(),
            self.precedence()
        )
    }

    fn action_str(&self) -> &'static str {
        match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

impl AgentState {
    /// Spec §3: the highest-precedence intention for `target` whose source
    /// matches the client decides; L7 intentions deny; else the default.
    fn authorize(&self, target: &str, client: &ServiceId) -> (bool, String) {
        if client.partition != "default" {
            let reason = format!(
                "Mismatched partitions: {:?} != \"default\"",
                client.partition
            );
            return (false, reason);
        }
        let matched = self
            .matching_intentions(false, target)
            .into_iter()
            .find(|i| {
                client.namespace == "default" && (i.source == "*" || i.source == client.name)
            });
        match matched {
            Some(i) if i.l7 => (false, format!("Matched L7 intention: {}", i.describe())),
            Some(i) => (
                i.action == Action::Allow,
                format!("Matched L4 intention: {}", i.describe()),
            ),
            None => (
                self.default_allow,
                "Default behavior configured by ACLs".into(),
            ),
        }
    }

    /// Intentions whose destination (or source, `by_source`) is `name` or
    /// `*`, highest precedence first.
    fn matching_intentions(&self, by_source: bool, name: &str) -> Vec<&Intention> {
        let side = |i: &Intention| {
            if by_source {
                i.source.clone()
            } else {
                i.destination.clone()
            }
        };
        let mut found: Vec<&Intention> = self
            .intentions
            .iter()
            .filter(|i| side(i) == name || side(i) == "*")
            .collect();
        found.sort_by(|a, b| {
            (b.precedence(), &a.source, &a.destination).cmp(&(
                a.precedence(),
                &b.source,
                &b.destination,
            ))
        });
        found
    }
}

/// `POST /v1/agent/connect/authorize` (§1.3, §3).
pub(super) async fn authorize(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Reply {
    let req = decode_body(&body, AUTHORIZE, "structs.ConnectAuthorizeRequest")?;
    let target = str_of(&req, "Target");
    if target.is_empty() {
        return Err(bad("Target service must be specified"));
    }
    let client = match parse_spiffe(&str_of(&req, "ClientCertURI")) {
        Some(Spiffe::Service(id)) => id,
        Some(Spiffe::Other) => return Err(bad("ClientCertURI not a valid Service identifier")),
        None => return Err(bad("ClientCertURI not a valid Connect identifier")),
    };
    sh.acl(&caller, "service:write", Some(&target))?;
    let (authorized, reason) = sh.lock().authorize(&target, &client);
    Ok(json_reply(
        &json!({ "Authorized": authorized, "Reason": reason }),
    ))
}

/// `GET /v1/connect/intentions/match?by=destination&name=<svc>` (§1.11).
pub(super) async fn intentions_match(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Query(q): Query<Params>,
) -> Reply {
    let b = Blocking::parse(&q)?;
    let by_source = match q.all("by").as_slice() {
        ["source"] => true,
        ["destination"] => false,
        [_] => {
            return Err(bad(
                "'by' parameter must be one of 'source' or 'destination'",
            ))
        }
        _ => return Err(bad("required query parameter 'by' not set")),
    };
    let names = q.all("name");
    if names.is_empty() {
        return Err(bad("required query parameter 'name' not set"));
    }
    for name in &names {
        sh.acl(&caller, "intention:read", Some(name))?;
    }
    sh.block_on_index(&caller, &b, |s| s.intentions_index)
        .await?;
    let s = sh.lock();
    let index = s.intentions_index;
    let matches: Map<String, Value> = names
        .iter()
        .map(|name| {
            let list = s.matching_intentions(by_source, name);
            let list = list.iter().map(|i| intention_json(i, index)).collect();
            (name.to_string(), Value::Array(list))
        })
        .collect();
    Ok(indexed(index, &Value::Object(matches)))
}

/// `structs.Intention` as the match endpoint returns it (CE: no partitions).
fn intention_json(i: &Intention, index: u64) -> Value {
    let mut v = json!({
        "ID": i.id(),
        "Description": "",
        "SourceNS": "default",
        "SourceName": i.source,
        "DestinationNS": "default",
        "DestinationName": i.destination,
        "SourceType": "consul",
        "Precedence": i.precedence(),
        "Meta": {},
        "CreateIndex": index,
        "ModifyIndex": index,
    });
    if i.l7 {
        v["Permissions"] = json!([{ "Action": "allow", "HTTP": { "PathPrefix": "/" } }]);
    } else {
        v["Action"] = json!(i.action_str());
    }
    v
}

/// A SPIFFE ID as Consul's parser classifies it (spec §2.1).
enum Spiffe {
    Service(ServiceId),
    /// An agent, server, mesh gateway or signing ID.
    Other,
}

struct ServiceId {
    partition: String,
    namespace: String,
    name: String,
}

/// `None` when the URI is not a Connect identifier at all.
fn parse_spiffe(uri: &str) -> Option<Spiffe> {
    let (scheme, rest) = uri.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("spiffe") {
        return None;
    }
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return None;
    }
    let segments: Vec<String> = if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').map(percent_decode).collect::<Option<_>>()?
    };
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let (partition, s) = match s.as_slice() {
        ["ap", p, rest @ ..] => (p.to_string(), rest),
        rest => ("default".to_string(), rest),
    };
    match s {
        ["ns", ns, "dc", dc, "svc", svc] if [ns, dc, svc].iter().all(|x| !x.is_empty()) => {
            Some(Spiffe::Service(ServiceId {
                partition,
                namespace: ns.to_string(),
                name: svc.to_string(),
            }))
        }
        ["agent", "client", "dc", _, "id", _]
        | ["agent", "server", "dc", _]
        | ["gateway", "mesh", "dc", _] => Some(Spiffe::Other),
        [] if host.contains('.') => Some(Spiffe::Other),
        _ => None,
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
