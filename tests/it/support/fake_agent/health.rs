//! Discovery (spec §1.4, §1.6): `/health/connect/<service>` and prepared
//! queries, the entries they list, and `?dc=`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Extension;
use serde_json::{json, Value};

use super::blocking::{go_bool, Blocking, Params};
use super::encoding::fake_uuid;
use super::reply::{bad, indexed, refuse, Refusal, Reply};
use super::serve::{Caller, Sh};
use super::state::{AgentState, Cfg, Shared};
use super::{Health, Instance};

/// The Consul version the fake claims in node metadata.
const VERSION: &str = "1.21.0";

impl Shared {
    /// `?dc=` (or `?datacenter=`): the agent's own, or one where some
    /// instance lives; anything else has no route.
    fn datacenter(&self, q: &Params) -> Result<String, Refusal> {
        let dc = q.get("dc").or(q.get("datacenter")).unwrap_or("");
        if dc.is_empty() || dc == self.cfg.datacenter {
            return Ok(self.cfg.datacenter.clone());
        }
        let s = self.lock();
        let mut all = s.instances.values().flat_map(|(list, _)| list);
        if all.any(|i| i.datacenter.as_deref() == Some(dc)) {
            Ok(dc.to_string())
        } else {
            Err(refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "No path to datacenter",
            ))
        }
    }
}

impl AgentState {
    /// The mesh entries of `service` in `dc` that `keep` accepts, as JSON.
    fn entries(
        &self,
        cfg: &Cfg,
        service: &str,
        dc: &str,
        keep: impl Fn(&Instance) -> bool,
    ) -> Vec<Value> {
        let Some((list, index)) = self.instances.get(service) else {
            return Vec::new();
        };
        let in_dc = |i: &&Instance| i.datacenter.as_deref().unwrap_or(&cfg.datacenter) == dc;
        list.iter()
            .filter(in_dc)
            .filter(|i| keep(i))
            .map(|i| health_entry(service, i, dc, *index))
            .collect()
    }
}

/// `GET /v1/health/connect/:service` (§1.4).
pub(super) async fn health_connect(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Path(service): Path<String>,
    Query(q): Query<Params>,
) -> Reply {
    let b = Blocking::parse(&q)?;
    let passing = match q.get("passing") {
        None => false,
        Some("") => true,
        Some(v) => go_bool(v).ok_or_else(|| bad("Invalid value for ?passing"))?,
    };
    let dc = sh.datacenter(&q)?;
    sh.acl(&caller, "service:read", Some(&service))?;
    sh.block_on_index(&caller, &b, |s| s.instances_index(&service))
        .await?;
    let s = sh.lock();
    let keep = |i: &Instance| !passing || i.health == Health::Passing;
    let entries = s.entries(&sh.cfg, &service, &dc, keep);
    Ok(indexed(s.instances_index(&service), &Value::Array(entries)))
}

/// `GET /v1/query/:name/execute` (§1.6). Not blocking. Critical instances
/// are left out (a query's default); without `connect=true` only native
/// instances are instances of the service itself.
pub(super) async fn query_execute(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<Params>,
) -> Reply {
    let dc = sh.datacenter(&q)?;
    let connect = match q.get("connect") {
        None | Some("") => false,
        Some(v) => {
            go_bool(v).ok_or_else(|| bad(format!("Error parsing 'connect' value: {v:?}")))?
        }
    };
    let service = sh.lock().queries.get(&name).cloned();
    let Some(service) = service else {
        return Err(refuse(StatusCode::NOT_FOUND, "Query not found"));
    };
    sh.acl(&caller, "service:read", Some(&service))?;
    let s = sh.lock();
    let keep = |i: &Instance| i.health != Health::Critical && (connect || i.native);
    let mut nodes = s.entries(&sh.cfg, &service, &dc, keep);
    if let Some(limit) = q.get("limit").and_then(|l| l.parse().ok()) {
        nodes.truncate(limit);
    }
    let body = json!({
        "Service": service,
        "Nodes": nodes,
        "DNS": { "TTL": "" },
        "Datacenter": dc,
        "Failovers": 0,
    });
    Ok(indexed(s.instances_index(&service), &body))
}

/// One `/health/connect` entry (`{Node, Service, Checks}`) for `inst`.
fn health_entry(service: &str, inst: &Instance, dc: &str, index: u64) -> Value {
    let ip = inst.addr.ip().to_string();
    let port = inst.addr.port();
    let node = inst
        .node
        .clone()
        .unwrap_or_else(|| format!("node-{}", ip.replace(['.', ':'], "-")));
    let app_id = format!("{service}-{port}");
    let (id, name) = if inst.native {
        (app_id.clone(), service.to_string())
    } else {
        (
            format!("{app_id}-sidecar-proxy"),
            format!("{service}-sidecar-proxy"),
        )
    };
    let address = if inst.address_on_node {
        ""
    } else {
        ip.as_str()
    };
    let family = if inst.addr.is_ipv4() { "ipv4" } else { "ipv6" };
    let tagged = if address.is_empty() {
        Value::Null
    } else {
        let a = json!({ "Address": address, "Port": port });
        json!({ format!("lan_{family}"): a, format!("wan_{family}"): a })
    };
    let mut svc = json!({
        "ID": id,
        "Service": name,
        "Tags": [],
        "Address": address,
        "Meta": null,
        "Port": port,
        "Weights": { "Passing": 1, "Warning": 1 },
        "EnableTagOverride": false,
        "Proxy": { "MeshGateway": {}, "Expose": {} },
        "Connect": {},
        "CreateIndex": index,
        "ModifyIndex": index,
    });
    if !tagged.is_null() {
        svc["TaggedAddresses"] = tagged;
    }
    let check_name = if inst.native {
        svc["Connect"] = json!({ "Native": true });
        format!("Service '{service}' check")
    } else {
        svc["Kind"] = json!("connect-proxy");
        svc["Proxy"] = json!({
            "DestinationServiceName": service,
            "DestinationServiceID": app_id,
            "LocalServiceAddress": "127.0.0.1",
            "MeshGateway": {},
            "Expose": {},
        });
        "Connect Sidecar Listening".to_string()
    };
    let output = match inst.health {
        Health::Passing => format!("TCP connect {}: Success", inst.addr),
        _ => format!("dial tcp {}: connect: connection refused", inst.addr),
    };
    let check = |check_id: &str, name: &str, status: &str, output: &str, sid: &str, sname: &str| {
        json!({
            "Node": node, "CheckID": check_id, "Name": name, "Status": status,
            "Notes": "", "Output": output, "ServiceID": sid, "ServiceName": sname,
            "ServiceTags": [], "Type": if sid.is_empty() { "" } else { "tcp" },
            "Interval": if sid.is_empty() { "" } else { "10s" }, "Timeout": "",
            "ExposedPort": 0, "Definition": {}, "CreateIndex": index, "ModifyIndex": index,
        })
    };
    let checks = json!([
        check(
            "serfHealth",
            "Serf Health Status",
            "passing",
            "Agent alive and reachable",
            "",
            ""
        ),
        check(
            &format!("service:{id}"),
            &check_name,
            inst.health.as_str(),
            &output,
            &id,
            &name
        ),
    ]);
    json!({
        "Node": {
            "ID": fake_uuid(&node),
            "Node": node,
            "Address": ip,
            "Datacenter": dc,
            "TaggedAddresses": node_tagged_addresses(&ip),
            "Meta": node_meta(),
            "CreateIndex": index,
            "ModifyIndex": index,
        },
        "Service": svc,
        "Checks": checks,
    })
}

pub(super) fn node_tagged_addresses(ip: &str) -> Value {
    json!({ "lan": ip, "lan_ipv4": ip, "wan": ip, "wan_ipv4": ip })
}

pub(super) fn node_meta() -> Value {
    json!({ "consul-network-segment": "", "consul-version": VERSION })
}
