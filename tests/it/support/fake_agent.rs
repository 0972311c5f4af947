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

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Router};
use ferry::identity::dev_ca::{DevCa, Leaf};
use serde_json::{json, Map, Value};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::public_key::PublicKey;

use super::Pki;

/// `wait` when a blocking query sends none (spec §1.0).
const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// The largest `wait` the agent honours.
const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
/// The first raft index handed out: every index is well above 1, so
/// `set_index_backwards` can always go lower without reaching 0.
const FIRST_INDEX: u64 = 10;
/// The Consul version the fake claims in node metadata.
const VERSION: &str = "1.21.0";

// ---------------------------------------------------------------------------
// What tests build and read.

/// How to start a [`FakeAgent`].
#[derive(Clone)]
pub struct AgentOpts {
    /// `TrustDomain` in the roots answer (`<cluster-id>.consul`). Empty means
    /// the CA is not bootstrapped (leaf requests then fail with 500).
    pub trust_domain: String,
    /// The agent's datacenter: local services' `Datacenter` and the default
    /// for `?dc=`. Default `dc1`.
    pub datacenter: String,
    /// The agent's node name (in `/catalog/service`). Default `fake-agent`.
    pub node: String,
    /// When set, ACLs are on with default policy deny and this is the one
    /// token that works. Never printed.
    pub token: Option<String>,
    /// Root certificates (PEM) listed at start; the first is active.
    pub roots: Vec<String>,
    /// CA certificate and key files: leaves for services without a
    /// `set_leaf` are issued from them on first request.
    pub issuer: Option<(PathBuf, PathBuf)>,
}

impl Default for AgentOpts {
    fn default() -> AgentOpts {
        AgentOpts {
            trust_domain: ferry::identity::dev_ca::random_trust_domain(),
            datacenter: "dc1".into(),
            node: "fake-agent".into(),
            token: None,
            roots: Vec::new(),
            issuer: None,
        }
    }
}

impl AgentOpts {
    /// An agent whose CA is `pki`'s: its trust domain, its root, and leaves
    /// issued on demand for any service name.
    pub fn for_pki(pki: &Pki) -> AgentOpts {
        AgentOpts {
            trust_domain: pki.trust_domain().to_string(),
            roots: vec![pki.ca.cert_pem().to_string()],
            issuer: Some((pki.path("ca.pem"), pki.path("ca-key.pem"))),
            ..AgentOpts::default()
        }
    }

    /// Sets the agent's datacenter.
    pub fn datacenter(mut self, dc: &str) -> AgentOpts {
        self.datacenter = dc.into();
        self
    }

    /// Turns ACLs on: `token` is required on every request but roots.
    pub fn token(mut self, token: &str) -> AgentOpts {
        self.token = Some(token.into());
        self
    }
}

/// A CA root as `/agent/connect/ca/roots` lists it.
#[derive(Clone, Debug)]
pub struct Root {
    pub cert_pem: String,
    /// Cross-signed or signing intermediates; the one that signs leaves last.
    pub intermediates: Vec<String>,
    pub active: bool,
}

impl Root {
    /// The active root, without intermediates.
    pub fn active(cert_pem: &str) -> Root {
        Root {
            cert_pem: cert_pem.into(),
            intermediates: Vec::new(),
            active: true,
        }
    }

    /// A root kept after a rotation, no longer active.
    pub fn inactive(cert_pem: &str) -> Root {
        Root {
            active: false,
            ..Root::active(cert_pem)
        }
    }
}

/// A check or instance status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// One mesh endpoint of a service, as `/health/connect/<service>` lists it.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Where it listens: `Service.Address` and `Service.Port`.
    pub addr: SocketAddr,
    /// `Node.Datacenter`; `None` is the agent's.
    pub datacenter: Option<String>,
    /// Status of its service check (the node check always passes).
    pub health: Health,
    /// A Connect-native instance of the service itself rather than a
    /// `connect-proxy` sidecar for it.
    pub native: bool,
    /// Node name; default derived from the address.
    pub node: Option<String>,
    /// Leave `Service.Address` empty, so clients must use `Node.Address`.
    pub address_on_node: bool,
}

impl Instance {
    /// A passing sidecar proxy (`Kind: connect-proxy`) listening on `addr`.
    pub fn sidecar(addr: SocketAddr) -> Instance {
        Instance {
            addr,
            datacenter: None,
            health: Health::Passing,
            native: false,
            node: None,
            address_on_node: false,
        }
    }

    /// A passing Connect-native instance (`Connect.Native: true`) on `addr`.
    pub fn native(addr: SocketAddr) -> Instance {
        Instance {
            native: true,
            ..Instance::sidecar(addr)
        }
    }

    /// Places the instance in another datacenter (seen only with `?dc=`).
    pub fn in_dc(mut self, dc: &str) -> Instance {
        self.datacenter = Some(dc.into());
        self
    }

    /// Sets the status of its service check.
    pub fn with_health(mut self, health: Health) -> Instance {
        self.health = health;
        self
    }

    /// Leaves `Service.Address` empty; the address is only `Node.Address`.
    pub fn address_on_node(mut self) -> Instance {
        self.address_on_node = true;
        self
    }
}

/// What an L4 intention does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// A service intention (source → destination); either name may be `*`.
#[derive(Clone, Debug)]
pub struct Intention {
    pub source: String,
    pub destination: String,
    pub action: Action,
    /// Has HTTP permissions (L7): authorize always denies it (spec §3).
    pub l7: bool,
}

impl Intention {
    /// An L4 allow.
    pub fn allow(source: &str, destination: &str) -> Intention {
        Intention {
            source: source.into(),
            destination: destination.into(),
            action: Action::Allow,
            l7: false,
        }
    }

    /// An L4 deny.
    pub fn deny(source: &str, destination: &str) -> Intention {
        Intention {
            action: Action::Deny,
            ..Intention::allow(source, destination)
        }
    }

    /// An L7 intention (HTTP permissions), which authorize treats as deny.
    pub fn l7(source: &str, destination: &str) -> Intention {
        Intention {
            l7: true,
            ..Intention::allow(source, destination)
        }
    }

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

/// One request as the agent received it.
#[derive(Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    /// The raw query string, without `?`.
    pub query: String,
    /// The ACL token the agent used (`?token=`, `X-Consul-Token` or
    /// `Authorization: Bearer`), if any. Masked in `Debug`.
    pub token: Option<String>,
    /// The request body as text.
    pub body: String,
    pub at: Instant,
}

impl Call {
    /// The first value of query parameter `name` (`Some("")` for `?name`).
    pub fn param(&self, name: &str) -> Option<String> {
        Query::<Params>::try_from_uri(&format!("/?{}", self.query).parse().ok()?)
            .ok()?
            .0
            .get(name)
            .map(String::from)
    }
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let query: Vec<String> = self
            .query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some(("token", _)) => "token=<redacted>".to_string(),
                _ => p.to_string(),
            })
            .collect();
        let token = if self.token.is_some() { "yes" } else { "no" };
        write!(f, "{} {}", self.method, self.path)?;
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        write!(f, " (token: {token})")?;
        if !self.body.is_empty() {
            write!(f, " {}", self.body)?;
        }
        Ok(())
    }
}

/// A check registered with the agent, as a test reads it.
#[derive(Clone, Debug)]
pub struct CheckState {
    pub id: String,
    pub name: String,
    pub service_id: String,
    /// `ttl`, `tcp`, `http`, `alias`, ...
    pub kind: String,
    /// `passing`, `warning` or `critical` (TTL expiry applied).
    pub status: String,
    pub output: String,
    pub ttl: Option<Duration>,
    /// When it was last set through pass/warn/fail/update (`None`: never).
    pub updated: Option<Instant>,
    /// How many pass/warn/fail/update calls it has had.
    pub updates: u64,
}

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

// ---------------------------------------------------------------------------
// State.

/// What never changes after start.
struct Cfg {
    trust_domain: String,
    datacenter: String,
    node: String,
    token: Option<String>,
}

/// Everything behind the one lock, plus the bell that rings on any change.
struct Shared {
    cfg: Cfg,
    /// Never held across an await.
    state: Mutex<AgentState>,
    /// Rung after every change (state, call log, faults): blocked queries
    /// and `wait_for_calls` re-check their condition.
    bell: watch::Sender<()>,
}

struct AgentState {
    /// The last raft index handed out; every change takes the next one.
    raft: u64,
    /// The index of anything never set (an unknown service's health).
    base_index: u64,
    roots: Vec<ListedRoot>,
    roots_index: u64,
    issuer: Option<DevCa>,
    /// Service name → leaf and the index it was issued at.
    leaves: HashMap<String, (Leaf, u64)>,
    /// Service name → mesh endpoints and their index.
    instances: HashMap<String, (Vec<Instance>, u64)>,
    /// Prepared query name → service.
    queries: HashMap<String, String>,
    intentions: Vec<Intention>,
    intentions_index: u64,
    default_allow: bool,
    /// Local registrations by ID.
    services: BTreeMap<String, LocalService>,
    checks: BTreeMap<String, Check>,
    services_index: u64,
    faults: Vec<Armed>,
    stalled: Vec<String>,
    backwards: Vec<String>,
    calls: Vec<Call>,
    /// Cancelled when the agent pauses or is dropped: connections accepted
    /// under this token are cut and blocked queries end.
    alive: CancellationToken,
}

struct ListedRoot {
    root: Root,
    create_index: u64,
}

enum Fault {
    Fail(StatusCode, String),
    Malformed,
}

struct Armed {
    prefix: String,
    left: usize,
    fault: Fault,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the state and rings the bell.
    fn change<T>(&self, f: impl FnOnce(&mut AgentState) -> T) -> T {
        let out = f(&mut self.lock());
        self.bell.send_replace(());
        out
    }

    /// Waits until `done` holds, or `deadline` passes (both `Ok`), or the
    /// agent pauses (`Err`: the connection is being cut anyway).
    async fn wait_until(
        &self,
        alive: &CancellationToken,
        deadline: Option<Instant>,
        mut done: impl FnMut(&AgentState) -> bool,
    ) -> Result<(), Refusal> {
        loop {
            let mut bell = self.bell.subscribe();
            let ready = done(&self.lock());
            if ready {
                return Ok(());
            }
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let down = || refuse(StatusCode::INTERNAL_SERVER_ERROR, "agent is shutting down");
            tokio::select! {
                _ = bell.changed() => {}
                () = expired => return Ok(()),
                () = alive.cancelled() => return Err(down()),
            }
        }
    }

    /// Index-blocking: with `index` > 0, waits until `index_of` moves past it.
    async fn block_on_index(
        &self,
        caller: &Caller,
        b: &Blocking,
        index_of: impl Fn(&AgentState) -> u64,
    ) -> Result<(), Refusal> {
        if b.index == 0 {
            return Ok(());
        }
        let deadline = Some(b.deadline());
        self.wait_until(&caller.alive, deadline, |s| index_of(s) > b.index)
            .await
    }

    /// Token resolution: with ACLs on, a token other than the configured
    /// one does not exist.
    fn resolve(&self, caller: &Caller) -> Result<(), Refusal> {
        match (&self.cfg.token, &caller.token) {
            (Some(want), Some(got)) if want != got => {
                Err(refuse(StatusCode::FORBIDDEN, "ACL not found"))
            }
            _ => Ok(()),
        }
    }

    /// Resolves the token, then checks `perm` on `resource`: the one token
    /// may do everything, the anonymous token (none sent) nothing.
    fn acl(&self, caller: &Caller, perm: &str, resource: Option<&str>) -> Result<(), Refusal> {
        self.resolve(caller)?;
        if self.cfg.token.is_none() || caller.token.is_some() {
            return Ok(());
        }
        let on = resource.map(|r| format!(" on {r:?}")).unwrap_or_default();
        Err(refuse(
            StatusCode::FORBIDDEN,
            format!(
                "Permission denied: anonymous token lacks permission '{perm}'{on}. \
                 The anonymous token is used implicitly when a request does not specify a token."
            ),
        ))
    }

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
    fn new(issuer: Option<DevCa>) -> AgentState {
        AgentState {
            raft: FIRST_INDEX,
            base_index: FIRST_INDEX,
            roots: Vec::new(),
            roots_index: FIRST_INDEX,
            issuer,
            leaves: HashMap::new(),
            instances: HashMap::new(),
            queries: HashMap::new(),
            intentions: Vec::new(),
            intentions_index: FIRST_INDEX,
            default_allow: true,
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            services_index: FIRST_INDEX,
            faults: Vec::new(),
            stalled: Vec::new(),
            backwards: Vec::new(),
            calls: Vec::new(),
            alive: CancellationToken::new(),
        }
    }

    fn bump(&mut self) -> u64 {
        self.raft += 1;
        self.raft
    }

    fn set_roots(&mut self, roots: impl IntoIterator<Item = Root>) {
        let index = self.bump();
        let old: HashMap<String, u64> = self
            .roots
            .iter()
            .map(|r| (r.root.cert_pem.clone(), r.create_index))
            .collect();
        self.roots = roots
            .into_iter()
            .map(|root| ListedRoot {
                create_index: old.get(&root.cert_pem).copied().unwrap_or(index),
                root,
            })
            .collect();
        self.roots_index = index;
    }

    fn leaf_index(&self, service: &str) -> u64 {
        self.leaves.get(service).map_or(self.base_index, |l| l.1)
    }

    fn instances_index(&self, service: &str) -> u64 {
        self.instances.get(service).map_or(self.base_index, |i| i.1)
    }

    /// The first armed fault for `path`, used up by one.
    fn take_fault(&mut self, path: &str) -> Option<Response> {
        let i = self
            .faults
            .iter()
            .position(|f| f.left > 0 && path.starts_with(&f.prefix))?;
        let armed = &mut self.faults[i];
        armed.left -= 1;
        let resp = match &armed.fault {
            Fault::Fail(status, body) => text(*status, body.clone()),
            Fault::Malformed => (
                [(header::CONTENT_TYPE, "application/json")],
                "{\"Roots\": [{\"ID\": \"not json",
            )
                .into_response(),
        };
        if armed.left == 0 {
            self.faults.remove(i);
        }
        Some(resp)
    }

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

    fn register(&mut self, reg: Registration, replace_checks: bool) {
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

    fn deregister(&mut self, id: &str) -> bool {
        if self.services.remove(id).is_none() {
            return false;
        }
        self.checks.retain(|_, c| c.service_id != id);
        self.services_index = self.bump();
        true
    }
}

// ---------------------------------------------------------------------------
// Serving: a listener whose connections die when the agent pauses.

/// Binds with SO_REUSEADDR so that `resume` can take the port back while
/// connections cut by `pause` linger in TIME_WAIT.
async fn bind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    if let Err(e) = socket.bind(addr) {
        panic!("fake agent: cannot bind {addr}: {e}");
    }
    socket.listen(1024).expect("listen")
}

fn serve(listener: TcpListener, shared: Arc<Shared>) -> JoinHandle<()> {
    let app = router(shared.clone());
    let listener = AgentListener {
        inner: listener,
        shared,
    };
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

struct AgentListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for AgentListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((io, peer)) => {
                    let alive = self.shared.lock().alive.clone();
                    return (Guarded::new(io, alive), peer);
                }
                // E.g. out of file descriptors: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection that fails every read and write once its agent pauses, so
/// idle keep-alive connections close too and clients see the agent go.
struct Guarded {
    io: TcpStream,
    gone: Pin<Box<WaitForCancellationFutureOwned>>,
    cut: bool,
}

impl Guarded {
    fn new(io: TcpStream, alive: CancellationToken) -> Guarded {
        Guarded {
            io,
            gone: Box::pin(alive.cancelled_owned()),
            cut: false,
        }
    }

    /// Registers for the pause and reports whether it happened.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.cut && self.gone.as_mut().poll(cx).is_ready() {
            self.cut = true;
        }
        if self.cut {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "fake agent paused",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/agent/connect/ca/roots", get(roots))
        .route("/v1/agent/connect/ca/leaf/{service}", get(leaf))
        .route("/v1/agent/connect/authorize", post(authorize))
        .route("/v1/health/connect/{service}", get(health_connect))
        .route("/v1/query/{name}/execute", get(query_execute))
        .route("/v1/agent/services", get(agent_services))
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route("/v1/agent/service/{id}", get(agent_service))
        .route("/v1/agent/check/pass/{id}", put(check_pass))
        .route("/v1/agent/check/warn/{id}", put(check_warn))
        .route("/v1/agent/check/fail/{id}", put(check_fail))
        .route("/v1/agent/check/update/{id}", put(check_update))
        .route("/v1/connect/intentions/match", get(intentions_match))
        .route("/v1/catalog/service/{name}", get(catalog_service))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "404 page not found") })
        .method_not_allowed_fallback(|req: Request| async move {
            let reason = format!("method {} not allowed", req.method());
            text(StatusCode::METHOD_NOT_ALLOWED, reason)
        })
        .layer(middleware::from_fn_with_state(shared.clone(), front_door))
        .with_state(shared)
}

/// Who is calling: the token used, and the pause signal for this connection.
#[derive(Clone)]
struct Caller {
    token: Option<String>,
    alive: CancellationToken,
}

/// The shared state as handlers extract it.
type Sh = State<Arc<Shared>>;

/// Logs the call, then applies stalls, faults and the CE checks, in that
/// order; after the handler, rewinds the index if asked to.
async fn front_door(State(sh): Sh, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return text(StatusCode::BAD_REQUEST, "Request body too large");
    };
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let params = Query::<Params>::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let token = token_of(&parts.headers, &params);
    let call = Call {
        method: parts.method.to_string(),
        path: path.clone(),
        query,
        token: token.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
        at: Instant::now(),
    };
    let alive = sh.change(|s| {
        s.calls.push(call);
        s.alive.clone()
    });
    let released = |s: &AgentState| !s.stalled.iter().any(|p| path.starts_with(p));
    if let Err(refusal) = sh.wait_until(&alive, None, released).await {
        return refusal.into_response();
    }
    if let Some(resp) = sh.lock().take_fault(&path) {
        return resp;
    }
    if let Some(resp) = enterprise_only(&parts.headers, &params) {
        return resp;
    }
    parts.extensions.insert(Caller { token, alive });
    let resp = next.run(Request::from_parts(parts, Body::from(body))).await;
    rewind_index(&sh, &path, resp)
}

/// The token Consul would use: `?token=`, then `X-Consul-Token`, then
/// `Authorization: Bearer`.
fn token_of(headers: &HeaderMap, q: &Params) -> Option<String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = header("authorization").and_then(|v| {
        let (scheme, value) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then_some(value)
    });
    [q.get("token"), header("x-consul-token"), bearer]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|t| !t.is_empty())
        .map(String::from)
}

/// Consul CE answers any namespace or partition, even `default`, with 400.
fn enterprise_only(headers: &HeaderMap, q: &Params) -> Option<Response> {
    let header = |name: &str| headers.get(name).is_some_and(|v| !v.is_empty());
    let param = |name: &str| q.get(name).is_some_and(|v| !v.is_empty());
    let (what, feature) = if header("x-consul-namespace") {
        ("header: \"X-Consul-Namespace\"", "Namespaces")
    } else if param("ns") {
        ("query parameter: \"ns\"", "Namespaces")
    } else if header("x-consul-partition") {
        ("header: \"X-Consul-Partition\"", "Partitions")
    } else if param("partition") {
        ("query parameter: \"partition\"", "Partitions")
    } else {
        return None;
    };
    let reason = format!("Invalid {what} - {feature} are a Consul Enterprise feature");
    Some(bad(reason).into_response())
}

/// Applies a pending `set_index_backwards` to a response that has an index.
fn rewind_index(sh: &Shared, path: &str, mut resp: Response) -> Response {
    let index = resp
        .headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let Some(index) = index else { return resp };
    let armed = sh.change(|s| {
        let i = s.backwards.iter().position(|p| path.starts_with(p))?;
        Some(s.backwards.remove(i))
    });
    if armed.is_some() {
        let lower = HeaderValue::from((index / 2).max(1));
        resp.headers_mut().insert("X-Consul-Index", lower);
    }
    resp
}

// ---------------------------------------------------------------------------
// Handlers (spec §1.1–§1.11).

type Reply = Result<Response, Refusal>;

/// `GET /v1/agent/connect/ca/roots` (§1.1). No ACL.
async fn roots(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Query(q): Query<Params>,
) -> Reply {
    let b = Blocking::parse(&q)?;
    sh.block_on_index(&caller, &b, |s| s.roots_index).await?;
    let s = sh.lock();
    Ok(indexed(s.roots_index, &roots_json(&sh.cfg, &s.roots)))
}

/// `GET /v1/agent/connect/ca/leaf/:service` (§1.2).
async fn leaf(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Path(service): Path<String>,
    Query(q): Query<Params>,
) -> Reply {
    let b = Blocking::parse(&q)?;
    sh.acl(&caller, "service:write", Some(&service))?;
    sh.change(|s| ensure_leaf(&sh.cfg, s, &service))?;
    sh.block_on_index(&caller, &b, |s| s.leaf_index(&service))
        .await?;
    let s = sh.lock();
    let (leaf, index) = &s.leaves[&service];
    Ok(indexed(*index, &leaf_json(&sh.cfg, &service, leaf, *index)))
}

/// Makes sure `service` has a leaf: the one set, or one from the CA.
fn ensure_leaf(cfg: &Cfg, s: &mut AgentState, service: &str) -> Result<(), Refusal> {
    if s.leaves.contains_key(service) {
        return Ok(());
    }
    let error = |msg: String| refuse(StatusCode::INTERNAL_SERVER_ERROR, msg);
    if cfg.trust_domain.is_empty() || s.roots.is_empty() {
        return Err(error("cluster has no CA bootstrapped yet".into()));
    }
    let Some(ca) = &s.issuer else {
        return Err(error(format!(
            "fake agent: no leaf for service {service:?} (set_leaf, or start with AgentOpts::for_pki)"
        )));
    };
    let leaf = ca
        .leaf(service, &cfg.datacenter, Duration::from_secs(3600))
        .map_err(|e| error(e.to_string()))?;
    let index = s.bump();
    s.leaves.insert(service.into(), (leaf, index));
    Ok(())
}

/// `POST /v1/agent/connect/authorize` (§1.3, §3).
async fn authorize(State(sh): Sh, Extension(caller): Extension<Caller>, body: Bytes) -> Reply {
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

/// `GET /v1/health/connect/:service` (§1.4).
async fn health_connect(
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
async fn query_execute(
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

/// `GET /v1/agent/services` (§1.7): ID → AgentService.
async fn agent_services(State(sh): Sh, Extension(caller): Extension<Caller>) -> Reply {
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
async fn agent_service(
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
async fn register(
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
async fn deregister(
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
async fn check_pass(
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
async fn check_warn(
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
async fn check_fail(
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
async fn check_update(
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

/// `GET /v1/connect/intentions/match?by=destination&name=<svc>` (§1.11).
async fn intentions_match(
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

/// `GET /v1/catalog/service/:name` (§4.7 reconcile): the local
/// registrations with that name, as the catalog has them.
async fn catalog_service(
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

// ---------------------------------------------------------------------------
// Query parameters and blocking.

/// Query parameters in order; repeated names kept.
#[derive(serde::Deserialize, Default)]
#[serde(transparent)]
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// `index`, `hash` and `wait` of a blocking query (spec §1.0).
struct Blocking {
    /// 0: answer at once.
    index: u64,
    hash: Option<String>,
    wait: Duration,
}

impl Blocking {
    fn parse(q: &Params) -> Result<Blocking, Refusal> {
        let wait = match q.get("wait") {
            Some(w) => go_duration(w).ok_or_else(|| bad("Invalid wait time"))?,
            None => Duration::ZERO,
        };
        let wait = if wait.is_zero() {
            DEFAULT_WAIT
        } else {
            wait.min(MAX_WAIT)
        };
        let index = match q.get("index") {
            Some(i) => i.parse().map_err(|_| bad("Invalid index"))?,
            None => 0,
        };
        let hash = q.get("hash").filter(|h| !h.is_empty()).map(String::from);
        Ok(Blocking { index, hash, wait })
    }

    /// When an unchanged query returns: `wait` plus the most jitter
    /// Consul adds (`wait/16`).
    fn deadline(&self) -> Instant {
        Instant::now() + self.wait + self.wait / 16
    }
}

/// Go's `time.ParseDuration` (`300ms`, `1.5s`, `1m30s`, `300000ms`);
/// `None` where Go errs. Negative durations come back as zero.
fn go_duration(s: &str) -> Option<Duration> {
    let (negative, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        nanos += number * unit;
        rest = &rest[unit_end..];
    }
    Some(if negative {
        Duration::ZERO
    } else {
        Duration::from_nanos(nanos as u64)
    })
}

/// Go's `strconv.ParseBool`.
fn go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Request bodies: Go's decoder with DisallowUnknownFields.

#[derive(Clone, Copy)]
enum Ty {
    Str,
    Int,
    Bool,
    /// A Go duration string, or nanoseconds.
    Dur,
    Strs,
    /// Opaque (maps like `Config`, `Meta`).
    Any,
    Obj(&'static [Field]),
    Objs(&'static [Field]),
}

type Field = (&'static str, Ty);

const AUTHORIZE: &[Field] = &[
    ("Target", Ty::Str),
    ("ClientCertURI", Ty::Str),
    ("ClientCertSerial", Ty::Str),
];

const CHECK_UPDATE: &[Field] = &[("Status", Ty::Str), ("Output", Ty::Str)];

/// `structs.ServiceDefinition` on CE: no `Namespace`/`Partition`.
const SERVICE: &[Field] = &[
    ("Kind", Ty::Str),
    ("ID", Ty::Str),
    ("Name", Ty::Str),
    ("Tags", Ty::Strs),
    ("Address", Ty::Str),
    ("TaggedAddresses", Ty::Any),
    ("Meta", Ty::Any),
    ("Port", Ty::Int),
    ("SocketPath", Ty::Str),
    ("Check", Ty::Obj(CHECK)),
    ("Checks", Ty::Objs(CHECK)),
    (
        "Weights",
        Ty::Obj(&[("Passing", Ty::Int), ("Warning", Ty::Int)]),
    ),
    ("Token", Ty::Str),
    ("EnableTagOverride", Ty::Bool),
    ("Proxy", Ty::Obj(PROXY)),
    (
        "Connect",
        Ty::Obj(&[("Native", Ty::Bool), ("SidecarService", Ty::Any)]),
    ),
    ("Locality", Ty::Any),
];

const PROXY: &[Field] = &[
    ("DestinationServiceName", Ty::Str),
    ("DestinationServiceID", Ty::Str),
    ("LocalServiceAddress", Ty::Str),
    ("LocalServicePort", Ty::Int),
    ("LocalServiceSocketPath", Ty::Str),
    ("Mode", Ty::Str),
    ("TransparentProxy", Ty::Any),
    ("Config", Ty::Any),
    ("Upstreams", Ty::Objs(UPSTREAM)),
    ("MeshGateway", Ty::Any),
    ("Expose", Ty::Any),
    ("AccessLogs", Ty::Any),
    ("EnvoyExtensions", Ty::Any),
];

const UPSTREAM: &[Field] = &[
    ("DestinationType", Ty::Str),
    ("DestinationNamespace", Ty::Str),
    ("DestinationPartition", Ty::Str),
    ("DestinationPeer", Ty::Str),
    ("DestinationName", Ty::Str),
    ("Datacenter", Ty::Str),
    ("LocalBindAddress", Ty::Str),
    ("LocalBindPort", Ty::Int),
    ("LocalBindSocketPath", Ty::Str),
    ("LocalBindSocketMode", Ty::Str),
    ("Config", Ty::Any),
    ("MeshGateway", Ty::Any),
    ("CentrallyConfigured", Ty::Bool),
];

const CHECK: &[Field] = &[
    ("CheckID", Ty::Str),
    ("Name", Ty::Str),
    ("Notes", Ty::Str),
    ("Status", Ty::Str),
    ("TTL", Ty::Dur),
    ("Interval", Ty::Dur),
    ("Timeout", Ty::Dur),
    ("DeregisterCriticalServiceAfter", Ty::Dur),
    ("TCP", Ty::Str),
    ("TCPUseTLS", Ty::Bool),
    ("UDP", Ty::Str),
    ("HTTP", Ty::Str),
    ("Header", Ty::Any),
    ("Method", Ty::Str),
    ("Body", Ty::Str),
    ("DisableRedirects", Ty::Bool),
    ("TLSServerName", Ty::Str),
    ("TLSSkipVerify", Ty::Bool),
    ("GRPC", Ty::Str),
    ("GRPCUseTLS", Ty::Bool),
    ("H2PING", Ty::Str),
    ("H2PingUseTLS", Ty::Bool),
    ("OSService", Ty::Str),
    ("AliasNode", Ty::Str),
    ("AliasService", Ty::Str),
    ("Args", Ty::Any),
    ("ScriptArgs", Ty::Any),
    ("DockerContainerID", Ty::Str),
    ("Shell", Ty::Str),
    ("SuccessBeforePassing", Ty::Int),
    ("FailuresBeforeWarning", Ty::Int),
    ("FailuresBeforeCritical", Ty::Int),
    ("OutputMaxSize", Ty::Int),
];

/// Field names match as Go and Consul match them: case-insensitively, and
/// snake_case for PascalCase.
fn norm(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Parses a request body and checks it against `fields`; errors read as
/// Consul's `Request decode failed: ...` (400).
fn decode_body(body: &[u8], fields: &[Field], go_type: &str) -> Result<Value, Refusal> {
    let failed = |why: String| bad(format!("Request decode failed: {why}"));
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(failed("EOF".into()));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| failed(e.to_string()))?;
    check_fields(&value, fields, go_type).map_err(failed)?;
    Ok(value)
}

fn check_fields(v: &Value, fields: &[Field], path: &str) -> Result<(), String> {
    let Value::Object(map) = v else {
        return Err(type_error(v, path, "struct"));
    };
    for (key, value) in map {
        let Some((name, ty)) = fields.iter().find(|(n, _)| norm(n) == norm(key)) else {
            return Err(format!("json: unknown field {key:?}"));
        };
        check_type(value, *ty, &format!("{path}.{name}"))?;
    }
    Ok(())
}

fn check_type(v: &Value, ty: Ty, path: &str) -> Result<(), String> {
    let ok = match (ty, v) {
        (_, Value::Null) | (Ty::Any, _) => true,
        (Ty::Str, Value::String(_)) | (Ty::Bool, Value::Bool(_)) => true,
        (Ty::Int, Value::Number(n)) => n.is_i64() || n.is_u64(),
        (Ty::Dur, Value::String(s)) => {
            return match go_duration(s) {
                Some(_) => Ok(()),
                None => Err(format!("time: invalid duration {s:?}")),
            }
        }
        (Ty::Dur, Value::Number(_)) => true,
        (Ty::Strs, Value::Array(items)) => items.iter().all(Value::is_string),
        (Ty::Obj(fields), _) => return check_fields(v, fields, path),
        (Ty::Objs(fields), Value::Array(items)) => {
            return items.iter().try_for_each(|i| check_fields(i, fields, path));
        }
        _ => false,
    };
    let go = match ty {
        Ty::Str => "string",
        Ty::Int => "int",
        Ty::Bool => "bool",
        Ty::Dur => "time.Duration",
        Ty::Strs => "[]string",
        _ => "[]struct",
    };
    if ok {
        Ok(())
    } else {
        Err(type_error(v, path, go))
    }
}

fn type_error(v: &Value, path: &str, go: &str) -> String {
    let json = match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    format!("json: cannot unmarshal {json} into Go struct field {path} of type {go}")
}

/// A field by Go's matching rules; `null` counts as absent.
fn field<'a>(obj: &'a Value, name: &str) -> Option<&'a Value> {
    let map = obj.as_object()?;
    let found = map.iter().find(|(k, _)| norm(k) == norm(name));
    found.map(|(_, v)| v).filter(|v| !v.is_null())
}

fn str_of(obj: &Value, name: &str) -> String {
    field(obj, name)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn u64_of(obj: &Value, name: &str) -> u64 {
    field(obj, name).and_then(Value::as_u64).unwrap_or(0)
}

fn bool_of(obj: &Value, name: &str) -> bool {
    field(obj, name).and_then(Value::as_bool).unwrap_or(false)
}

fn duration_of(obj: &Value, name: &str) -> Option<Duration> {
    match field(obj, name)? {
        Value::String(s) => go_duration(s),
        Value::Number(n) => n.as_u64().map(Duration::from_nanos),
        _ => None,
    }
    .filter(|d| !d.is_zero())
}

// ---------------------------------------------------------------------------
// Local registrations (spec §1.7–§1.9).

struct Registration {
    service: LocalService,
    checks: Vec<CheckDef>,
}

#[derive(Clone)]
struct LocalService {
    kind: String,
    id: String,
    name: String,
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
    index: u64,
}

struct CheckDef {
    id: String,
    name: String,
    kind: &'static str,
    ttl: Option<Duration>,
    status: Option<String>,
}

struct Check {
    id: String,
    name: String,
    service_id: String,
    service_name: String,
    kind: &'static str,
    ttl: Option<Duration>,
    status: String,
    /// The status the registration asked for, if any.
    status_given: Option<String>,
    output: String,
    registered: Instant,
    updated: Option<Instant>,
    updates: u64,
}

/// Decodes and validates a registration as `AgentRegisterService` does.
fn parse_registration(body: &[u8]) -> Result<Registration, Refusal> {
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
    fn new(def: CheckDef, service: &LocalService) -> Check {
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
    fn state(&self) -> CheckState {
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
fn omit_empty(mut v: Value) -> Value {
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
    fn agent_json(&self, dc: &str) -> Value {
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
    fn agent_json_hashed(&self, dc: &str) -> (Value, String) {
        let mut v = self.agent_json(dc);
        let mut h = DefaultHasher::new();
        v.to_string().hash(&mut h);
        let hash = format!("{:x}", h.finish());
        v["ContentHash"] = json!(hash);
        (v, hash)
    }

    /// A `CatalogService` entry: this service on the agent's node.
    fn catalog_json(&self, cfg: &Cfg) -> Value {
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

// ---------------------------------------------------------------------------
// Response shapes.

fn roots_json(cfg: &Cfg, roots: &[ListedRoot]) -> Value {
    let cluster = cfg
        .trust_domain
        .strip_suffix(".consul")
        .unwrap_or(&cfg.trust_domain);
    let listed: Vec<Value> = roots.iter().map(|r| root_json(r, cluster)).collect();
    let active = listed
        .iter()
        .find(|r| r["Active"] == true)
        .map_or(json!(""), |r| r["ID"].clone());
    json!({ "ActiveRootID": active, "TrustDomain": cfg.trust_domain, "Roots": listed })
}

fn root_json(listed: &ListedRoot, cluster: &str) -> Value {
    let root = &listed.root;
    let facts = CertFacts::of(&root.cert_pem);
    // The key that signs leaves: the last intermediate's, else the root's.
    let signer = root.intermediates.last().map(|p| CertFacts::of(p));
    let signing_key = signer.as_ref().unwrap_or(&facts).key_id.clone();
    let serial = facts
        .serial
        .iter()
        .rev()
        .take(8)
        .rev()
        .fold(0u64, |acc, b| acc << 8 | u64::from(*b));
    let mut pem = root.cert_pem.clone();
    if !pem.ends_with('\n') {
        pem.push('\n');
    }
    let intermediates = if root.intermediates.is_empty() {
        Value::Null
    } else {
        json!(root.intermediates)
    };
    json!({
        "ID": colon_hex(&sha1(&facts.der)),
        "Name": "Consul CA Primary Cert",
        "SerialNumber": serial,
        "SigningKeyID": colon_hex(&signing_key),
        "ExternalTrustDomain": cluster,
        "NotBefore": rfc3339(facts.not_before),
        "NotAfter": rfc3339(facts.not_after),
        "RootCert": pem,
        "IntermediateCerts": intermediates,
        "Active": root.active,
        "PrivateKeyType": facts.key_type,
        "PrivateKeyBits": facts.key_bits,
        "CreateIndex": listed.create_index,
        "ModifyIndex": listed.create_index,
    })
}

fn leaf_json(cfg: &Cfg, service: &str, leaf: &Leaf, index: u64) -> Value {
    let facts = CertFacts::of(&leaf.cert_pem);
    let uri = facts.uri.clone().unwrap_or_else(|| {
        format!(
            "spiffe://{}/ns/default/dc/{}/svc/{service}",
            cfg.trust_domain, cfg.datacenter
        )
    });
    json!({
        "SerialNumber": colon_hex(&facts.serial),
        "CertPEM": leaf.cert_pem,
        "PrivateKeyPEM": leaf.key_pem,
        "Service": service,
        "ServiceURI": uri,
        "ValidAfter": rfc3339(facts.not_before),
        "ValidBefore": rfc3339(facts.not_after),
        "CreateIndex": index,
        "ModifyIndex": index,
    })
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

fn node_tagged_addresses(ip: &str) -> Value {
    json!({ "lan": ip, "lan_ipv4": ip, "wan": ip, "wan_ipv4": ip })
}

fn node_meta() -> Value {
    json!({ "consul-network-segment": "", "consul-version": VERSION })
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

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let content_type = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    (status, content_type, body.into()).into_response()
}

/// An error answer; Consul's error bodies are plain text.
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        text(self.0, self.1)
    }
}

fn refuse(status: StatusCode, body: impl Into<String>) -> Refusal {
    Refusal(status, body.into())
}

fn bad(body: impl Into<String>) -> Refusal {
    refuse(StatusCode::BAD_REQUEST, body)
}

fn json_reply(v: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// A JSON answer with the blocking headers; the index is never 0.
fn indexed(index: u64, v: &Value) -> Response {
    let mut resp = json_reply(v);
    let h = resp.headers_mut();
    h.insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    h.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    h.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    resp
}

// ---------------------------------------------------------------------------
// Certificates, SPIFFE IDs, small encodings.

/// What the agent reports about a certificate; defaults if it does not parse
/// (tests may hand out garbage on purpose).
struct CertFacts {
    der: Vec<u8>,
    /// Minimal big-endian bytes, as Go's `big.Int.Bytes()`.
    serial: Vec<u8>,
    uri: Option<String>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    key_id: Vec<u8>,
    key_type: &'static str,
    key_bits: usize,
}

impl CertFacts {
    fn of(pem: &str) -> CertFacts {
        CertFacts::parse(pem).unwrap_or_else(|| CertFacts {
            der: pem.as_bytes().to_vec(),
            serial: Vec::new(),
            uri: None,
            not_before: OffsetDateTime::now_utc(),
            not_after: OffsetDateTime::now_utc(),
            key_id: Vec::new(),
            key_type: "ec",
            key_bits: 256,
        })
    }

    fn parse(pem: &str) -> Option<CertFacts> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
        let cert = pem.parse_x509().ok()?;
        let san = cert.subject_alternative_name().ok().flatten();
        let uri = san.and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
        });
        let key_id = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            });
        let (key_type, key_bits) = match cert.public_key().parsed() {
            Ok(PublicKey::RSA(k)) => ("rsa", k.key_size()),
            Ok(PublicKey::EC(k)) => ("ec", k.key_size()),
            _ => ("ec", 256),
        };
        let serial = cert.raw_serial();
        let first = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
        Some(CertFacts {
            der: pem.contents.clone(),
            serial: serial[first..].to_vec(),
            uri,
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            key_id: key_id.unwrap_or_default(),
            key_type,
            key_bits,
        })
    }
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

fn colon_hex(bytes: &[u8]) -> String {
    let parts: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A stable UUID-shaped ID derived from `seed`.
fn fake_uuid(seed: &str) -> String {
    let half = |salt: u8| {
        let mut h = DefaultHasher::new();
        (salt, seed).hash(&mut h);
        h.finish()
    };
    let x = format!("{:016x}{:016x}", half(1), half(2));
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// SHA-1 (FIPS 180-4). Consul names a root by the SHA-1 fingerprint of its
/// DER, and no SHA-1 is otherwise at hand in the tests.
pub fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&(data.len() as u64 * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 80];
        for (wi, word) in w.iter_mut().zip(block.chunks(4)) {
            *wi = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, t);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, x) in out.chunks_mut(4).zip(h) {
        chunk.copy_from_slice(&x.to_be_bytes());
    }
    out
}

// ---------------------------------------------------------------------------
// Exposed paths and checks (Proxy.Expose). Kept in this one section.

/// `Proxy.Expose` as the agent returns it: PascalCase whatever the
/// registration's spelling, each path's `Protocol` defaulted to `http`
/// (`ExposeConfig.Finalize`), `omitempty` gaps.
fn api_expose(expose: Option<&Value>) -> Value {
    let Some(e) = expose else {
        return json!({});
    };
    let paths: Vec<Value> = field(e, "Paths")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let protocol = Some(str_of(p, "Protocol"))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "http".into());
            omit_empty(json!({
                "ListenerPort": u64_of(p, "ListenerPort"),
                "Path": str_of(p, "Path"),
                "LocalPathPort": u64_of(p, "LocalPathPort"),
                "Protocol": protocol,
                "ParsedFromCheck": bool_of(p, "ParsedFromCheck"),
            }))
        })
        .collect();
    omit_empty(json!({ "Checks": bool_of(e, "Checks"), "Paths": paths }))
}

/// The first port the agent assigns to an exposed check
/// (`expose_min_port`); `expose_max_port` is 21755.
pub const EXPOSE_MIN_PORT: u16 = 21500;

/// What `Expose.Checks` makes the agent do with a service's HTTP check
/// (`http://HOST:PORT/PATH`): the check now targets `proxy_ip` on a port
/// from the expose range, and the path it implies is
/// `{Path, LocalPathPort: PORT, ListenerPort, ParsedFromCheck}`. Returns
/// the rewritten check URL and that path; the agent's HTTP API shows the
/// proxy neither (the check's Definition comes back empty), which is why
/// ferry needs the paths listed.
pub fn expose_check(check_url: &str, proxy_ip: &str, nth: u16) -> Option<(String, Value)> {
    let rest = check_url.strip_prefix("http://")?;
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let local_port: u16 = hostport.rsplit_once(':')?.1.parse().ok()?;
    let listener_port = EXPOSE_MIN_PORT.checked_add(nth)?;
    let path = if path.is_empty() { "/" } else { path };
    let url = format!("http://{proxy_ip}:{listener_port}{path}");
    let exposed = json!({
        "ListenerPort": listener_port,
        "Path": path,
        "LocalPathPort": local_port,
        "Protocol": "http",
        "ParsedFromCheck": true,
    });
    Some((url, exposed))
}

/// One run of an agent HTTP check against `url` (`checks.CheckHTTP`): a
/// GET with the agent's User-Agent and Accept headers and a timeout; 2xx
/// is passing, 429 warning, anything else or no answer critical.
pub async fn http_check(url: &str, timeout: Duration) -> Health {
    let Some(rest) = url.strip_prefix("http://") else {
        return Health::Critical;
    };
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let run = async {
        let mut s = TcpStream::connect(hostport).await.ok()?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: Consul Health Check\r\nAccept: text/plain, text/*, */*\r\nConnection: close\r\n\r\n"
        );
        tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
            .await
            .ok()?;
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut got)
            .await
            .ok()?;
        let head = String::from_utf8_lossy(&got);
        head.split_whitespace().nth(1)?.parse::<u16>().ok()
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Some(code)) if (200..300).contains(&code) => Health::Passing,
        Ok(Some(429)) => Health::Warning,
        _ => Health::Critical,
    }
}

/// An upstream's settings from a `service-defaults` entry
/// (`UpstreamConfig.Overrides[]`/`Defaults`, as `consul config write`
/// takes them: `connect_timeout_ms`, `limits`, `passive_health_check`,
/// durations as strings), in the shape the agent stores after
/// `UpstreamConfig.MergeInto`: the top-level keys in snake_case, the
/// structs under them with Go field names, durations as nanoseconds,
/// unset fields left out.
fn merged_upstream_config(entry: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    let ns = |v: &Value| match v {
        Value::String(s) => go_duration(s).map(|d| json!(d.as_nanos() as u64)),
        Value::Number(_) => Some(v.clone()),
        _ => None,
    };
    if let Some(ms) = field(entry, "ConnectTimeoutMs").and_then(Value::as_u64) {
        out.insert("connect_timeout_ms".into(), json!(ms));
    }
    if let Some(l) = field(entry, "Limits") {
        let mut limits = Map::new();
        for key in [
            "MaxConnections",
            "MaxPendingRequests",
            "MaxConcurrentRequests",
        ] {
            if let Some(v) = field(l, key) {
                limits.insert(key.into(), v.clone());
            }
        }
        out.insert("limits".into(), Value::Object(limits));
    }
    if let Some(p) = field(entry, "PassiveHealthCheck") {
        let mut phc = Map::new();
        for key in [
            "MaxFailures",
            "EnforcingConsecutive5xx",
            "MaxEjectionPercent",
        ] {
            if let Some(v) = field(p, key) {
                phc.insert(key.into(), v.clone());
            }
        }
        for key in ["Interval", "BaseEjectionTime"] {
            if let Some(v) = field(p, key).and_then(ns) {
                phc.insert(key.into(), v);
            }
        }
        out.insert("passive_health_check".into(), Value::Object(phc));
    }
    out
}

impl FakeAgent {
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
}
