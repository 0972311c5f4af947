//! A small Delta ADS server in Consul's manner, serving resource sets the
//! tests build in Rust, plus fixtures in the shapes Consul's xDS server
//! emits for `protocol = "tcp"` (each names the Consul golden file whose
//! shape it follows).
//!
//! Like Consul: only `DeltaAggregatedResources`; the first request of a
//! type decides wildcard (no names) or named; CDS, EDS, LDS, SDS are
//! evaluated in that order; a name's version is a hash of its bytes; the
//! versions a client resumes with (`initial_resource_versions`) are taken
//! as what it holds; when a cluster is sent, its endpoints are sent again
//! after it. Simplified: a response is not held back until the previous
//! one of its type is ACKed. Knobs: replace or remove a resource, send a raw
//! response (garbage, unknown type), stall, restart; every ACK and NACK is
//! recorded with its nonce, error detail and the node that sent it.
//!
//! One server can feed several proxies the way Consul does, each its own
//! proxy registration: resources common to all (set with [`Ads::set`]) plus
//! per-node ones keyed by the bootstrap's `node.id` ([`Ads::set_for`]). A
//! stream's node is the `node.id` of its first request; it sees the common
//! set overlaid with its own (its own wins on a name both hold).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    circuit_breakers, cluster, CircuitBreakers, Cluster, OutlierDetection,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, data_source, socket_address, transport_socket, Address, AggregatedConfigSource,
    ConfigSource, DataSource, Pipe, SocketAddress, TransportSocket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use envoy_types::pb::envoy::config::rbac::v3::{
    self as rbacv3, permission, principal, Permission, Principal,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as RbacFilter;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, secret, CertificateValidationContext, CommonTlsContext,
    DownstreamTlsContext, SdsSecretConfig, Secret, TlsCertificate, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, RegexMatcher, StringMatcher};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};
use ferry::identity::dev_ca::Leaf;
use prost::{Message, Name};
use rustls::pki_types::pem::PemObject;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::eventually;

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const ORDER: [&str; 4] = [CDS, EDS, LDS, SDS];

/// One ACK or NACK the server received.
#[derive(Debug, Clone)]
pub struct Reply {
    pub type_url: String,
    pub nonce: String,
    pub error: Option<String>,
    /// The `node.id` of the stream it came on ("" before the stream named one).
    pub node: String,
}

type Resources = BTreeMap<&'static str, BTreeMap<String, Any>>;

/// An open stream, as [`Ads::in_sync`] needs it.
#[derive(Default)]
struct Open {
    node: String,
    /// The [`Inner::generation`] the stream last computed what to send at.
    seen: u64,
    /// The last nonce sent, per type.
    last: BTreeMap<String, String>,
}

#[derive(Default)]
struct Inner {
    /// Common to every node.
    resources: Resources,
    /// Per node id, overlaid on the common ones.
    nodes: BTreeMap<String, Resources>,
    replies: Vec<Reply>,
    /// Every request with `initial_resource_versions`, per type.
    resumed: Vec<(String, HashMap<String, String>)>,
    raw: Vec<DeltaDiscoveryResponse>,
    stalled: bool,
    /// Open streams by a per-server number.
    open: BTreeMap<u64, Open>,
    next_stream: u64,
    /// Bumped by every change of resources or knobs.
    generation: u64,
    nonce: u64,
}

impl Inner {
    /// What `node` sees of type `t`: the common resources, overlaid with its own.
    fn view(&self, node: &str, t: &str) -> BTreeMap<String, Any> {
        let mut have = self.resources.get(t).cloned().unwrap_or_default();
        if let Some(own) = self.nodes.get(node).and_then(|r| r.get(t)) {
            have.extend(own.iter().map(|(n, a)| (n.clone(), a.clone())));
        }
        have
    }

    fn changed(&mut self) {
        self.generation += 1;
    }
}

/// The server. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct Ads {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
    kill: Arc<Mutex<CancellationToken>>,
}

fn version(any: &Any) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    any.value.hash(&mut h);
    format!("{:016x}", h.finish())
}

impl Ads {
    /// Starts on a free port.
    pub async fn start() -> Ads {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ads");
        let ads = Ads {
            addr: listener.local_addr().expect("addr"),
            inner: Arc::default(),
            changed: Arc::new(Notify::new()),
            kill: Arc::new(Mutex::new(CancellationToken::new())),
        };
        ads.serve(listener);
        ads
    }

    /// Starts on a unix socket at `path` (Nomad's bridge-mode
    /// `alloc/tmp/consul_grpc.sock`); `addr` is then meaningless and
    /// [`Ads::restart`] is not supported.
    pub async fn start_unix(path: &std::path::Path) -> Ads {
        let listener = tokio::net::UnixListener::bind(path).expect("bind unix ads");
        let ads = Ads {
            addr: "0.0.0.0:0".parse().expect("addr"),
            inner: Arc::default(),
            changed: Arc::new(Notify::new()),
            kill: Arc::new(Mutex::new(CancellationToken::new())),
        };
        let kill = ads.kill.lock().unwrap().clone();
        let svc = AggregatedDiscoveryServiceServer::new(ads.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, kill.cancelled_owned())
                .await;
        });
        ads
    }

    /// Starts on a free port behind TLS presenting `leaf` (ALPN h2, no
    /// client certificate): the agent's gRPC TLS port. No restart.
    pub async fn start_tls(pki: &super::Pki, leaf: &Leaf) -> Ads {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ads");
        let ads = Ads {
            addr: listener.local_addr().expect("addr"),
            inner: Arc::default(),
            changed: Arc::new(Notify::new()),
            kill: Arc::new(Mutex::new(CancellationToken::new())),
        };
        let _ = pki;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            rustls::pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                .map(|c| c.expect("cert"))
                .collect(),
            rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key"),
        )
        .expect("server cert");
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (tx, rx) = mpsc::channel::<Result<TlsConn, std::io::Error>>(16);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = tx.send(Ok(TlsConn(tls))).await;
                    }
                });
            }
        });
        let svc = AggregatedDiscoveryServiceServer::new(ads.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
        });
        ads
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let kill = self.kill.lock().unwrap().clone();
        let svc = AggregatedDiscoveryServiceServer::new(self.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, kill.cancelled_owned())
                .await;
        });
    }

    /// Stops serving: ends every stream and frees the port (the agent
    /// going away); [`Ads::restart`] brings it back on the same port.
    pub async fn stop(&self) {
        let old = std::mem::replace(&mut *self.kill.lock().unwrap(), CancellationToken::new());
        old.cancel();
        eventually("old streams to end", || {
            self.inner.lock().unwrap().open.is_empty()
        })
        .await;
    }

    /// Ends every stream and the listener, then serves again on the same
    /// port with the same resources (a restarted agent).
    pub async fn restart(&self) {
        self.stop().await;
        let mut listener = None;
        for _ in 0..200 {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        self.serve(listener.expect("rebind the ADS port"));
    }

    /// Applies `f` to the state, then wakes the streams.
    fn change(&self, f: impl FnOnce(&mut Inner)) {
        let mut inner = self.inner.lock().unwrap();
        f(&mut inner);
        inner.changed();
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Adds or replaces resource `name` of type `type_url`, for every node.
    pub fn set(&self, type_url: &'static str, name: &str, any: Any) {
        self.change(|i| {
            i.resources
                .entry(type_url)
                .or_default()
                .insert(name.to_string(), any);
        });
    }

    /// Adds or replaces resource `name` of type `type_url` for the node
    /// `node` only (in Consul, each sidecar's own registration: its
    /// listeners), over a common one of the same name.
    pub fn set_for(&self, node: &str, type_url: &'static str, name: &str, any: Any) {
        self.change(|i| {
            i.nodes
                .entry(node.to_string())
                .or_default()
                .entry(type_url)
                .or_default()
                .insert(name.to_string(), any);
        });
    }

    /// Removes a common resource.
    pub fn remove(&self, type_url: &'static str, name: &str) {
        self.change(|i| {
            if let Some(m) = i.resources.get_mut(type_url) {
                m.remove(name);
            }
        });
    }

    /// Removes a resource of node `node` (a common one of the name shows again).
    pub fn remove_for(&self, node: &str, type_url: &'static str, name: &str) {
        self.change(|i| {
            if let Some(m) = i.nodes.get_mut(node).and_then(|r| r.get_mut(type_url)) {
                m.remove(name);
            }
        });
    }

    /// Sends `r` as it is on the open streams (its nonce is filled in).
    pub fn send_raw(&self, r: DeltaDiscoveryResponse) {
        self.change(|i| i.raw.push(r));
    }

    /// Stops (or resumes) sending anything.
    pub fn stall(&self, on: bool) {
        self.change(|i| i.stalled = on);
    }

    pub fn replies(&self) -> Vec<Reply> {
        self.inner.lock().unwrap().replies.clone()
    }

    /// The replies that came from node `node`.
    pub fn replies_for(&self, node: &str) -> Vec<Reply> {
        self.replies()
            .into_iter()
            .filter(|r| r.node == node)
            .collect()
    }

    pub fn resumed(&self) -> Vec<(String, HashMap<String, String>)> {
        self.inner.lock().unwrap().resumed.clone()
    }

    pub fn streams(&self) -> usize {
        self.inner.lock().unwrap().open.len()
    }

    /// Waits until node `node` has a stream that has been sent everything
    /// the server holds for it and has answered the last response of each
    /// type, then asserts that none of its replies was a NACK: the proxy
    /// holds exactly what the server serves. (A client may still subscribe
    /// to more afterwards, e.g. EDS for a new cluster.)
    pub async fn in_sync(&self, node: &str) {
        // What is still missing, or None.
        let missing = || {
            let inner = self.inner.lock().unwrap();
            let mine: Vec<&Open> = inner.open.values().filter(|o| o.node == node).collect();
            if mine.is_empty() {
                return Some("no stream".to_string());
            }
            let mut out = Vec::new();
            for o in mine {
                if o.seen != inner.generation {
                    out.push(format!("not yet sent generation {}", inner.generation));
                }
                for (t, n) in &o.last {
                    if !inner.replies.iter().any(|r| &r.nonce == n) {
                        out.push(format!("no answer to {t} nonce {n}"));
                    }
                }
            }
            (!out.is_empty()).then(|| out.join("; "))
        };
        let deadline = tokio::time::Instant::now() + super::DEADLINE;
        while let Some(why) = missing() {
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "node {node} not in sync after {:?}: {why}; replies {:?}",
                    super::DEADLINE,
                    self.replies_for(node)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let nacks: Vec<Reply> = self
            .replies_for(node)
            .into_iter()
            .filter(|r| r.error.is_some())
            .collect();
        assert!(nacks.is_empty(), "node {node} refused resources: {nacks:?}");
    }

    /// Waits for a reply matching `f`, returns it.
    pub async fn reply(&self, what: &str, f: impl Fn(&Reply) -> bool) -> Reply {
        eventually(what, || self.replies().iter().any(&f)).await;
        self.replies().into_iter().find(|r| f(r)).unwrap()
    }

    /// The number of ACKs (no error) of `type_url` so far.
    pub fn acks(&self, type_url: &str) -> usize {
        self.replies()
            .iter()
            .filter(|r| r.type_url == type_url && r.error.is_none())
            .count()
    }
}

/// A TLS connection the gRPC server can serve on.
pub struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Per-stream, per-type subscription state.
#[derive(Default)]
struct Sub {
    wildcard: bool,
    names: BTreeSet<String>,
    sent: BTreeMap<String, String>,
}

impl Ads {
    /// What to send now on stream `id` with subscriptions `subs`.
    fn pending(&self, id: u64, subs: &mut BTreeMap<String, Sub>) -> Vec<DeltaDiscoveryResponse> {
        let mut inner = self.inner.lock().unwrap();
        if inner.stalled {
            return Vec::new();
        }
        let node = inner
            .open
            .get(&id)
            .map(|o| o.node.clone())
            .unwrap_or_default();
        let mut out: Vec<DeltaDiscoveryResponse> = std::mem::take(&mut inner.raw);
        for t in ORDER {
            let Some(sub) = subs.get_mut(t) else { continue };
            let have = inner.view(&node, t);
            let mut r = DeltaDiscoveryResponse {
                type_url: t.to_string(),
                ..Default::default()
            };
            for (name, any) in &have {
                if !sub.wildcard && !sub.names.contains(name) {
                    continue;
                }
                let v = version(any);
                if sub.sent.get(name) != Some(&v) {
                    sub.sent.insert(name.clone(), v.clone());
                    r.resources.push(Resource {
                        name: name.clone(),
                        version: v,
                        resource: Some(any.clone()),
                        ..Default::default()
                    });
                }
            }
            if sub.wildcard {
                let gone: Vec<String> = sub
                    .sent
                    .keys()
                    .filter(|n| !have.contains_key(*n))
                    .cloned()
                    .collect();
                for n in gone {
                    sub.sent.remove(&n);
                    r.removed_resources.push(n);
                }
            }
            if t == CDS {
                // Consul re-sends the endpoints of every cluster it sends
                // (Envoy does not subscribe again, and an updated EDS
                // cluster would warm until its initial fetch timeout).
                if let Some(eds) = subs.get_mut(EDS) {
                    for c in &r.resources {
                        eds.sent.remove(&c.name);
                    }
                }
            }
            if !r.resources.is_empty() || !r.removed_resources.is_empty() {
                out.push(r);
            }
        }
        for r in &mut out {
            inner.nonce += 1;
            r.nonce = format!("{:08x}", inner.nonce);
        }
        let generation = inner.generation;
        if let Some(o) = inner.open.get_mut(&id) {
            o.seen = generation;
            for r in &out {
                o.last.insert(r.type_url.clone(), r.nonce.clone());
            }
        }
        out
    }

    fn request(&self, id: u64, req: &DeltaDiscoveryRequest, subs: &mut BTreeMap<String, Sub>) {
        let mut inner = self.inner.lock().unwrap();
        let Some(open) = inner.open.get_mut(&id) else {
            return;
        };
        // Envoy and ferry name their node on the first request only.
        if open.node.is_empty() {
            if let Some(n) = &req.node {
                open.node = n.id.clone();
            }
        }
        let node = open.node.clone();
        if !req.response_nonce.is_empty() {
            inner.replies.push(Reply {
                type_url: req.type_url.clone(),
                nonce: req.response_nonce.clone(),
                error: req.error_detail.as_ref().map(|s| s.message.clone()),
                node,
            });
            return;
        }
        let first = !subs.contains_key(&req.type_url);
        let sub = subs.entry(req.type_url.clone()).or_default();
        if first {
            // Consul: no names = wildcard. Envoy may also say "*".
            sub.wildcard = req.resource_names_subscribe.is_empty()
                || req.resource_names_subscribe.iter().any(|n| n == "*");
            if !req.initial_resource_versions.is_empty() {
                inner
                    .resumed
                    .push((req.type_url.clone(), req.initial_resource_versions.clone()));
            }
            for (n, v) in &req.initial_resource_versions {
                sub.sent.insert(n.clone(), v.clone());
                if !sub.wildcard {
                    sub.names.insert(n.clone());
                }
            }
        }
        for n in req.resource_names_subscribe.iter().filter(|n| *n != "*") {
            sub.names.insert(n.clone());
            sub.sent.remove(n);
        }
        for n in &req.resource_names_unsubscribe {
            sub.names.remove(n);
            sub.sent.remove(n);
        }
    }
}

type Out = Pin<Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwOut = Pin<Box<dyn tokio_stream::Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = SotwOut;
    type DeltaAggregatedResourcesStream = Out;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwOut>, Status> {
        Err(Status::unknown("not implemented"))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Out>, Status> {
        let mut rx = req.into_inner();
        let (tx, out) = mpsc::channel(64);
        let ads = self.clone();
        let kill = self.kill.lock().unwrap().clone();
        let id = {
            let mut inner = self.inner.lock().unwrap();
            inner.next_stream += 1;
            let id = inner.next_stream;
            inner.open.insert(id, Open::default());
            id
        };
        tokio::spawn(async move {
            let mut subs = BTreeMap::new();
            loop {
                // Registered before looking, so a change made while this
                // pass computes is not missed.
                let changed = ads.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                for r in ads.pending(id, &mut subs) {
                    if tx.send(Ok(r)).await.is_err() {
                        break;
                    }
                }
                tokio::select! {
                    m = rx.message() => match m {
                        Ok(Some(m)) => ads.request(id, &m, &mut subs),
                        _ => break,
                    },
                    _ = &mut changed => {}
                    _ = kill.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("agent restarting"))).await;
                        break;
                    }
                }
            }
            ads.inner.lock().unwrap().open.remove(&id);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}

// ---- fixtures ------------------------------------------------------------

pub fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn sock(addr: SocketAddr) -> Option<Address> {
    Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(addr.port() as u32)),
            ..Default::default()
        })),
    })
}

/// A `pipe` address as Consul builds it: the socket path, and the mode
/// `local_bind_socket_mode` parsed from its octal string (`"0640"` → 416;
/// 0 for none, and always 0 for `local_service_socket_path`).
pub fn pipe(path: &Path, mode: u32) -> Option<Address> {
    Some(Address {
        address: Some(address::Address::Pipe(Pipe {
            path: path.display().to_string(),
            mode,
        })),
    })
}

/// `listener` (any listener fixture) with its address replaced: shapes
/// Consul does not emit, to check what ferry refuses.
pub fn readdress(listener: &Any, address: Option<Address>) -> Any {
    let mut l = Listener::decode(listener.value.as_slice()).expect("a listener");
    l.address = address;
    any(&l)
}

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineString(s.to_string())),
        ..Default::default()
    })
}

fn ads_source() -> Option<ConfigSource> {
    use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
    Some(ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: 2, // V3
        ..Default::default()
    })
}

fn dur(d: Duration) -> Option<PbDuration> {
    Some(PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

/// How a listener or cluster carries certificates.
#[derive(Clone)]
pub enum Tls {
    /// Inline leaf and roots (released Consul versions).
    Inline { leaf: Leaf, roots: String },
    /// By SDS names `connect-leaf` / `connect-root`: the newest Consul's
    /// public listener. Consul's upstream clusters keep inline certificates
    /// (its SAN matchers need an inline validation context); on a cluster,
    /// with SANs, this builds the one SDS shape that has both: a combined
    /// validation context.
    Sds,
}

fn common(tls: &Tls, sans: &[String]) -> CommonTlsContext {
    #[allow(deprecated)]
    let validation = |roots: Option<DataSource>| CertificateValidationContext {
        trusted_ca: roots,
        match_subject_alt_names: sans
            .iter()
            .map(|s| StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(s.clone())),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    match tls {
        Tls::Inline { leaf, roots } => CommonTlsContext {
            tls_params: Some(Default::default()),
            tls_certificates: vec![TlsCertificate {
                certificate_chain: inline(&leaf.cert_pem),
                private_key: inline(&leaf.key_pem),
                ..Default::default()
            }],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContext(validation(inline(
                    roots,
                ))),
            ),
            ..Default::default()
        },
        Tls::Sds => {
            let roots = SdsSecretConfig {
                name: "connect-root".into(),
                sds_config: ads_source(),
            };
            // With SAN matchers (an upstream cluster), the roots come by SDS
            // and the matchers stay in the resource: Envoy's combined
            // validation context, the one shape that has both.
            let validation = if sans.is_empty() {
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(roots)
            } else {
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(validation(None)),
                        validation_context_sds_secret_config: Some(roots),
                        ..Default::default()
                    },
                )
            };
            CommonTlsContext {
                tls_params: Some(Default::default()),
                tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                    name: "connect-leaf".into(),
                    sds_config: ads_source(),
                }],
                validation_context_type: Some(validation),
                ..Default::default()
            }
        }
    }
}

fn typed(name: &str, a: Any) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::TypedConfig(a)),
    }
}

fn tcp_proxy(cluster: &str, stat: &str) -> Filter {
    typed(
        "envoy.filters.network.tcp_proxy",
        any(&TcpProxy {
            stat_prefix: stat.into(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        }),
    )
}

/// Intentions as Consul compiles them for L4 (`rbac/default-*.golden`):
/// `None` = default allow with no deny intentions (a DENY filter without
/// policies); otherwise the default and the sources whose intention is the
/// opposite of it.
#[derive(Clone)]
pub enum Intentions {
    /// Default deny; these sources allowed (`rules: {}` when empty).
    DefaultDeny(Vec<String>),
    /// Default allow; these sources denied.
    DefaultAllow(Vec<String>),
}

/// Consul's principal for a source service in any datacenter.
pub fn source_principal(trust_domain: &str, svc: &str) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                        regex: format!(
                            "^spiffe://{}/ns/default/dc/[^/]+/svc/{svc}$",
                            trust_domain.replace('.', "\\.")
                        ),
                        ..Default::default()
                    })),
                    ..Default::default()
                }),
            },
        )),
    }
}

pub fn rbac(trust_domain: &str, i: &Intentions) -> Filter {
    let (action, sources) = match i {
        Intentions::DefaultDeny(s) => (rbacv3::rbac::Action::Allow, s),
        Intentions::DefaultAllow(s) => (rbacv3::rbac::Action::Deny, s),
    };
    let mut policies = HashMap::new();
    if !sources.is_empty() {
        policies.insert(
            "consul-intentions-layer4".to_string(),
            rbacv3::Policy {
                permissions: vec![Permission {
                    rule: Some(permission::Rule::Any(true)),
                }],
                principals: sources
                    .iter()
                    .map(|s| source_principal(trust_domain, s))
                    .collect(),
                ..Default::default()
            },
        );
    }
    typed(
        "envoy.filters.network.rbac",
        any(&RbacFilter {
            rules: Some(rbacv3::Rbac {
                action: action as i32,
                policies,
                ..Default::default()
            }),
            stat_prefix: "connect_authz".into(),
            ..Default::default()
        }),
    )
}

/// `listeners/defaults.latest.golden`'s public listener: RBAC, then
/// tcp_proxy to `local_app`, downstream TLS requiring a client cert.
pub fn public_listener(
    addr: SocketAddr,
    tls: &Tls,
    trust_domain: &str,
    i: &Intentions,
) -> (String, Any) {
    let name = format!("public_listener:{addr}");
    let l = Listener {
        name: name.clone(),
        address: sock(addr),
        traffic_direction: 1, // INBOUND
        filter_chains: vec![FilterChain {
            filters: vec![
                rbac(trust_domain, i),
                tcp_proxy("local_app", "public_listener"),
            ],
            transport_socket: Some(TransportSocket {
                name: "tls".into(),
                config_type: Some(transport_socket::ConfigType::TypedConfig(any(
                    &DownstreamTlsContext {
                        common_tls_context: Some(common(tls, &[])),
                        require_client_certificate: Some(BoolValue { value: true }),
                        ..Default::default()
                    },
                ))),
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    (name, any(&l))
}

/// `listeners/defaults.latest.golden`'s upstream listener `db:127.0.0.1:9191`.
pub fn upstream_listener(id: &str, bind: SocketAddr, cluster: &str) -> (String, Any) {
    outbound(format!("{id}:{bind}"), sock(bind), id, cluster)
}

/// An upstream listener `name` at `address`: `tcp_proxy` to `cluster`.
fn outbound(name: String, address: Option<Address>, id: &str, cluster: &str) -> (String, Any) {
    let l = Listener {
        name: name.clone(),
        address,
        traffic_direction: 2, // OUTBOUND
        filter_chains: vec![FilterChain {
            filters: vec![tcp_proxy(
                cluster,
                &format!("upstream.{id}.default.default.dc1"),
            )],
            ..Default::default()
        }],
        ..Default::default()
    };
    (name, any(&l))
}

/// `listeners/listener-unix-domain-socket.latest.golden`: upstream `db`
/// with `local_bind_socket_path` listens on a `pipe` (path and numeric
/// mode) and is named `<id>:<path>`.
pub fn upstream_listener_on_pipe(id: &str, path: &Path, mode: u32, cluster: &str) -> (String, Any) {
    outbound(
        format!("{id}:{}", path.display()),
        pipe(path, mode),
        id,
        cluster,
    )
}

/// `clusters/defaults.latest.golden`'s `local_app`: STATIC, one host.
pub fn local_app(app: SocketAddr) -> Any {
    static_local_app(sock(app))
}

/// `clusters/downstream-service-with-unix-sockets.latest.golden`'s
/// `local_app` for a service with `local_service_socket_path`: the one
/// host is a `pipe` with the path only.
pub fn local_app_on_pipe(path: &Path) -> Any {
    static_local_app(pipe(path, 0))
}

/// [`local_app`] with Consul's `max_inbound_connections`
/// (`clusters/custom-max-inbound-connections`-style): a circuit breaker of
/// `max` connections on the local app cluster.
pub fn local_app_limited(app: SocketAddr, max: u32) -> Any {
    let mut c = Cluster::decode(local_app(app).value.as_slice()).expect("a cluster");
    c.circuit_breakers = Some(CircuitBreakers {
        thresholds: vec![circuit_breakers::Thresholds {
            max_connections: Some(UInt32Value { value: max }),
            ..Default::default()
        }],
        ..Default::default()
    });
    any(&c)
}

/// The other half of Consul's `max_inbound_connections`: its
/// `envoy.filters.network.connection_limit` filter, which `makeInboundListener`
/// puts on the public listener's chain before `tcp_proxy` (RBAC is then
/// prepended before both).
pub fn connection_limit(max: u64) -> Filter {
    use envoy_types::pb::envoy::extensions::filters::network::connection_limit::v3::ConnectionLimit;
    use envoy_types::pb::google::protobuf::UInt64Value;
    typed(
        "envoy.filters.network.connection_limit",
        any(&ConnectionLimit {
            stat_prefix: "inbound_connection_limit".into(),
            max_connections: Some(UInt64Value { value: max }),
            ..Default::default()
        }),
    )
}

/// `listener` (a public listener fixture) with `filter` inserted before its
/// last filter (`tcp_proxy`).
pub fn with_filter_before_tcp_proxy(listener: &Any, filter: Filter) -> Any {
    let mut l = Listener::decode(listener.value.as_slice()).expect("a listener");
    let filters = &mut l.filter_chains[0].filters;
    let at = filters.len() - 1;
    filters.insert(at, filter);
    any(&l)
}

fn static_local_app(address: Option<Address>) -> Any {
    any(&Cluster {
        name: "local_app".into(),
        connect_timeout: dur(Duration::from_secs(5)),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: "local_app".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address,
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Knobs of an upstream cluster.
#[derive(Clone, Default)]
pub struct ClusterOpts {
    pub max_connections: Option<u32>,
    /// consecutive_5xx, base_ejection_time.
    pub outlier: Option<(u32, Duration)>,
    /// With `outlier`: Consul's `passive_health_check.max_ejection_percent`
    /// (Envoy's default is 10%, and it then ejects nothing from a cluster
    /// of fewer than ten hosts).
    pub max_ejection_percent: Option<u32>,
}

/// `clusters/defaults.latest.golden`'s upstream cluster: EDS over ADS,
/// upstream TLS with `sni` and an exact SAN matcher. As in
/// `clusters/connect-proxy-with-chain.latest.golden`, the panic threshold
/// is disabled (`commonLbConfig.healthyPanicThreshold: {}`): with no
/// healthy host Envoy refuses rather than use unhealthy ones.
pub fn eds_cluster(name: &str, sni: &str, sans: &[String], tls: &Tls, o: &ClusterOpts) -> Any {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{CommonLbConfig, EdsClusterConfig};
    use envoy_types::pb::envoy::r#type::v3::Percent;
    any(&Cluster {
        name: name.into(),
        alt_stat_name: name.into(),
        connect_timeout: dur(Duration::from_secs(5)),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: ads_source(),
            ..Default::default()
        }),
        common_lb_config: Some(CommonLbConfig {
            healthy_panic_threshold: Some(Percent { value: 0.0 }),
            ..Default::default()
        }),
        circuit_breakers: Some(CircuitBreakers {
            thresholds: o
                .max_connections
                .map(|m| circuit_breakers::Thresholds {
                    max_connections: Some(UInt32Value { value: m }),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }),
        outlier_detection: o.outlier.map(|(n, base)| OutlierDetection {
            consecutive_5xx: Some(UInt32Value { value: n }),
            base_ejection_time: dur(base),
            max_ejection_percent: o.max_ejection_percent.map(|value| UInt32Value { value }),
            ..Default::default()
        }),
        transport_socket: Some(TransportSocket {
            name: "tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(any(
                &UpstreamTlsContext {
                    common_tls_context: Some(common(tls, sans)),
                    sni: sni.into(),
                    ..Default::default()
                },
            ))),
        }),
        ..Default::default()
    })
}

/// The names Consul gives the two legs of `primary`'s failover
/// (`failover-target~N~<primary>`), in order.
pub fn failover_legs(primary: &str) -> [String; 2] {
    [0, 1].map(|n| format!("failover-target~{n}~{primary}"))
}

/// `clusters/connect-proxy-with-chain-and-failover.latest.golden`: an
/// aggregate cluster over failover legs.
pub fn aggregate_cluster(name: &str, legs: &[String]) -> Any {
    use envoy_types::pb::envoy::extensions::clusters::aggregate::v3::ClusterConfig;
    any(&Cluster {
        name: name.into(),
        connect_timeout: dur(Duration::from_secs(5)),
        lb_policy: 6, // CLUSTER_PROVIDED
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::ClusterType(
            cluster::CustomClusterType {
                name: "envoy.clusters.aggregate".into(),
                typed_config: Some(any(&ClusterConfig {
                    clusters: legs.to_vec(),
                })),
            },
        )),
        ..Default::default()
    })
}

fn host(addr: SocketAddr, health: i32) -> LbEndpoint {
    host_at(sock(addr), health)
}

fn host_at(address: Option<Address>, health: i32) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address,
            ..Default::default()
        })),
        health_status: health,
        load_balancing_weight: Some(UInt32Value { value: 1 }),
        ..Default::default()
    }
}

pub const HEALTHY: i32 = 1;
pub const UNHEALTHY: i32 = 2;

/// `endpoints/defaults.latest.golden` (and, with priorities,
/// `endpoints/connect-proxy-with-chain-and-failover.latest.golden`): hosts
/// as (priority, address, health). With more than one priority, Consul's
/// `policy.overprovisioningFactor: 100000`, so that Envoy moves load to the
/// next priority only once a priority has no healthy host at all.
pub fn cla(cluster: &str, hosts: &[(u32, SocketAddr, i32)]) -> Any {
    use envoy_types::pb::envoy::config::endpoint::v3::cluster_load_assignment::Policy;
    let mut groups: BTreeMap<u32, Vec<LbEndpoint>> = BTreeMap::new();
    for (p, a, h) in hosts {
        groups.entry(*p).or_default().push(host(*a, *h));
    }
    let policy = (groups.len() > 1).then(|| Policy {
        overprovisioning_factor: Some(UInt32Value { value: 100_000 }),
        ..Default::default()
    });
    any(&ClusterLoadAssignment {
        cluster_name: cluster.into(),
        endpoints: groups
            .into_iter()
            .map(|(priority, lb_endpoints)| LocalityLbEndpoints {
                priority,
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        policy,
        ..Default::default()
    })
}

/// One healthy host on a `pipe`: not a shape Consul emits (catalog
/// instances have IP addresses), to check that ferry refuses it.
pub fn cla_on_pipe(cluster: &str, path: &Path) -> Any {
    any(&ClusterLoadAssignment {
        cluster_name: cluster.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![host_at(pipe(path, 0), HEALTHY)],
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// [`cla`] without Consul's overprovisioning factor: Envoy's default (140%)
/// applies, and load spills to the next priority as soon as fewer than
/// about 72% of a priority's hosts are healthy.
pub fn cla_default_overprovisioning(cluster: &str, hosts: &[(u32, SocketAddr, i32)]) -> Any {
    let mut c: ClusterLoadAssignment =
        Message::decode(cla(cluster, hosts).value.as_slice()).expect("decode");
    c.policy = None;
    any(&c)
}

/// `secrets/*.golden`-style SDS secrets: `connect-leaf`.
pub fn leaf_secret(leaf: &Leaf) -> Any {
    any(&Secret {
        name: "connect-leaf".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&leaf.cert_pem),
            private_key: inline(&leaf.key_pem),
            ..Default::default()
        })),
    })
}

/// `connect-root`.
pub fn root_secret(roots: &str) -> Any {
    any(&Secret {
        name: "connect-root".into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(roots),
                ..Default::default()
            },
        )),
    })
}

/// A bootstrap in the shape `consul connect envoy -bootstrap` writes, with
/// the agent at `agent` (TCP), for service `service` registered under the
/// service ID `service` (node id `<service>-sidecar-proxy`).
pub fn bootstrap(agent: SocketAddr, service: &str, token: &str) -> serde_json::Value {
    bootstrap_for(agent, service, service, token)
}

/// The node id Consul gives the sidecar of the service instance
/// `service_id`: the sidecar's own service ID.
pub fn node_id(service_id: &str) -> String {
    format!("{service_id}-sidecar-proxy")
}

/// [`bootstrap`] for the instance of `service` registered as `service_id`
/// (node id [`node_id`]`(service_id)`): one of several sidecars of a
/// service on one agent, each its own proxy registration.
pub fn bootstrap_for(
    agent: SocketAddr,
    service: &str,
    service_id: &str,
    token: &str,
) -> serde_json::Value {
    serde_json::json!({
        "admin": {"access_log_path": "/dev/null",
                  "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "node": {"cluster": service, "id": node_id(service_id),
                 "metadata": {"namespace": "default", "partition": "default"}},
        "layered_runtime": {"layers": [{"name": "base", "static_layer": {"re2.max_program_size.error_level": 1048576}}]},
        "static_resources": {"clusters": [{
            "name": "local_agent", "ignore_health_on_host_removal": false, "connect_timeout": "1s",
            "type": "STATIC", "http2_protocol_options": {},
            "loadAssignment": {"clusterName": "local_agent", "endpoints": [{"lbEndpoints": [
                {"endpoint": {"address": {"socket_address": {"address": agent.ip().to_string(), "port_value": agent.port()}}}}]}]}}]},
        "stats_config": {"stats_tags": [{"regex": "^cluster\\.(?:passthrough~)?((?:([^.]+)~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?[^.]+\\.[^.]+\\.[^.]+\\.consul\\.)", "tag_name": "consul.destination.custom_hash"}],
                         "use_all_default_tags": true},
        "dynamic_resources": {
            "lds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
            "ads_config": {"api_type": "DELTA_GRPC", "transport_api_version": "V3",
                "grpc_services": {"initial_metadata": [{"key": "x-consul-token", "value": token}],
                                  "envoy_grpc": {"cluster_name": "local_agent"}}}}
    })
}

/// Starts ferry in-process from the bootstrap at `path`, as `ferry envoy -c
/// <path>` would, reconnecting quickly; returns once the first complete
/// configuration is served.
pub async fn start_ferry(path: &std::path::Path) -> ferry::Running {
    use ferry::control::xds::{bootstrap::Bootstrap, Backoff};
    let boot = Bootstrap::load(path).expect("bootstrap");
    let args = ferry::cli::parse(["ferry"]).expect("flags").proxy;
    let config = ferry::Config::for_control_plane(&args, boot.service()).expect("config");
    let backoff = Backoff {
        first: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    super::within(
        "ferry to start from xDS",
        ferry::app::xds::start(boot, config, backoff),
    )
    .await
    .expect("start")
}
