//! Local registrations (spec §1.7–§1.9): a registration body decoded and
//! validated as `AgentRegisterService` does, its checks, and how the
//! service is shown again (`api.AgentService`, `CatalogService`).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::body::{bool_of, decode_body, duration_of, field, str_of, u64_of, SERVICE};
use super::bridge::api_expose;
use super::encoding::fake_uuid;
use super::health::{node_meta, node_tagged_addresses};
use super::reply::{bad, Refusal};
use super::state::Cfg;
use super::CheckState;

pub(super) struct Registration {
    pub(super) service: LocalService,
    pub(super) checks: Vec<CheckDef>,
}

#[derive(Clone)]
pub(super) struct LocalService {
    kind: String,
    pub(super) id: String,
    pub(super) name: String,
    tags: Vec<String>,
    meta: Value,
    port: u64,
    address: String,
    tagged_addresses: Option<Value>,
    weights: (u64, u64),
    enable_tag_override: bool,
    /// The `api.AgentServiceConnectProxyConfig` JSON (connect-proxy only).
    proxy: Option<Value>,
    native: bool,
    /// The raft index of the last registration.
    pub(super) index: u64,
}

pub(super) struct CheckDef {
    pub(super) id: String,
    name: String,
    kind: &'static str,
    ttl: Option<Duration>,
    status: Option<String>,
}

pub(super) struct Check {
    pub(super) id: String,
    name: String,
    pub(super) service_id: String,
    pub(super) service_name: String,
    kind: &'static str,
    pub(super) ttl: Option<Duration>,
    pub(super) status: String,
    /// The status the registration asked for, if any.
    pub(super) status_given: Option<String>,
    pub(super) output: String,
    registered: Instant,
    pub(super) updated: Option<Instant>,
    pub(super) updates: u64,
}

/// Decodes and validates a registration as `AgentRegisterService` does.
pub(super) fn parse_registration(body: &[u8]) -> Result<Registration, Refusal> {
    let v = decode_body(body, SERVICE, "structs.ServiceDefinition")?;
    let name = str_of(&v, "Name");
    if name.is_empty() {
        return Err(bad("Missing service name"));
    }
    let address = str_of(&v, "Address");
    if matches!(address.as_str(), "0.0.0.0" | "::" | "[::]") {
        return Err(bad("Invalid service address"));
    }
    let id = Some(str_of(&v, "ID"))
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| name.clone());
    let kind = str_of(&v, "Kind");
    let native = field(&v, "Connect").is_some_and(|c| bool_of(c, "Native"));
    let proxy = field(&v, "Proxy");
    let errors = validate_service(&v, &kind, native, proxy);
    if !errors.is_empty() {
        return Err(bad(format!("Validation failed: {}", multierror(&errors))));
    }
    let weights = field(&v, "Weights").map_or((1, 1), |w| {
        (u64_of(w, "Passing").max(1), u64_of(w, "Warning"))
    });
    let service = LocalService {
        tags: field(&v, "Tags")
            .and_then(Value::as_array)
            .map(|t| {
                t.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        meta: field(&v, "Meta").cloned().unwrap_or_else(|| json!({})),
        port: u64_of(&v, "Port"),
        tagged_addresses: field(&v, "TaggedAddresses").cloned(),
        weights,
        enable_tag_override: bool_of(&v, "EnableTagOverride"),
        proxy: (kind == "connect-proxy").then(|| api_proxy(proxy.unwrap_or(&Value::Null))),
        native,
        index: 0,
        kind,
        id,
        name,
        address,
    };
    let checks = parse_checks(&v, &service)?;
    Ok(Registration { service, checks })
}

/// `NodeService.Validate` for the rules a proxy meets.
fn validate_service(v: &Value, kind: &str, native: bool, proxy: Option<&Value>) -> Vec<String> {
    let mut errors = Vec::new();
    let no_port = u64_of(v, "Port") == 0 && str_of(v, "SocketPath").is_empty();
    if kind == "connect-proxy" {
        if no_port {
            errors.push("Port or SocketPath must be set for a connect-proxy".to_string());
        }
        let dest = proxy.map_or(String::new(), |p| str_of(p, "DestinationServiceName"));
        if dest.trim().is_empty() {
            errors.push(
                "Proxy.DestinationServiceName must be non-empty for Connect proxy services".into(),
            );
        }
        if dest == "*" {
            errors.push(
                "Proxy.DestinationServiceName must not be a wildcard for Connect proxy services"
                    .into(),
            );
        }
        if native {
            errors.push("A Proxy cannot also be Connect Native, only typical services".into());
        }
        let upstreams = proxy.and_then(|p| field(p, "Upstreams")?.as_array().cloned());
        for u in upstreams.unwrap_or_default() {
            let kind = str_of(&u, "DestinationType");
            if !matches!(kind.as_str(), "" | "service" | "prepared_query") {
                errors.push(format!("unknown upstream destination type: {kind:?}"));
            }
            if str_of(&u, "DestinationName").is_empty() {
                errors.push("upstream destination name cannot be empty".into());
            }
        }
    }
    if native && no_port {
        errors.push("Port or SocketPath must be set for a Connect native service.".into());
    }
    errors
}

/// hashicorp/go-multierror's format.
fn multierror(errors: &[String]) -> String {
    let head = match errors.len() {
        1 => "1 error occurred:".to_string(),
        n => format!("{n} errors occurred:"),
    };
    let items: String = errors.iter().map(|e| format!("\n\t* {e}")).collect();
    format!("{head}{items}\n\n")
}

/// `Check` and `Checks`, with Consul's default IDs and names.
fn parse_checks(v: &Value, service: &LocalService) -> Result<Vec<CheckDef>, Refusal> {
    let listed = field(v, "Checks").and_then(Value::as_array);
    let defs: Vec<&Value> = field(v, "Check")
        .into_iter()
        .chain(listed.into_iter().flatten())
        .collect();
    let total = defs.len();
    let mut out = Vec::new();
    for (i, c) in defs.into_iter().enumerate() {
        let status = str_of(c, "Status");
        if !matches!(status.as_str(), "" | "passing" | "warning" | "critical") {
            return Err(bad(
                "Status for checks must 'passing', 'warning', 'critical'",
            ));
        }
        let ttl = duration_of(c, "TTL");
        let kind = check_kind(c, ttl).map_err(|e| bad(format!("Invalid check: {e}")))?;
        let id = match str_of(c, "CheckID") {
            id if !id.is_empty() => id,
            _ if total == 1 => format!("service:{}", service.id),
            _ => format!("service:{}:{}", service.id, i + 1),
        };
        let name = Some(str_of(c, "Name"))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("Service '{}' check", service.name));
        out.push(CheckDef {
            id,
            name,
            kind,
            ttl,
            status: Some(status).filter(|s| !s.is_empty()),
        });
    }
    Ok(out)
}

/// `CheckType.Validate`, and what kind of check it is.
fn check_kind(c: &Value, ttl: Option<Duration>) -> Result<&'static str, &'static str> {
    let interval = duration_of(c, "Interval").is_some();
    let has = |name: &str| !str_of(c, name).is_empty();
    let script = field(c, "Args").or(field(c, "ScriptArgs")).is_some();
    let alias = has("AliasService") || has("AliasNode");
    let by_interval = [
        ("http", has("HTTP")),
        ("tcp", has("TCP")),
        ("udp", has("UDP")),
        ("grpc", has("GRPC")),
        ("h2ping", has("H2PING")),
        ("os_service", has("OSService")),
        ("script", script),
    ];
    let interval_kind = by_interval.iter().find(|(_, on)| *on).map(|(k, _)| *k);
    if interval && ttl.is_some() {
        return Err("Interval and TTL cannot both be specified");
    }
    match interval_kind {
        Some(_) if !interval => {
            Err("Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks")
        }
        Some(_) if alias => Err("Interval cannot be set for Alias checks"),
        Some(kind) => Ok(kind),
        None if alias && ttl.is_some() => Err("TTL must be not be set for Alias checks"),
        None if alias => Ok("alias"),
        None if ttl.is_none() => Err("TTL must be > 0 for TTL checks"),
        None => Ok("ttl"),
    }
}

impl Check {
    pub(super) fn new(def: CheckDef, service: &LocalService) -> Check {
        Check {
            id: def.id,
            name: def.name,
            service_id: service.id.clone(),
            service_name: service.name.clone(),
            kind: def.kind,
            ttl: def.ttl,
            status: def.status.clone().unwrap_or_else(|| "critical".into()),
            status_given: def.status,
            output: String::new(),
            registered: Instant::now(),
            updated: None,
            updates: 0,
        }
    }

    /// What a test sees; a TTL check not updated within its TTL is critical.
    pub(super) fn state(&self) -> CheckState {
        let last = self.updated.unwrap_or(self.registered);
        let expired = self.ttl.is_some_and(|ttl| last.elapsed() > ttl);
        let (status, output) = if expired {
            ("critical".to_string(), "TTL expired".to_string())
        } else {
            (self.status.clone(), self.output.clone())
        };
        CheckState {
            id: self.id.clone(),
            name: self.name.clone(),
            service_id: self.service_id.clone(),
            kind: self.kind.into(),
            status,
            output,
            ttl: self.ttl,
            updated: self.updated,
            updates: self.updates,
        }
    }
}

/// A registration's `Proxy` as `api.AgentServiceConnectProxyConfig`
/// serializes it: empty fields omitted, `DestinationType` defaulted.
fn api_proxy(p: &Value) -> Value {
    let upstreams: Vec<Value> = field(p, "Upstreams")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|u| {
            let kind = Some(str_of(u, "DestinationType"))
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| "service".into());
            let mut out = omit_empty(json!({
                "DestinationType": kind,
                "DestinationNamespace": str_of(u, "DestinationNamespace"),
                "DestinationPartition": str_of(u, "DestinationPartition"),
                "DestinationPeer": str_of(u, "DestinationPeer"),
                "Datacenter": str_of(u, "Datacenter"),
                "LocalBindAddress": str_of(u, "LocalBindAddress"),
                "LocalBindPort": u64_of(u, "LocalBindPort"),
                "LocalBindSocketPath": str_of(u, "LocalBindSocketPath"),
                "LocalBindSocketMode": str_of(u, "LocalBindSocketMode"),
                "Config": field(u, "Config").cloned(),
                "CentrallyConfigured": bool_of(u, "CentrallyConfigured"),
            }));
            out["DestinationName"] = json!(str_of(u, "DestinationName"));
            out["MeshGateway"] = field(u, "MeshGateway").cloned().unwrap_or(json!({}));
            out
        })
        .collect();
    let mut out = omit_empty(json!({
        "DestinationServiceName": str_of(p, "DestinationServiceName"),
        "DestinationServiceID": str_of(p, "DestinationServiceID"),
        "LocalServiceAddress": str_of(p, "LocalServiceAddress"),
        "LocalServicePort": u64_of(p, "LocalServicePort"),
        "LocalServiceSocketPath": str_of(p, "LocalServiceSocketPath"),
        "Mode": str_of(p, "Mode"),
        "TransparentProxy": field(p, "TransparentProxy").cloned(),
        "Config": field(p, "Config").cloned(),
        "Upstreams": upstreams,
    }));
    out["MeshGateway"] = field(p, "MeshGateway").cloned().unwrap_or(json!({}));
    out["Expose"] = api_expose(field(p, "Expose"));
    out
}

/// Go's `omitempty`: drops "", 0, false, null and empty arrays and maps.
pub(super) fn omit_empty(mut v: Value) -> Value {
    if let Value::Object(map) = &mut v {
        map.retain(|_, x| match x {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
        });
    }
    v
}

impl LocalService {
    /// `api.AgentService`, as `/agent/services` lists it.
    pub(super) fn agent_json(&self, dc: &str) -> Value {
        let mut v = json!({
            "ID": self.id,
            "Service": self.name,
            "Tags": self.tags,
            "Meta": self.meta,
            "Port": self.port,
            "Address": self.address,
            "Weights": { "Passing": self.weights.0, "Warning": self.weights.1 },
            "EnableTagOverride": self.enable_tag_override,
            "Datacenter": dc,
        });
        if !self.kind.is_empty() {
            v["Kind"] = json!(self.kind);
        }
        if let Some(t) = self
            .tagged_addresses
            .as_ref()
            .filter(|t| t.as_object().is_some_and(|o| !o.is_empty()))
        {
            v["TaggedAddresses"] = t.clone();
        }
        if let Some(proxy) = &self.proxy {
            v["Proxy"] = proxy.clone();
        }
        if self.native {
            v["Connect"] = json!({ "Native": true });
        }
        v
    }

    /// `GET /agent/service/:id`: the service with its `ContentHash`, and the hash.
    pub(super) fn agent_json_hashed(&self, dc: &str) -> (Value, String) {
        let mut v = self.agent_json(dc);
        let mut h = DefaultHasher::new();
        v.to_string().hash(&mut h);
        let hash = format!("{:x}", h.finish());
        v["ContentHash"] = json!(hash);
        (v, hash)
    }

    /// A `CatalogService` entry: this service on the agent's node.
    pub(super) fn catalog_json(&self, cfg: &Cfg) -> Value {
        let proxy = self
            .proxy
            .clone()
            .unwrap_or_else(|| json!({ "MeshGateway": {}, "Expose": {} }));
        json!({
            "ID": fake_uuid(&cfg.node),
            "Node": cfg.node,
            "Address": "127.0.0.1",
            "Datacenter": cfg.datacenter,
            "TaggedAddresses": node_tagged_addresses("127.0.0.1"),
            "NodeMeta": node_meta(),
            "ServiceKind": self.kind,
            "ServiceID": self.id,
            "ServiceName": self.name,
            "ServiceTags": self.tags,
            "ServiceAddress": self.address,
            "ServiceTaggedAddresses": self.tagged_addresses,
            "ServiceWeights": { "Passing": self.weights.0, "Warning": self.weights.1 },
            "ServiceMeta": self.meta,
            "ServicePort": self.port,
            "ServiceSocketPath": "",
            "ServiceEnableTagOverride": self.enable_tag_override,
            "ServiceProxy": proxy,
            "ServiceConnect": if self.native { json!({ "Native": true }) } else { json!({}) },
            "CreateIndex": self.index,
            "ModifyIndex": self.index,
        })
    }
}
