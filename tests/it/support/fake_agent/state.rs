//! The agent's state: what never changes after start, everything behind
//! the one lock with the bell that rings on every change, token checks
//! (ACLs), and armed faults.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use ferry::identity::dev_ca::{DevCa, Leaf};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::registration::{Check, LocalService};
use super::reply::{refuse, text, Refusal};
use super::serve::Caller;
use super::{Call, Instance, Intention, Root};

/// The first raft index handed out: every index is well above 1, so
/// `set_index_backwards` can always go lower without reaching 0.
const FIRST_INDEX: u64 = 10;

/// What never changes after start.
pub(super) struct Cfg {
    pub(super) trust_domain: String,
    pub(super) datacenter: String,
    pub(super) node: String,
    pub(super) token: Option<String>,
}

/// Everything behind the one lock, plus the bell that rings on any change.
pub(super) struct Shared {
    pub(super) cfg: Cfg,
    /// Never held across an await.
    pub(super) state: Mutex<AgentState>,
    /// Rung after every change (state, call log, faults): blocked queries
    /// and `wait_for_calls` re-check their condition.
    pub(super) bell: watch::Sender<()>,
}

pub(super) struct AgentState {
    /// The last raft index handed out; every change takes the next one.
    raft: u64,
    /// The index of anything never set (an unknown service's health).
    base_index: u64,
    pub(super) roots: Vec<ListedRoot>,
    pub(super) roots_index: u64,
    pub(super) issuer: Option<DevCa>,
    /// Service name → leaf and the index it was issued at.
    pub(super) leaves: HashMap<String, (Leaf, u64)>,
    /// Service name → mesh endpoints and their index.
    pub(super) instances: HashMap<String, (Vec<Instance>, u64)>,
    /// Prepared query name → service.
    pub(super) queries: HashMap<String, String>,
    pub(super) intentions: Vec<Intention>,
    pub(super) intentions_index: u64,
    pub(super) default_allow: bool,
    /// Local registrations by ID.
    pub(super) services: BTreeMap<String, LocalService>,
    pub(super) checks: BTreeMap<String, Check>,
    pub(super) services_index: u64,
    pub(super) faults: Vec<Armed>,
    pub(super) stalled: Vec<String>,
    pub(super) backwards: Vec<String>,
    pub(super) calls: Vec<Call>,
    /// Cancelled when the agent pauses or is dropped: connections accepted
    /// under this token are cut and blocked queries end.
    pub(super) alive: CancellationToken,
}

pub(super) struct ListedRoot {
    pub(super) root: Root,
    pub(super) create_index: u64,
}

pub(super) enum Fault {
    Fail(StatusCode, String),
    Malformed,
}

pub(super) struct Armed {
    pub(super) prefix: String,
    pub(super) left: usize,
    pub(super) fault: Fault,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the state and rings the bell.
    pub(super) fn change<T>(&self, f: impl FnOnce(&mut AgentState) -> T) -> T {
        let out = f(&mut self.lock());
        self.bell.send_replace(());
        out
    }

    /// Token resolution: with ACLs on, a token other than the configured
    /// one does not exist.
    pub(super) fn resolve(&self, caller: &Caller) -> Result<(), Refusal> {
        match (&self.cfg.token, &caller.token) {
            (Some(want), Some(got)) if want != got => {
                Err(refuse(StatusCode::FORBIDDEN, "ACL not found"))
            }
            _ => Ok(()),
        }
    }

    /// Resolves the token, then checks `perm` on `resource`: the one token
    /// may do everything, the anonymous token (none sent) nothing.
    pub(super) fn acl(
        &self,
        caller: &Caller,
        perm: &str,
        resource: Option<&str>,
    ) -> Result<(), Refusal> {
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
}

impl AgentState {
    pub(super) fn new(issuer: Option<DevCa>) -> AgentState {
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

    pub(super) fn bump(&mut self) -> u64 {
        self.raft += 1;
        self.raft
    }

    pub(super) fn set_roots(&mut self, roots: impl IntoIterator<Item = Root>) {
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

    pub(super) fn leaf_index(&self, service: &str) -> u64 {
        self.leaves.get(service).map_or(self.base_index, |l| l.1)
    }

    pub(super) fn instances_index(&self, service: &str) -> u64 {
        self.instances.get(service).map_or(self.base_index, |i| i.1)
    }

    /// The first armed fault for `path`, used up by one.
    pub(super) fn take_fault(&mut self, path: &str) -> Option<Response> {
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
}
