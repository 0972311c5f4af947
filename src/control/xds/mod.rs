//! The xDS source: Consul's agent configures the proxy over gRPC Delta ADS,
//! exactly as it configures Envoy, and this module turns what it sends into
//! the snapshots every source produces (see [`crate::control`]).
//!
//! - [`bootstrap`]: the file `consul connect envoy -bootstrap` writes.
//! - [`client`]: the channel and the one bidirectional stream.
//! - [`translate`]: Envoy resources → ferry snapshots (pure functions).
//!
//! The protocol as Consul implements it: the first request of a type
//! decides wildcard (no names) or named subscription for the whole stream,
//! so clusters and listeners are asked for by wildcard at once, endpoints
//! and secrets by name only once a cluster or listener refers to them.
//! Every response is ACKed or NACKed by its nonce (an un-ACKed type is
//! frozen on Consul's side). A response is applied whole or not at all:
//! one resource ferry cannot apply exactly refuses the response, with the
//! reason in the NACK, and the last good state keeps serving. While the
//! stream is down ferry serves what it has and reconnects with capped,
//! jittered backoff, resuming with the versions it holds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{value, ListValue, Struct, Value as PbValue};
use envoy_types::pb::google::rpc::Status;
use tokio_util::sync::CancellationToken;

use crate::authz::RbacChain;
use crate::control::{ListenerSet, Publisher};
use crate::identity::tls::{Credentials, PemBundle};
use crate::ops::metrics::Metrics;

pub mod bootstrap;
pub mod client;
pub mod translate;

use bootstrap::Bootstrap;
use client::{Stream, StreamError};
use translate::{Assembled, Assembly, Held, Instances, Refused};

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Most resources of one type held; a response past it is refused.
pub const MAX_RESOURCES: usize = 4096;

/// gRPC `INVALID_ARGUMENT`, the code of every NACK.
const INVALID_ARGUMENT: i32 = 3;

/// One complete, validated configuration, as the data plane reads it.
#[derive(Debug)]
pub struct Applied {
    pub listeners: Arc<ListenerSet>,
    pub credentials: Arc<Credentials>,
    pub rbac: Arc<RbacChain>,
    pub instances: Arc<Instances>,
}

/// Reconnect pacing.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            first: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// A number in `0..n` that differs between calls and processes, for
/// jitter (no need for a real generator).
fn jitter(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.finish() % n.max(1)
}

/// A type URL as the `resource` label of `ferry_xds_updates`.
fn resource_name(url: &str) -> &'static str {
    match type_index(url) {
        Some(0) => "cluster",
        Some(1) => "endpoints",
        Some(2) => "listener",
        Some(3) => "secret",
        _ => "unknown",
    }
}

/// Which of the four types a URL is.
fn type_index(url: &str) -> Option<usize> {
    [CDS, EDS, LDS, SDS].iter().position(|t| *t == url)
}

/// What survives a reconnect.
struct State {
    held: Held,
    /// Per type (CDS, EDS, LDS, SDS): name → version received.
    versions: [BTreeMap<String, String>; 4],
    /// What was last published, to reuse unchanged parts.
    last: Option<(Box<Assembled>, Arc<Applied>)>,
    /// The last warming or NACK message logged, to log each once.
    last_note: String,
}

/// Per-stream subscription state of the named types.
#[derive(Default)]
struct Subscriptions {
    eds: Option<BTreeSet<String>>,
    sds: Option<BTreeSet<String>>,
}

/// The stream's health, for one log line per change of state: a warning
/// when it goes down, a line when it delivers again. The failures between
/// (an agent restarting answers refused, then garbage, then cancelled...)
/// are counted in `ferry_xds_stream_failures` and logged at debug level.
#[derive(Default)]
struct Link {
    /// Set from the first failure until a response arrives again.
    outage: Option<Outage>,
}

struct Outage {
    since: std::time::Instant,
    failures: u64,
    last_error: String,
}

impl Link {
    fn failed(&mut self, error: &StreamError, metrics: &Metrics) {
        metrics.xds_stream_failures.inc();
        metrics.xds_connected.set(0);
        let text = error.to_string();
        match &mut self.outage {
            Some(o) => {
                o.failures += 1;
                tracing::debug!(error = %text, failures = o.failures, "xDS stream still down");
                o.last_error = text;
            }
            None => {
                tracing::warn!(error = %text,
                    "xDS stream down; serving the last applied configuration and reconnecting");
                self.outage = Some(Outage {
                    since: std::time::Instant::now(),
                    failures: 1,
                    last_error: text,
                });
            }
        }
    }

    fn delivered(&mut self, metrics: &Metrics) {
        metrics.xds_connected.set(1);
        if let Some(o) = self.outage.take() {
            tracing::info!(down_for = ?o.since.elapsed(), failures = o.failures,
                last_error = %o.last_error, "xDS stream open again");
        }
    }
}

/// Runs the source until `halt`: publishes every complete configuration
/// to `out`.
pub async fn run(
    boot: Bootstrap,
    out: Arc<Publisher<Applied>>,
    backoff: Backoff,
    halt: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let mut state = State {
        held: Held::default(),
        versions: Default::default(),
        last: None,
        last_note: String::new(),
    };
    let mut delay = backoff.first;
    let mut link = Link::default();
    loop {
        let r = tokio::select! {
            r = session(&boot, &out, &mut state, &mut delay, backoff.first, &mut link, &metrics) => r,
            _ = halt.cancelled() => return,
        };
        link.failed(&r, &metrics);
        let wait = delay + Duration::from_millis(jitter(delay.as_millis() as u64 / 2 + 1));
        delay = (delay * 2).min(backoff.max);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = halt.cancelled() => return,
        }
    }
}

fn node(boot: &Bootstrap) -> Node {
    Node {
        id: boot.node_id.clone(),
        cluster: boot.node_cluster.clone(),
        metadata: Some(json_struct(&boot.node_metadata, 0)),
        user_agent_name: "ferry".into(),
        user_agent_version_type: Some(
            envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            ),
        ),
        ..Default::default()
    }
}

fn json_struct(m: &serde_json::Map<String, serde_json::Value>, depth: usize) -> Struct {
    Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), json_value(v, depth + 1)))
            .collect(),
    }
}

fn json_value(v: &serde_json::Value, depth: usize) -> PbValue {
    use serde_json::Value as J;
    let kind = match v {
        _ if depth > 8 => value::Kind::NullValue(0),
        J::Null => value::Kind::NullValue(0),
        J::Bool(b) => value::Kind::BoolValue(*b),
        J::Number(n) => value::Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => value::Kind::StringValue(s.clone()),
        J::Array(a) => value::Kind::ListValue(ListValue {
            values: a.iter().map(|x| json_value(x, depth + 1)).collect(),
        }),
        J::Object(o) => value::Kind::StructValue(json_struct(o, depth + 1)),
    };
    PbValue { kind: Some(kind) }
}

fn request(type_url: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.to_string(),
        ..Default::default()
    }
}

/// One stream, from connect to its end.
async fn session(
    boot: &Bootstrap,
    out: &Publisher<Applied>,
    state: &mut State,
    delay: &mut Duration,
    first_delay: Duration,
    link: &mut Link,
    metrics: &Metrics,
) -> StreamError {
    let channel = match client::channel(
        &boot.agent,
        boot.agent_ca.as_deref(),
        Duration::from_secs(5),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut subs = Subscriptions::default();
    // Wildcard CDS (with the node) and LDS first, resuming with what is held.
    let mut cds = request(CDS);
    cds.node = Some(node(boot));
    cds.initial_resource_versions = state.versions[0].clone().into_iter().collect();
    let mut lds = request(LDS);
    lds.initial_resource_versions = state.versions[2].clone().into_iter().collect();
    let mut first = vec![cds, lds];
    first.extend(subscription_changes(state, &mut subs));
    let mut stream = match Stream::open(channel, &boot.token, first).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    loop {
        let response = match stream.next().await {
            Ok(r) => r,
            Err(e) => return e,
        };
        link.delivered(metrics);
        *delay = first_delay;
        let reply = apply(boot, out, state, &response);
        let result = if reply.error_detail.is_some() {
            "nack"
        } else {
            "ack"
        };
        metrics.xds_update(resource_name(&response.type_url), result);
        if let Err(e) = stream.send(reply).await {
            return e;
        }
        for r in subscription_changes(state, &mut subs) {
            if let Err(e) = stream.send(r).await {
                return e;
            }
        }
    }
}

/// The EDS and SDS (un)subscriptions the held clusters and listeners call
/// for, relative to what this stream asked for. The first request of a
/// named type is only sent once it has a name (an empty one would make it
/// wildcard for the life of the stream).
fn subscription_changes(state: &State, subs: &mut Subscriptions) -> Vec<DeltaDiscoveryRequest> {
    let (eds, sds) = state.held.wanted();
    let mut out = Vec::new();
    for (index, url, wanted, current) in
        [(1, EDS, eds, &mut subs.eds), (3, SDS, sds, &mut subs.sds)]
    {
        let have = current.clone().unwrap_or_default();
        if current.is_none() && wanted.is_empty() {
            continue;
        }
        let mut r = request(url);
        r.resource_names_subscribe = wanted.difference(&have).cloned().collect();
        r.resource_names_unsubscribe = have.difference(&wanted).cloned().collect();
        if current.is_none() {
            r.initial_resource_versions = state.versions[index]
                .iter()
                .filter(|(n, _)| wanted.contains(*n))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
        }
        if !r.resource_names_subscribe.is_empty() || !r.resource_names_unsubscribe.is_empty() {
            out.push(r);
        }
        *current = Some(wanted);
    }
    out
}

/// Applies one response whole or not at all; returns its ACK or NACK.
fn apply(
    boot: &Bootstrap,
    out: &Publisher<Applied>,
    state: &mut State,
    response: &DeltaDiscoveryResponse,
) -> DeltaDiscoveryRequest {
    let mut reply = request(&response.type_url);
    reply.response_nonce = response.nonce.clone();
    match try_apply(boot, out, state, response) {
        Ok(()) => {}
        Err(Refused(why)) => {
            if why != state.last_note {
                tracing::error!(type_url = %response.type_url, nonce = %response.nonce, reason = %why,
                    "xDS update refused (NACK); serving the last applied configuration");
                state.last_note = why.clone();
            }
            reply.error_detail = Some(Status {
                code: INVALID_ARGUMENT,
                message: why,
                details: Vec::new(),
            });
        }
    }
    reply
}

fn try_apply(
    boot: &Bootstrap,
    out: &Publisher<Applied>,
    state: &mut State,
    response: &DeltaDiscoveryResponse,
) -> Result<(), Refused> {
    let Some(t) = type_index(&response.type_url) else {
        return Err(Refused(format!(
            "resource type {} is not supported",
            response.type_url
        )));
    };
    let mut held = state.held.clone();
    let mut versions = state.versions[t].clone();
    for r in &response.resources {
        let Some(any) = &r.resource else {
            return Err(Refused(format!("resource {} has no body", r.name)));
        };
        let name = match t {
            0 => translate::cluster(any).map(|(n, c)| {
                held.clusters.insert(n.clone(), c);
                n
            }),
            1 => translate::endpoints(any).map(|(n, e)| {
                held.endpoints.insert(n.clone(), e);
                n
            }),
            2 => translate::listener(any).map(|(n, l)| {
                held.listeners.insert(n.clone(), l);
                n
            }),
            _ => translate::secret(any).map(|(n, s)| {
                held.secrets.insert(n.clone(), s);
                n
            }),
        }?;
        versions.insert(name, r.version.clone());
    }
    for name in &response.removed_resources {
        match t {
            0 => drop(held.clusters.remove(name)),
            1 => drop(held.endpoints.remove(name)),
            2 => drop(held.listeners.remove(name)),
            _ => drop(held.secrets.remove(name)),
        }
        versions.remove(name);
    }
    if versions.len() > MAX_RESOURCES {
        return Err(Refused(format!(
            "more than {MAX_RESOURCES} resources of one type"
        )));
    }
    // Endpoints and secrets nothing refers to any more go with their parent.
    let (eds, sds) = held.wanted();
    held.endpoints.retain(|n, _| eds.contains(n));
    held.secrets.retain(|n, _| sds.contains(n));
    match held.assemble(boot.service()) {
        Assembly::Warming(why) => {
            if why != state.last_note {
                tracing::info!(waiting = %why, "xDS configuration not complete yet; serving the last applied one");
                state.last_note = why;
            }
        }
        Assembly::Ready(view, rbac) => {
            let applied = build(boot, state.last.as_ref(), &view, rbac)?;
            if let Some(applied) = applied {
                if state.last.is_none() {
                    tracing::info!(
                        listeners = held.listeners.len(),
                        clusters = held.clusters.len(),
                        "xDS configuration complete: serving"
                    );
                }
                out.publish(applied.clone());
                state.last = Some((view, applied));
            }
            state.last_note.clear();
        }
    }
    let mut all = std::mem::take(&mut state.versions);
    all[t] = versions;
    for (i, names) in [(1, &eds), (3, &sds)] {
        all[i].retain(|n, _| names.contains(n));
    }
    state.versions = all;
    state.held = held;
    Ok(())
}

/// The snapshot for `view`, reusing unchanged parts of `last`; `None` if
/// nothing changed. Certificates that do not validate refuse the update.
fn build(
    boot: &Bootstrap,
    last: Option<&(Box<Assembled>, Arc<Applied>)>,
    view: &Assembled,
    rbac: RbacChain,
) -> Result<Option<Arc<Applied>>, Refused> {
    if let Some((old, _)) = last {
        if **old == *view {
            return Ok(None);
        }
    }
    let same = |f: &dyn Fn(&Assembled) -> bool| last.filter(|(old, _)| f(old)).map(|(_, a)| a);
    let credentials = match same(&|o| o.pem == view.pem && o.expected == view.expected) {
        Some(a) => a.credentials.clone(),
        None => {
            let (chain, key, roots) = &view.pem;
            let pem = PemBundle {
                roots: roots.clone(),
                chain: chain.clone(),
                key: key.clone(),
                origin: ["xDS roots".into(), "xDS leaf".into(), "xDS leaf key".into()],
            };
            let expected: HashMap<String, Vec<String>> = view.expected.clone();
            Arc::new(
                Credentials::new(&pem, boot.service())
                    .map_err(|e| Refused(format!("certificates: {e}")))?
                    .with_expected_identities(expected),
            )
        }
    };
    Ok(Some(Arc::new(Applied {
        listeners: match same(&|o| o.listeners == view.listeners) {
            Some(a) => a.listeners.clone(),
            None => Arc::new(view.listeners.clone()),
        },
        credentials,
        rbac: match same(&|o| o.rbac == view.rbac) {
            Some(a) => a.rbac.clone(),
            None => Arc::new(rbac),
        },
        instances: match same(&|o| o.instances == view.instances) {
            Some(a) => a.instances.clone(),
            None => Arc::new(view.instances.clone()),
        },
    })))
}
