//! Local services and checks (spec §1.7–§1.9, §4.7): `/agent/service(s)`,
//! register and deregister, TTL check updates, and `/catalog/service`.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::Extension;
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::blocking::{Blocking, Params};
use super::body::{decode_body, str_of, CHECK_UPDATE};
use super::registration::{parse_registration, Check, Registration};
use super::reply::{bad, indexed, json_reply, refuse, Reply};
use super::serve::{Caller, Sh};
use super::state::{AgentState, Shared};
use super::Health;

impl AgentState {
    pub(super) fn register(&mut self, reg: Registration, replace_checks: bool) {
        let index = self.bump();
        let mut service = reg.service;
        service.index = index;
        let id = service.id.clone();
        if replace_checks {
            let keep: Vec<&str> = reg.checks.iter().map(|c| c.id.as_str()).collect();
            self.checks
                .retain(|cid, c| c.service_id != id || keep.contains(&cid.as_str()));
        }
        for def in reg.checks {
            let mut check = Check::new(def, &service);
            if let Some(old) = self.checks.get(&check.id) {
                if check.status_given.is_none() {
                    check.status.clone_from(&old.status);
                    check.output.clone_from(&old.output);
                }
                check.updated = old.updated;
                check.updates = old.updates;
            }
            self.checks.insert(check.id.clone(), check);
        }
        self.services.insert(id, service);
        self.services_index = index;
    }

    pub(super) fn deregister(&mut self, id: &str) -> bool {
        if self.services.remove(id).is_none() {
            return false;
        }
        self.checks.retain(|_, c| c.service_id != id);
        self.services_index = self.bump();
        true
    }
}

/// `GET /v1/agent/services` (§1.7): ID → AgentService.
pub(super) async fn agent_services(State(sh): Sh, Extension(caller): Extension<Caller>) -> Reply {
    sh.acl(&caller, "service:read", None)?;
    let s = sh.lock();
    let all: Map<String, Value> = s
        .services
        .iter()
        .map(|(id, svc)| (id.clone(), svc.agent_json(&sh.cfg.datacenter)))
        .collect();
    Ok(json_reply(&Value::Object(all)))
}

/// `GET /v1/agent/service/:id` (§1.7), hash-blocking.
pub(super) async fn agent_service(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<Params>,
) -> Reply {
    let b = Blocking::parse(&q)?;
    sh.resolve(&caller)?;
    if let Some(hash) = &b.hash {
        let dc = &sh.cfg.datacenter;
        let hash_of = |s: &AgentState| s.services.get(&id).map(|svc| svc.agent_json_hashed(dc).1);
        let changed = |s: &AgentState| hash_of(s).as_ref() != Some(hash);
        sh.wait_until(&caller.alive, Some(b.deadline()), changed)
            .await?;
    }
    let s = sh.lock();
    let Some(svc) = s.services.get(&id) else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!("unknown service ID: {id}"),
        ));
    };
    sh.acl(&caller, "service:read", Some(&svc.name))?;
    let (body, hash) = svc.agent_json_hashed(&sh.cfg.datacenter);
    let mut resp = json_reply(&body);
    let hash = HeaderValue::from_str(&hash).expect("hash header");
    resp.headers_mut().insert("X-Consul-ContentHash", hash);
    Ok(resp)
}

/// `PUT /v1/agent/service/register` (§1.8).
pub(super) async fn register(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Query(q): Query<Params>,
    body: Bytes,
) -> Reply {
    let reg = parse_registration(&body)?;
    sh.acl(&caller, "service:write", Some(&reg.service.name))?;
    let replace = matches!(q.get("replace-existing-checks"), Some("" | "true"));
    sh.change(|s| s.register(reg, replace));
    Ok(StatusCode::OK.into_response())
}

/// `PUT /v1/agent/service/deregister/:id` (§1.8).
pub(super) async fn deregister(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Reply {
    sh.resolve(&caller)?;
    let name = sh.lock().services.get(&id).map(|s| s.name.clone());
    let Some(name) = name else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!("Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."),
        ));
    };
    sh.acl(&caller, "service:write", Some(&name))?;
    sh.change(|s| s.deregister(&id));
    Ok(StatusCode::OK.into_response())
}

/// `PUT /v1/agent/check/pass/:id?note=` (§1.9).
pub(super) async fn check_pass(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<Params>,
) -> Reply {
    update_check(
        &sh,
        &caller,
        &id,
        Health::Passing,
        q.get("note").unwrap_or(""),
    )
}

/// `PUT /v1/agent/check/warn/:id?note=` (§1.9).
pub(super) async fn check_warn(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<Params>,
) -> Reply {
    update_check(
        &sh,
        &caller,
        &id,
        Health::Warning,
        q.get("note").unwrap_or(""),
    )
}

/// `PUT /v1/agent/check/fail/:id?note=` (§1.9).
pub(super) async fn check_fail(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<Params>,
) -> Reply {
    update_check(
        &sh,
        &caller,
        &id,
        Health::Critical,
        q.get("note").unwrap_or(""),
    )
}

/// `PUT /v1/agent/check/update/:id` with `{Status, Output}` (§1.9).
pub(super) async fn check_update(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply {
    let update = decode_body(&body, CHECK_UPDATE, "agent.checkUpdate")?;
    let status = str_of(&update, "Status");
    let health = match status.as_str() {
        "passing" => Health::Passing,
        "warning" => Health::Warning,
        "critical" => Health::Critical,
        _ => return Err(bad(format!("Invalid check status: '{status}'"))),
    };
    update_check(&sh, &caller, &id, health, &str_of(&update, "Output"))
}

fn update_check(sh: &Shared, caller: &Caller, id: &str, health: Health, output: &str) -> Reply {
    sh.resolve(caller)?;
    let check = sh
        .lock()
        .checks
        .get(id)
        .map(|c| (c.service_name.clone(), c.ttl));
    let Some((service, ttl)) = check else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!(
                "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."
            ),
        ));
    };
    sh.acl(caller, "service:write", Some(&service))?;
    if ttl.is_none() {
        return Err(refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("CheckID {id:?} does not have associated TTL"),
        ));
    }
    sh.change(|s| {
        if let Some(c) = s.checks.get_mut(id) {
            c.status = health.as_str().into();
            c.output = output.into();
            c.updated = Some(Instant::now());
            c.updates += 1;
        }
    });
    Ok(StatusCode::OK.into_response())
}

/// `GET /v1/catalog/service/:name` (§4.7 reconcile): the local
/// registrations with that name, as the catalog has them.
pub(super) async fn catalog_service(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<Params>,
) -> Reply {
    let b = Blocking::parse(&q)?;
    sh.acl(&caller, "service:read", Some(&name))?;
    sh.block_on_index(&caller, &b, |s| s.services_index).await?;
    let s = sh.lock();
    let entries: Vec<Value> = s
        .services
        .values()
        .filter(|svc| svc.name == name)
        .map(|svc| svc.catalog_json(&sh.cfg))
        .collect();
    Ok(indexed(s.services_index, &Value::Array(entries)))
}
