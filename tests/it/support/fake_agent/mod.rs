//! A fake Consul agent: the agent HTTP API a proxy uses (spec §1), served
//! over real HTTP on 127.0.0.1 from in-memory state that tests change
//! through knobs.
//!
//! Faithful to Consul CE where ferry can notice: PascalCase JSON with Go's
//! `omitempty` gaps, plain-text error bodies and their wording, request
//! bodies decoded with unknown fields rejected (names matched
//! case-insensitively, snake_case accepted, as Consul does), `ns`/`partition`
//! refused, index- and hash-blocking queries with `wait` (default 5 min, cap
//! 10 min), `X-Consul-Index` never 0, authorize evaluated from intentions
//! (§3), ACLs with default policy deny.
//!
//! Simplified, on purpose:
//! - A blocking query that times out returns after `wait + wait/16`: always
//!   the largest jitter Consul may add, so a client whose HTTP timeout is too
//!   tight fails here rather than in production.
//! - ACLs know one token, which may do everything. No token is the anonymous
//!   token, which may do nothing; any other token is `ACL not found`. Read
//!   endpoints answer 403 where Consul would sometimes filter to an empty
//!   list, so a forgotten token is loud. Roots need no token, as in Consul.
//! - Health entries come from `set_instances`, not from registrations; local
//!   registrations feed `/agent/service(s)` and `/catalog/service` only.
//! - Leaves come from `set_leaf`, or are issued on demand by the CA given in
//!   [`AgentOpts::for_pki`]; a root rotation does not re-issue them.
//! - TTL checks expire lazily: [`FakeAgent::check`] reports `critical` once
//!   the TTL has passed without an update.
//!
//! Every request is logged ([`FakeAgent::calls`]) before faults apply, so a
//! failing test can print exactly what ferry sent.

// Layout: this file is the agent and every knob tests turn; the other
// files are its sections, each named for what it answers or holds.
mod blocking;
mod body;
mod bridge;
mod ca;
mod encoding;
mod health;
mod intentions;
mod model;
mod registration;
mod reply;
mod serve;
mod services;
mod state;

pub use bridge::{expose_check, http_check};
pub use encoding::sha1;
pub use model::{Action, AgentOpts, Call, CheckState, Health, Instance, Intention, Root};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use ferry::identity::dev_ca::{DevCa, Leaf};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use body::str_of;
use bridge::merged_upstream_config;
use registration::{parse_registration, Check};
use serve::{bind, serve};
use state::{AgentState, Armed, Cfg, Fault, Shared};

// ---------------------------------------------------------------------------
// The agent.

/// A fake Consul agent on 127.0.0.1, serving until dropped.
pub struct FakeAgent {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The accept loop; `None` while paused.
    server: Mutex<Option<JoinHandle<()>>>,
}

impl FakeAgent {
    /// Binds 127.0.0.1:0 and serves; returns once the listener is bound.
    pub async fn start(opts: AgentOpts) -> FakeAgent {
        let issuer = opts
            .issuer
            .as_ref()
            .map(|(cert, key)| DevCa::load(cert, key).expect("fake agent: load CA"));
        let mut state = AgentState::new(issuer);
        let roots = opts.roots.iter().enumerate();
        state.set_roots(roots.map(|(i, pem)| Root {
            active: i == 0,
            ..Root::active(pem)
        }));
        let shared = Arc::new(Shared {
            cfg: Cfg {
                trust_domain: opts.trust_domain,
                datacenter: opts.datacenter,
                node: opts.node,
                token: opts.token,
            },
            state: Mutex::new(state),
            bell: watch::channel(()).0,
        });
        let listener = bind("127.0.0.1:0".parse().expect("addr")).await;
        let addr = listener.local_addr().expect("local addr");
        let server = serve(listener, shared.clone());
        FakeAgent {
            shared,
            addr,
            server: Mutex::new(Some(server)),
        }
    }

    /// `http://127.0.0.1:<port>`, for `-http-addr` / `CONSUL_HTTP_ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    // -- CA ------------------------------------------------------------------

    /// Replaces the roots list; blocked roots queries return.
    pub fn set_roots(&self, roots: Vec<Root>) {
        self.shared.change(|s| s.set_roots(roots));
    }

    /// A CA rotation as Consul does it: `new_root_pem` becomes the active
    /// root and the old roots stay listed, inactive.
    pub fn rotate(&self, new_root_pem: &str) {
        self.shared.change(|s| {
            let mut roots: Vec<Root> = s.roots.iter().map(|r| r.root.clone()).collect();
            roots.iter_mut().for_each(|r| r.active = false);
            roots.push(Root::active(new_root_pem));
            s.set_roots(roots);
        });
    }

    /// The roots' current `X-Consul-Index`.
    pub fn roots_index(&self) -> u64 {
        self.shared.lock().roots_index
    }

    /// Sets the leaf handed out for `service` (`CertPEM` is `leaf.cert_pem`
    /// as given); blocked leaf queries for it return.
    pub fn set_leaf(&self, service: &str, leaf: &Leaf) {
        self.shared.change(|s| {
            let index = s.bump();
            s.leaves.insert(service.into(), (leaf.clone(), index));
        });
    }

    /// The leaf's current `X-Consul-Index` for `service`.
    pub fn leaf_index(&self, service: &str) -> u64 {
        self.shared.lock().leaf_index(service)
    }

    // -- Discovery -----------------------------------------------------------

    /// Sets the mesh endpoints of `service`; blocked health queries for it return.
    pub fn set_instances(&self, service: &str, instances: Vec<Instance>) {
        self.shared.change(|s| {
            let index = s.bump();
            s.instances.insert(service.into(), (instances, index));
        });
    }

    /// The health query's current `X-Consul-Index` for `service`.
    pub fn instances_index(&self, service: &str) -> u64 {
        self.shared.lock().instances_index(service)
    }

    /// Defines prepared query `name` over `service`.
    pub fn set_query(&self, name: &str, service: &str) {
        self.shared
            .change(|s| s.queries.insert(name.into(), service.into()));
    }

    // -- Intentions ----------------------------------------------------------

    /// Replaces all intentions; blocked intention-match queries return.
    pub fn set_intentions(&self, intentions: Vec<Intention>) {
        self.shared.change(|s| {
            s.intentions = intentions;
            s.intentions_index = s.bump();
        });
    }

    /// Adds an intention, replacing one with the same source and destination.
    pub fn add_intention(&self, intention: Intention) {
        self.shared.change(|s| {
            s.intentions.retain(|i| {
                (i.source.as_str(), i.destination.as_str())
                    != (&intention.source, &intention.destination)
            });
            s.intentions.push(intention);
            s.intentions_index = s.bump();
        });
    }

    /// The answer when no intention matches (the ACL default policy).
    /// Default: allow.
    pub fn set_default_allow(&self, allow: bool) {
        self.shared.change(|s| s.default_allow = allow);
    }

    /// The intentions' current `X-Consul-Index`.
    pub fn intentions_index(&self) -> u64 {
        self.shared.lock().intentions_index
    }

    // -- Local services and checks -------------------------------------------

    /// Registers a service exactly as `PUT /agent/service/register` would
    /// (the body is the registration JSON); panics if the agent would refuse it.
    pub fn register(&self, registration: Value) {
        let reg = parse_registration(registration.to_string().as_bytes())
            .unwrap_or_else(|r| panic!("fake agent refused the registration: {r:?}"));
        self.shared.change(|s| s.register(reg, false));
    }

    /// Registers `registration` as the agent does when a `service-defaults`
    /// entry configures some of its upstreams (`defaults`: upstream name,
    /// that entry's settings for it): each such upstream's `Config` is the
    /// merged entry overlaid with what the registration itself says (local
    /// keys win), and it is marked `CentrallyConfigured`.
    pub fn register_with_service_defaults(
        &self,
        mut registration: Value,
        defaults: &[(&str, Value)],
    ) {
        let proxy = registration
            .get_mut("Proxy")
            .and_then(|p| p.get_mut("Upstreams"))
            .and_then(Value::as_array_mut);
        for u in proxy.into_iter().flatten() {
            let name = str_of(u, "DestinationName");
            let Some((_, entry)) = defaults.iter().find(|(n, _)| *n == name) else {
                continue;
            };
            let mut config = merged_upstream_config(entry);
            if let Some(Value::Object(local)) = u.get("Config") {
                for (k, v) in local {
                    config.insert(k.clone(), v.clone());
                }
            }
            u["Config"] = Value::Object(config);
            u["CentrallyConfigured"] = json!(true);
        }
        self.register(registration);
    }

    /// Removes a local service and its checks; false if it was unknown.
    pub fn deregister(&self, id: &str) -> bool {
        self.shared.change(|s| s.deregister(id))
    }

    /// A local service as `GET /agent/service/<id>` shows it.
    pub fn service(&self, id: &str) -> Option<Value> {
        let s = self.shared.lock();
        let svc = s.services.get(id)?;
        let (body, _) = svc.agent_json_hashed(&self.shared.cfg.datacenter);
        Some(body)
    }

    /// The IDs of all local services.
    pub fn service_ids(&self) -> Vec<String> {
        self.shared.lock().services.keys().cloned().collect()
    }

    /// A check's status, output and update history.
    pub fn check(&self, check_id: &str) -> Option<CheckState> {
        self.shared.lock().checks.get(check_id).map(Check::state)
    }

    // -- Faults --------------------------------------------------------------

    /// Answers the next `n` requests whose path starts with `path_prefix`
    /// with `status` and the plain-text `body`.
    pub fn fail_next(&self, path_prefix: &str, n: usize, status: u16, body: &str) {
        let status = StatusCode::from_u16(status).expect("status code");
        self.add_fault(path_prefix, n, Fault::Fail(status, body.into()));
    }

    /// Answers the next `n` matching requests with a 200 whose body is not JSON.
    pub fn malformed_next(&self, path_prefix: &str, n: usize) {
        self.add_fault(path_prefix, n, Fault::Malformed);
    }

    /// The next matching response with an `X-Consul-Index` carries a lower
    /// one (half of it), as after a snapshot restore.
    pub fn set_index_backwards(&self, path_prefix: &str) {
        self.shared
            .change(|s| s.backwards.push(path_prefix.to_string()));
    }

    /// While on, matching requests are held open (before any other
    /// processing) until turned off, the client gives up, or a pause.
    pub fn stall(&self, path_prefix: &str, on: bool) {
        self.shared.change(|s| {
            s.stalled.retain(|p| p != path_prefix);
            if on {
                s.stalled.push(path_prefix.to_string());
            }
        });
    }

    /// The agent goes down: the listener closes (connections are refused)
    /// and every open connection, including blocked queries, is cut.
    /// State is kept.
    pub async fn pause(&self) {
        let server = self.server.lock().expect("server lock").take();
        if let Some(task) = server {
            task.abort();
            let _ = task.await;
        }
        self.shared.change(|s| {
            s.alive.cancel();
            s.alive = CancellationToken::new();
        });
    }

    /// The agent comes back on the same port.
    pub async fn resume(&self) {
        if self.server.lock().expect("server lock").is_some() {
            return;
        }
        let listener = bind(self.addr).await;
        let server = serve(listener, self.shared.clone());
        *self.server.lock().expect("server lock") = Some(server);
    }

    fn add_fault(&self, prefix: &str, n: usize, fault: Fault) {
        self.shared.change(|s| {
            s.faults.push(Armed {
                prefix: prefix.into(),
                left: n,
                fault,
            })
        });
    }

    // -- Call log ------------------------------------------------------------

    /// Every request received, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    /// How many `method` requests had a path starting with `path_prefix`.
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.matching(method, path_prefix).len()
    }

    /// The call log, one request a line, for failure messages.
    pub fn call_log(&self) -> String {
        let calls = self.calls();
        calls.iter().map(|c| format!("  {c:?}\n")).collect()
    }

    /// Resolves with the first matching call (already logged or arriving
    /// within `within`); panics with the call log otherwise.
    pub async fn wait_for_call(&self, method: &str, path_prefix: &str, within: Duration) -> Call {
        let mut calls = self.wait_for_calls(method, path_prefix, 1, within).await;
        calls.swap_remove(0)
    }

    /// Resolves with all matching calls once there are at least `n`;
    /// panics with the call log after `within`.
    pub async fn wait_for_calls(
        &self,
        method: &str,
        path_prefix: &str,
        n: usize,
        within: Duration,
    ) -> Vec<Call> {
        let deadline = Instant::now() + within;
        loop {
            let mut bell = self.shared.bell.subscribe();
            let calls = self.matching(method, path_prefix);
            if calls.len() >= n {
                return calls;
            }
            if tokio::time::timeout_at(deadline, bell.changed())
                .await
                .is_err()
            {
                panic!(
                    "fake agent: wanted {n} x {method} {path_prefix}* within {within:?}, got {}; calls:\n{}",
                    calls.len(),
                    self.call_log()
                );
            }
        }
    }

    fn matching(&self, method: &str, path_prefix: &str) -> Vec<Call> {
        let s = self.shared.lock();
        let hit = |c: &&Call| c.method == method && c.path.starts_with(path_prefix);
        s.calls.iter().filter(hit).cloned().collect()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        if let Ok(server) = self.server.get_mut() {
            if let Some(task) = server.take() {
                task.abort();
            }
        }
        self.shared.lock().alive.cancel();
    }
}
