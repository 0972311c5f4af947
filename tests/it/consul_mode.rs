//! ferry with a Consul agent (no `-certs`), against the in-process fake
//! agent over real HTTP: certificates from the leaf and roots endpoints,
//! instances from health, a decision per inbound connection from
//! authorize, revocation of live connections when intentions change, and
//! the agent misbehaving (down, slow, rewinding its index, 5xx, 403,
//! garbage) while ferry keeps serving on its last good state.

use std::net::SocketAddr;
use std::time::Duration;

use ferry::identity::dev_ca::{DevCa, Leaf};
use rustls::pki_types::CertificateDer;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use crate::support::fake_agent::{AgentOpts, Call, FakeAgent, Health, Instance, Intention};
use crate::support::*;

const ROOTS: &str = "/v1/agent/connect/ca/roots";
const LEAF_API: &str = "/v1/agent/connect/ca/leaf/api";
const LEAF_WEB: &str = "/v1/agent/connect/ca/leaf/web";
const AUTHORIZE: &str = "/v1/agent/connect/authorize";
const HEALTH_API: &str = "/v1/health/connect/api";
const INTENTIONS: &str = "/v1/connect/intentions/match";
const TOKEN: &str = "s3cr3t-token";

/// How long a future that must stay pending is given to (wrongly) finish.
const STILL_PENDING: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// Helpers.

/// Starts an in-process ferry pointed at `agent`, with `args` after
/// `-http-addr`.
async fn on_agent(agent: &FakeAgent, args: &[&str]) -> Ferry {
    let url = agent.url();
    let mut all = vec!["-http-addr", url.as_str()];
    all.extend_from_slice(args);
    Ferry::start(&all).await
}

/// The flags of a ferry for `service` with a public listener in front of `app`.
fn server_args<'a>(service: &'a str, app: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "-service",
        service,
        "-listen",
        "127.0.0.1:0",
        "-service-addr",
        app,
    ];
    args.extend_from_slice(extra);
    args
}

/// A ferry for `service` fronting `app` on 127.0.0.1:0, intentions from the agent.
async fn server(agent: &FakeAgent, service: &str, app: &EchoServer, extra: &[&str]) -> Ferry {
    let app = app.addr_arg();
    on_agent(agent, &server_args(service, &app, extra)).await
}

/// A ferry for `service` with a local listener (port 0) per upstream name,
/// instances from the agent's health endpoint.
async fn client(agent: &FakeAgent, service: &str, upstreams: &[&str], extra: &[&str]) -> Ferry {
    let specs: Vec<String> = upstreams.iter().map(|u| format!("{u}:0")).collect();
    let mut args = vec!["-service", service];
    for s in &specs {
        args.extend(["-upstream", s.as_str()]);
    }
    args.extend_from_slice(extra);
    on_agent(agent, &args).await
}

/// Waits until `ferry`'s balancer for `upstream` holds exactly `want`.
async fn wait_instances(ferry: &Ferry, upstream: &str, want: &[SocketAddr]) {
    let mut want = want.to_vec();
    want.sort();
    let addrs = || {
        let mut got: Vec<SocketAddr> = ferry
            .running
            .instances(upstream)
            .unwrap_or_default()
            .iter()
            .map(|i| i.addr)
            .collect();
        got.sort();
        got
    };
    eventually(&format!("{upstream} instances to be {want:?}"), || {
        addrs() == want
    })
    .await;
}

/// The first GET on `path`, among those after the first `after`, that
/// carries `index` (a blocking query: the watcher is up and waiting).
async fn wait_for_blocking_call(agent: &FakeAgent, path: &str, after: usize) -> Call {
    let deadline = Instant::now() + DEADLINE;
    let mut n = after + 1;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let calls = agent.wait_for_calls("GET", path, n, left).await;
        if let Some(c) = calls[after..].iter().find(|c| c.param("index").is_some()) {
            return c.clone();
        }
        n = calls.len() + 1;
    }
}

/// Opens a connection through `addr` and checks one echo on it; the
/// connection stays open.
async fn open_live(addr: SocketAddr, msg: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    echo_part(&mut s, msg).await;
    s
}

/// One echo on an open connection, which stays open.
async fn echo_part(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg)
        .await
        .expect("write on the live connection");
    let mut buf = vec![0u8; msg.len()];
    within("echo on the live connection", s.read_exact(&mut buf))
        .await
        .expect("read on the live connection");
    assert_eq!(buf, msg, "echo on the live connection");
}

/// Ends a live connection with a last echo, half-closing first.
async fn finish_live(mut s: TcpStream, msg: &[u8]) {
    let got = round_trip(&mut s, msg).await.expect("last echo");
    assert_eq!(got, msg, "last echo on the live connection");
}

/// True if a fresh connection through `addr` echoes `msg`.
async fn try_echo(addr: SocketAddr, msg: &[u8]) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    matches!(round_trip(&mut s, msg).await, Ok(got) if got == msg)
}

/// A fresh connection through `addr` is closed without an answer (EOF or
/// reset, not a hang).
async fn assert_refused(addr: SocketAddr, what: &str) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    match round_trip(&mut s, b"let me in").await {
        Ok(got) => assert!(got.is_empty(), "{what}: got {got:?} back"),
        Err(e) => assert_ne!(
            e.kind(),
            std::io::ErrorKind::TimedOut,
            "{what}: the connection hung instead of closing"
        ),
    }
}

/// The certificate ferry's public listener at `addr` presents to a raw
/// client holding `client`; the connection is checked to echo.
async fn presented(addr: SocketAddr, client: &Leaf) -> CertificateDer<'static> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut tls = within(
        "TLS handshake with ferry",
        raw_client(Some(client)).connect(any_name(), tcp),
    )
    .await
    .expect("handshake");
    let cert = tls.get_ref().1.peer_certificates().expect("server cert")[0].clone();
    let got = round_trip(&mut tls, b"who are you?").await.expect("echo");
    assert_eq!(got, b"who are you?", "echo through {addr}");
    cert
}

/// What the agent answers on `/v1/agent/connect/ca/leaf/<service>` now
/// (an extra call in its log), asking with `token` if given.
async fn agent_leaf(agent: &FakeAgent, service: &str, token: Option<&str>) -> Value {
    let url = format!("{}/v1/agent/connect/ca/leaf/{service}", agent.url());
    let mut req = http().get(url);
    if let Some(t) = token {
        req = req.header("X-Consul-Token", t);
    }
    let resp = within("leaf from the agent", req.send())
        .await
        .expect("GET leaf");
    assert!(resp.status().is_success(), "leaf: {}", resp.status());
    resp.json().await.expect("leaf JSON")
}

/// One agent, an `api` ferry in front of an echo app, a `web` ferry with an
/// upstream to `api` found through the agent's health endpoint.
struct AgentMesh {
    pki: Pki,
    agent: FakeAgent,
    app: EchoServer,
    api: Ferry,
    web: Ferry,
}

impl AgentMesh {
    async fn start(api_extra: &[&str]) -> AgentMesh {
        let pki = Pki::new();
        let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
        AgentMesh::on(pki, agent, api_extra, &[]).await
    }

    async fn on(pki: Pki, agent: FakeAgent, api_extra: &[&str], web_extra: &[&str]) -> AgentMesh {
        let app = EchoServer::start().await;
        let api = server(&agent, "api", &app, api_extra).await;
        // Only known once it is bound.
        agent.set_instances("api", vec![Instance::sidecar(api.inbound())]);
        let web = client(&agent, "web", &["api"], web_extra).await;
        wait_instances(&web, "api", &[api.inbound()]).await;
        AgentMesh {
            pki,
            agent,
            app,
            api,
            web,
        }
    }

    /// web's local listener for api.
    fn entry(&self) -> SocketAddr {
        self.web.upstream("api")
    }
}

// ---------------------------------------------------------------------------
// 1. The mesh through the agent.

/// Everything a mesh needs comes from the agent: both ferries present the
/// leaves the agent issued (what a raw client sees is the agent's `CertPEM`;
/// the serial web presents is the agent's `SerialNumber` for web), web finds
/// api through `/v1/health/connect/api?passing`, and api asks authorize
/// exactly once per inbound connection with `Target=api`, web's SPIFFE ID and
/// a colon-hex serial, and nothing else in the body. Bytes round-trip.
#[tokio::test]
async fn a_mesh_through_the_agent_uses_its_leaves_instances_and_decisions() {
    let m = AgentMesh::start(&[]).await;

    let health = m.agent.wait_for_call("GET", HEALTH_API, DEADLINE).await;
    assert!(
        health.param("passing").is_some(),
        "only passing instances are asked for: {health:?}"
    );

    let before = m.agent.count("POST", AUTHORIZE);
    for i in 0..3 {
        assert_echo(m.entry(), format!("hello api, #{i}").as_bytes()).await;
    }
    assert_eq!(
        m.agent.count("POST", AUTHORIZE),
        before + 3,
        "one authorize per inbound connection; calls:\n{}",
        m.agent.call_log()
    );
    assert_eq!(m.api.metrics().authz_allowed.get(), 3);
    assert_eq!(m.app.counts.accepted(), 3);

    let web_leaf = agent_leaf(&m.agent, "web", None).await;
    let web_serial = web_leaf["SerialNumber"].as_str().expect("SerialNumber");
    for call in &m.agent.calls()[..] {
        if call.method != "POST" || call.path != AUTHORIZE {
            continue;
        }
        let body: Value = serde_json::from_str(&call.body).expect("authorize body is JSON");
        let mut keys: Vec<&String> = body.as_object().expect("object").keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["ClientCertSerial", "ClientCertURI", "Target"],
            "{call:?}"
        );
        assert_eq!(body["Target"], "api", "{call:?}");
        assert_eq!(body["ClientCertURI"], m.pki.uri("web"), "{call:?}");
        let serial = body["ClientCertSerial"].as_str().expect("serial string");
        assert!(is_colon_hex(serial), "colon-hex serial: {serial:?}");
        assert_eq!(
            serial, web_serial,
            "web presents the leaf the agent issued for it"
        );
    }
    assert_eq!(
        m.web
            .running
            .credentials()
            .expect("certificates")
            .identity
            .serial,
        web_serial
    );

    // api presents the agent's leaf for api, byte for byte.
    let api_leaf = agent_leaf(&m.agent, "api", None).await;
    let api_pem = api_leaf["CertPEM"].as_str().expect("CertPEM");
    let seen = presented(m.api.inbound(), &m.pki.leaf("web")).await;
    assert_eq!(seen, first_cert(api_pem), "api presents the agent's leaf");
    assert_eq!(
        m.api
            .running
            .credentials()
            .expect("certificates")
            .identity
            .serial,
        api_leaf["SerialNumber"].as_str().unwrap()
    );
    assert_eq!(
        m.agent.count("POST", AUTHORIZE),
        before + 4,
        "the raw connection was authorized once too"
    );
}

// ---------------------------------------------------------------------------
// 2. Nothing is served before the first valid certificates.

/// While the roots endpoint answers 500 and the leaf request is held open,
/// `start` stays pending; both the `-listen` and the `-upstream` port are
/// already bound, but a mesh handshake begun then does not complete. Once
/// the agent answers, `start` returns, and that waiting handshake completes
/// with the agent's leaf: the peer that came early is served, not refused.
#[tokio::test]
async fn connections_wait_until_the_agent_delivers_roots_and_a_leaf() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = EchoServer::start().await;
    agent.fail_next(ROOTS, 3, 500, "rpc error making call: No cluster leader");
    agent.stall(LEAF_API, true);

    let (port, up_port) = (dead_addr().await, dead_addr().await);
    let (url, app_addr, listen) = (agent.url(), app.addr_arg(), port.to_string());
    let upstream = format!("billing:{}", up_port.port());
    let args: [&str; 10] = [
        "-http-addr",
        &url,
        "-service",
        "api",
        "-listen",
        &listen,
        "-service-addr",
        &app_addr,
        "-upstream",
        &upstream,
    ];
    let mut start = std::pin::pin!(Ferry::start(&args));
    assert!(
        timeout(Duration::from_millis(50), start.as_mut())
            .await
            .is_err(),
        "start returned with the leaf held"
    );
    // Roots fail three times, then are delivered; the leaf is asked for and held.
    wait_for_blocking_call(&agent, ROOTS, 0).await;
    agent.wait_for_call("GET", LEAF_API, DEADLINE).await;
    assert!(
        timeout(STILL_PENDING, start.as_mut()).await.is_err(),
        "start must wait for the leaf"
    );
    TcpStream::connect(up_port)
        .await
        .expect("the upstream port is bound before the certificates");
    let web = pki.leaf("web");
    let mut early = std::pin::pin!(presented(port, &web));
    assert!(
        timeout(STILL_PENDING, early.as_mut()).await.is_err(),
        "no handshake completes before the certificates"
    );

    agent.stall(LEAF_API, false);
    let api = within("start once the leaf arrives", start).await;
    assert_eq!(api.inbound(), port);
    assert_eq!(api.upstream("billing"), up_port);
    let leaf = agent_leaf(&agent, "api", None).await;
    let first = first_cert(leaf["CertPEM"].as_str().unwrap());
    assert_eq!(within("the early peer is served", early).await, first);
    assert_eq!(presented(port, &web).await, first);
}

/// A first leaf that does not validate (another service's, then one from a
/// CA the roots do not list) is refused: `start` stays pending and no
/// handshake is served with it; the first valid leaf starts the proxy with
/// that leaf.
#[tokio::test]
async fn an_invalid_first_leaf_is_not_served() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = EchoServer::start().await;
    agent.set_leaf("api", &pki.leaf("web"));

    let port = dead_addr().await;
    let (url, app_addr, listen) = (agent.url(), app.addr_arg(), port.to_string());
    let args: [&str; 8] = [
        "-http-addr",
        &url,
        "-service",
        "api",
        "-listen",
        &listen,
        "-service-addr",
        &app_addr,
    ];
    let mut start = std::pin::pin!(Ferry::start(&args));
    assert!(timeout(Duration::from_millis(50), start.as_mut())
        .await
        .is_err());
    // The wrong leaf was delivered: the watcher is back, blocking.
    wait_for_blocking_call(&agent, LEAF_API, 0).await;
    assert!(
        timeout(STILL_PENDING, start.as_mut()).await.is_err(),
        "a leaf for web is not a leaf for api"
    );
    let web = pki.leaf("web");
    assert!(
        timeout(STILL_PENDING, presented(port, &web)).await.is_err(),
        "no handshake is served with web's leaf"
    );

    let foreign = DevCa::generate(pki.trust_domain()).unwrap();
    let stranger = foreign
        .leaf("api", "dc1", Duration::from_secs(3600))
        .unwrap();
    let seen_calls = agent.count("GET", LEAF_API);
    agent.set_leaf("api", &stranger);
    wait_for_blocking_call(&agent, LEAF_API, seen_calls).await;
    assert!(
        timeout(STILL_PENDING, start.as_mut()).await.is_err(),
        "a leaf from a CA the roots do not list is refused"
    );
    assert!(
        timeout(STILL_PENDING, presented(port, &web)).await.is_err(),
        "no handshake is served with a foreign leaf"
    );

    let good = pki
        .ca
        .leaf("api", "dc1", Duration::from_secs(3600))
        .unwrap();
    agent.set_leaf("api", &good);
    let api = within("start once a valid leaf arrives", start).await;
    assert_eq!(api.inbound(), port);
    assert_eq!(
        presented(port, &pki.leaf("web")).await,
        first_cert(&good.cert_pem)
    );
}

// ---------------------------------------------------------------------------
// 3. Rotation.

/// A CA rotation through the agent (new root active, old one still listed,
/// then a new leaf for api from the new CA): a connection opened before
/// keeps echoing; new connections eventually present the new leaf and still
/// work through web. Then leaves that do not validate (for another service;
/// from a CA not in the roots) are refused and the previous leaf stays.
#[tokio::test]
async fn rotation_keeps_live_connections_and_refuses_invalid_leaves() {
    let m = AgentMesh::start(&[]).await;
    let mut live = open_live(m.entry(), b"before rotation").await;
    let raw = m.pki.leaf("web");

    let td = m.pki.trust_domain().to_string();
    let new_ca = DevCa::generate(&td).unwrap();
    m.agent.rotate(new_ca.cert_pem());
    eventually("both ferries to trust both roots", || {
        m.api
            .running
            .credentials()
            .is_some_and(|c| c.root_count() == 2)
            && m.web
                .running
                .credentials()
                .is_some_and(|c| c.root_count() == 2)
    })
    .await;
    let new_api = new_ca
        .leaf("api", "dc1", Duration::from_secs(3600))
        .unwrap();
    m.agent.set_leaf("api", &new_api);
    let want = first_cert(&new_api.cert_pem);
    let (addr, raw_ref, want_ref) = (m.api.inbound(), &raw, &want);
    until("new connections to present the new leaf", || async move {
        presented(addr, raw_ref).await == *want_ref
    })
    .await;
    assert_echo(m.entry(), b"after rotation").await;
    echo_part(&mut live, b"still here").await;
    let serial = m
        .api
        .running
        .credentials()
        .expect("certificates")
        .identity
        .serial
        .clone();

    let foreign = DevCa::generate(&td).unwrap();
    let bad = [
        (
            "a leaf for another service",
            new_ca
                .leaf("web", "dc1", Duration::from_secs(3600))
                .unwrap(),
        ),
        (
            "a leaf from a CA the roots do not list",
            foreign
                .leaf("api", "dc1", Duration::from_secs(3600))
                .unwrap(),
        ),
    ];
    for (what, leaf) in &bad {
        let calls = m.agent.count("GET", LEAF_API);
        m.agent.set_leaf("api", leaf);
        // Delivered: the leaf watcher has come back for the next change.
        m.agent
            .wait_for_calls("GET", LEAF_API, calls + 1, DEADLINE)
            .await;
        assert_eq!(
            presented(m.api.inbound(), &raw).await,
            want,
            "{what}: refused, the previous leaf stays"
        );
        assert_eq!(
            m.api
                .running
                .credentials()
                .expect("certificates")
                .identity
                .serial,
            serial,
            "{what}"
        );
        assert_echo(m.entry(), what.as_bytes()).await;
    }
    finish_live(live, b"the end").await;
}

// ---------------------------------------------------------------------------
// 4. Instances.

/// web's instances of api follow the agent's health answers: a second
/// instance added gets traffic, a critical one gets none, with none left a
/// connection is closed at once and counted as upstream_unavailable (no
/// instance is dialed), and an instance added back works again.
#[tokio::test]
async fn instances_follow_health_added_critical_removed_and_back() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let (app1, app2) = (EchoServer::start().await, EchoServer::start().await);
    let api1 = server(&agent, "api", &app1, &[]).await;
    let api2 = server(&agent, "api", &app2, &[]).await;
    let (a1, a2) = (api1.inbound(), api2.inbound());
    agent.set_instances("api", vec![Instance::sidecar(a1)]);
    let web = client(&agent, "web", &["api"], &[]).await;
    wait_instances(&web, "api", &[a1]).await;
    let entry = web.upstream("api");
    assert_echo(entry, b"one instance").await;
    assert_eq!((app1.counts.accepted(), app2.counts.accepted()), (1, 0));

    agent.set_instances("api", vec![Instance::sidecar(a1), Instance::sidecar(a2)]);
    wait_instances(&web, "api", &[a1, a2]).await;
    let (before1, before2) = (app1.counts.accepted(), app2.counts.accepted());
    let (c1, c2) = (&app1.counts, &app2.counts);
    until("both instances to get traffic", || async move {
        assert_echo(entry, b"two instances").await;
        c1.accepted() > before1 && c2.accepted() > before2
    })
    .await;

    agent.set_instances(
        "api",
        vec![
            Instance::sidecar(a1).with_health(Health::Critical),
            Instance::sidecar(a2),
        ],
    );
    wait_instances(&web, "api", &[a2]).await;
    let (before1, before2) = (app1.counts.accepted(), app2.counts.accepted());
    for _ in 0..4 {
        assert_echo(entry, b"one critical").await;
    }
    assert_eq!(
        app1.counts.accepted(),
        before1,
        "the critical instance gets nothing"
    );
    assert_eq!(app2.counts.accepted(), before2 + 4);

    agent.set_instances("api", vec![]);
    wait_instances(&web, "api", &[]).await;
    let inbound = api1.metrics().inbound_accepted.get() + api2.metrics().inbound_accepted.get();
    let unavailable = web.metrics().upstream_unavailable.get();
    assert_refused(entry, "no instance left").await;
    eventually("upstream_unavailable to be counted", || {
        web.metrics().upstream_unavailable.get() == unavailable + 1
    })
    .await;
    assert_eq!(
        web.metrics().upstream_attempt_failed.get(),
        0,
        "nothing dialed"
    );
    assert_eq!(
        api1.metrics().inbound_accepted.get() + api2.metrics().inbound_accepted.get(),
        inbound
    );

    agent.set_instances("api", vec![Instance::sidecar(a1)]);
    wait_instances(&web, "api", &[a1]).await;
    let before1 = app1.counts.accepted();
    assert_echo(entry, b"back again").await;
    assert_eq!(app1.counts.accepted(), before1 + 1);
}

// ---------------------------------------------------------------------------
// 5. Intentions.

/// Each new inbound connection is decided by the agent's intentions at that
/// moment: allowed by default; after a deny for web, refused (authz_denied)
/// without the app ever seeing it; after default deny plus an exact allow
/// for web, allowed again.
#[tokio::test]
async fn intentions_decide_each_new_connection() {
    let m = AgentMesh::start(&[]).await;
    assert_echo(m.entry(), b"default allow").await;
    assert_eq!(m.app.counts.accepted(), 1);

    m.agent.add_intention(Intention::deny("web", "api"));
    assert_refused(m.entry(), "web is denied").await;
    eventually("the denial to be counted", || {
        m.api.metrics().authz_denied.get() == 1
    })
    .await;
    assert_eq!(
        m.app.counts.accepted(),
        1,
        "the app never sees a denied peer"
    );

    m.agent.set_default_allow(false);
    m.agent.set_intentions(vec![Intention::allow("web", "api")]);
    assert_echo(m.entry(), b"allowed again").await;
    assert_eq!(m.app.counts.accepted(), 2);
    assert_eq!(m.api.metrics().authz_error.get(), 0);
}

/// Two clients (web, billing) each hold a live connection to api; an
/// intention denying billing arrives through the intention-match watch:
/// billing's live connection is closed (revoked == 1), web's keeps echoing,
/// and new connections are decided the same way.
#[tokio::test]
async fn a_new_deny_closes_only_the_denied_live_connections() {
    let m = AgentMesh::start(&[]).await;
    let billing = client(&m.agent, "billing", &["api"], &[]).await;
    wait_instances(&billing, "api", &[m.api.inbound()]).await;
    let mut from_web = open_live(m.entry(), b"web here").await;
    let mut from_billing = open_live(billing.upstream("api"), b"billing here").await;
    // The revocation watcher is blocking on intentions for api.
    let watch = wait_for_blocking_call(&m.agent, INTENTIONS, 0).await;
    assert_eq!(watch.param("name").as_deref(), Some("api"), "{watch:?}");

    m.agent.add_intention(Intention::deny("billing", "api"));
    let mut buf = [0u8; 64];
    let closed = within(
        "billing's live connection to be closed",
        from_billing.read(&mut buf),
    )
    .await;
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "billing's connection is closed, not echoing: {closed:?}"
    );
    eventually("the revocation to be counted", || {
        m.api.metrics().revoked.get() == 1
    })
    .await;

    echo_part(&mut from_web, b"web still here").await;
    finish_live(from_web, b"web done").await;
    assert_refused(billing.upstream("api"), "billing is denied now").await;
    assert_echo(m.entry(), b"web again").await;
    assert_eq!(
        m.api.metrics().revoked.get(),
        1,
        "only billing's connection"
    );
    assert_eq!(m.api.metrics().authz_denied.get(), 1);
}

/// When the token may not read intentions (403 on the intention-match
/// probe), ferry does not watch them; it re-checks live connections every
/// `-reauthorize-interval` instead, so a new deny still closes them.
#[tokio::test]
async fn without_intention_read_live_connections_are_rechecked_periodically() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    agent.fail_next(
        INTENTIONS,
        1,
        403,
        "Permission denied: token with AccessorID 'b1f6' lacks permission 'intention:read' on \"api\"",
    );
    let m = AgentMesh::on(pki, agent, &["-reauthorize-interval", "200ms"], &[]).await;
    let mut live = open_live(m.entry(), b"hello").await;

    m.agent.add_intention(Intention::deny("web", "api"));
    let mut buf = [0u8; 16];
    let closed = within("the live connection to be closed", live.read(&mut buf)).await;
    assert!(matches!(closed, Ok(0) | Err(_)), "closed: {closed:?}");
    eventually("the revocation to be counted", || {
        m.api.metrics().revoked.get() == 1
    })
    .await;
    assert_eq!(
        m.agent.count("GET", INTENTIONS),
        1,
        "after the 403, intentions are not watched; calls:\n{}",
        m.agent.call_log()
    );
}

/// Trouble on the authorize endpoint alone, within
/// `-authz-fallback-window`: a 500 or a malformed answer reuses the last
/// decision for that source (web's allow stays an allow, billing's deny
/// stays a deny), while a 403 is never papered over: refused, authz_error.
#[tokio::test]
async fn authorize_errors_reuse_recent_decisions_but_not_refusals() {
    let m = AgentMesh::start(&["-authz-fallback-window", "30s"]).await;
    assert_echo(m.entry(), b"decided by the agent").await;

    m.agent.fail_next(
        AUTHORIZE,
        1,
        500,
        "rpc error making call: No cluster leader",
    );
    assert_echo(m.entry(), b"reused after a 500").await;
    m.agent.malformed_next(AUTHORIZE, 1);
    assert_echo(m.entry(), b"reused after garbage").await;
    assert_eq!(m.api.metrics().authz_error.get(), 0);
    assert_eq!(
        m.agent.count("POST", AUTHORIZE),
        3,
        "the agent was asked each time"
    );

    m.agent.fail_next(
        AUTHORIZE,
        1,
        403,
        "Permission denied: token with AccessorID 'b1f6' lacks permission 'service:write' on \"api\"",
    );
    let accepted = m.app.counts.accepted();
    assert_refused(m.entry(), "a 403 is not papered over").await;
    assert_eq!(m.api.metrics().authz_error.get(), 1);
    assert_eq!(m.app.counts.accepted(), accepted);

    let billing = client(&m.agent, "billing", &["api"], &[]).await;
    wait_instances(&billing, "api", &[m.api.inbound()]).await;
    m.agent.add_intention(Intention::deny("billing", "api"));
    assert_refused(billing.upstream("api"), "billing is denied").await;
    assert_eq!(m.api.metrics().authz_denied.get(), 1);
    m.agent.fail_next(
        AUTHORIZE,
        1,
        500,
        "rpc error making call: No cluster leader",
    );
    assert_refused(billing.upstream("api"), "a remembered deny stays a deny").await;
    assert_eq!(m.api.metrics().authz_denied.get(), 2);
    assert_eq!(m.api.metrics().authz_error.get(), 1);
    assert_echo(m.entry(), b"web is still fine").await;
}

/// The fallback is bounded by its window: a decision is reused while it is
/// younger than `-authz-fallback-window` (here 250 ms) and not after, when
/// the connection is refused as authz_error. The window is measured from
/// the decision, so letting 300 ms pass is deterministic, not a race.
#[tokio::test]
async fn a_decision_older_than_the_window_is_not_reused() {
    let m = AgentMesh::start(&["-authz-fallback-window", "250ms"]).await;
    assert_echo(m.entry(), b"decided").await;
    let decided = Instant::now();
    m.agent.fail_next(
        AUTHORIZE,
        2,
        500,
        "rpc error making call: No cluster leader",
    );
    assert_echo(m.entry(), b"reused within the window").await;
    assert_eq!(m.api.metrics().authz_error.get(), 0);

    tokio::time::sleep_until(decided + Duration::from_millis(300)).await;
    assert_refused(m.entry(), "the decision is older than the window").await;
    assert_eq!(m.api.metrics().authz_error.get(), 1);
    assert_eq!(m.app.counts.accepted(), 2);
}

// ---------------------------------------------------------------------------
// 6. Agent down and back.

/// With the agent down: a live connection keeps working; a new connection
/// from web to api (`-authz-fallback-window 30s`) is accepted on the
/// decision made for web moments before, but one from billing (never
/// decided) is refused; one to `strict` (`-authz-fallback-window=0`) is
/// refused too. Both refusals are authz_error. When the agent is back, every
/// watcher comes back with a blocking query of its own, billing and
/// `strict` are accepted again, and decisions come from the agent again.
#[tokio::test]
async fn agent_down_and_back() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let (app, strict_app) = (EchoServer::start().await, EchoServer::start().await);
    let api = server(&agent, "api", &app, &["-authz-fallback-window", "30s"]).await;
    let strict = server(&agent, "strict", &strict_app, &["-authz-fallback-window=0"]).await;
    agent.set_instances("api", vec![Instance::sidecar(api.inbound())]);
    agent.set_instances("strict", vec![Instance::sidecar(strict.inbound())]);
    let web = client(&agent, "web", &["api", "strict"], &[]).await;
    wait_instances(&web, "api", &[api.inbound()]).await;
    wait_instances(&web, "strict", &[strict.inbound()]).await;
    let (to_api, to_strict) = (web.upstream("api"), web.upstream("strict"));
    let billing = client(&agent, "billing", &["api"], &[]).await;
    wait_instances(&billing, "api", &[api.inbound()]).await;
    let mut live = open_live(to_api, b"before").await;
    assert_echo(to_strict, b"strict before").await;

    agent.pause().await;
    let watched = [
        ROOTS,
        LEAF_API,
        LEAF_WEB,
        "/v1/agent/connect/ca/leaf/strict",
        HEALTH_API,
        "/v1/health/connect/strict",
        INTENTIONS,
    ];
    let seen: Vec<usize> = watched.iter().map(|p| agent.count("GET", p)).collect();

    echo_part(&mut live, b"while the agent is down").await;
    let allowed = api.metrics().authz_allowed.get();
    assert_echo(to_api, b"decision reused").await;
    assert_eq!(api.metrics().authz_allowed.get(), allowed + 1);
    assert_eq!(api.metrics().authz_error.get(), 0);
    let accepted = app.counts.accepted();
    assert_refused(billing.upstream("api"), "billing was never decided").await;
    assert_eq!(api.metrics().authz_error.get(), 1, "fail closed");
    assert_eq!(app.counts.accepted(), accepted);

    let accepted = strict_app.counts.accepted();
    assert_refused(to_strict, "no fallback: fail closed").await;
    eventually("strict to count an authz error", || {
        strict.metrics().authz_error.get() == 1
    })
    .await;
    assert_eq!(
        strict_app.counts.accepted(),
        accepted,
        "the app saw nothing"
    );

    agent.resume().await;
    for (path, n) in watched.iter().zip(seen) {
        wait_for_blocking_call(&agent, path, n).await;
    }
    let to_api_from_billing = billing.upstream("api");
    until("billing and strict to be accepted again", || async move {
        try_echo(to_strict, b"agent is back").await
            && try_echo(to_api_from_billing, b"agent is back").await
    })
    .await;
    echo_part(&mut live, b"after").await;
    finish_live(live, b"bye").await;

    // The agent decides again: a deny now is not papered over by the window.
    agent.add_intention(Intention::deny("web", "api"));
    assert_refused(to_api, "denied by the agent that is back").await;
    assert_eq!(api.metrics().authz_denied.get(), 1);
}

// ---------------------------------------------------------------------------
// 7. Index rewinds and bad answers.

/// The health watch: an index that goes backwards makes ferry fetch afresh
/// without an index (and the change is still picked up); then 500,
/// malformed JSON and a 403 in a row leave the last instances in place and
/// serving, and the next change still applies.
#[tokio::test]
async fn health_watch_survives_index_rewind_and_bad_answers() {
    let m = AgentMesh::start(&[]).await;
    let a = m.api.inbound();
    let other = TlsEchoServer::start(&m.pki, &m.pki.leaf("api")).await;

    let seen = m.agent.count("GET", HEALTH_API);
    m.agent.set_index_backwards(HEALTH_API);
    m.agent.set_instances(
        "api",
        vec![Instance::sidecar(a), Instance::sidecar(other.addr)],
    );
    wait_instances(&m.web, "api", &[a, other.addr]).await;
    let after: Vec<Call> = m
        .agent
        .calls()
        .into_iter()
        .filter(|c| c.path == HEALTH_API)
        .collect();
    assert!(
        after[seen..].iter().any(|c| c.param("index").is_none()),
        "an index going backwards resets to a fetch without index; calls:\n{}",
        m.agent.call_log()
    );

    let seen = m.agent.count("GET", HEALTH_API);
    m.agent.fail_next(
        HEALTH_API,
        1,
        500,
        "rpc error making call: No cluster leader",
    );
    m.agent.malformed_next(HEALTH_API, 1);
    m.agent.fail_next(
        HEALTH_API,
        1,
        403,
        "Permission denied: token with AccessorID 'b1f6' lacks permission 'service:read' on \"api\"",
    );
    m.agent.set_instances("api", vec![Instance::sidecar(a)]);
    wait_instances(&m.web, "api", &[a]).await;
    // Answered 500 and malformed; the 403 is under way.
    m.agent
        .wait_for_calls("GET", HEALTH_API, seen + 3, DEADLINE)
        .await;
    assert_echo(m.entry(), b"while health fails").await;
    // All three faults used up; the watch is back to a blocking query.
    wait_for_blocking_call(&m.agent, HEALTH_API, seen + 3).await;
    wait_instances(&m.web, "api", &[a]).await;
    assert_echo(m.entry(), b"after the faults").await;

    m.agent.set_instances(
        "api",
        vec![Instance::sidecar(a), Instance::sidecar(other.addr)],
    );
    wait_instances(&m.web, "api", &[a, other.addr]).await;
    for _ in 0..2 {
        assert_echo(m.entry(), b"the change applied").await;
    }
    assert!(other.counts.accepted() > 0, "the new instance got traffic");
}

/// The roots watch of both ferries: an index that goes backwards, then 500
/// and malformed JSON, leave the credentials in place and the mesh serving,
/// and later root changes are still picked up by both.
#[tokio::test]
async fn roots_watch_survives_index_rewind_and_bad_answers() {
    let m = AgentMesh::start(&[]).await;
    let td = m.pki.trust_domain().to_string();
    let roots = |n: usize| {
        m.api
            .running
            .credentials()
            .is_some_and(|c| c.root_count() == n)
            && m.web
                .running
                .credentials()
                .is_some_and(|c| c.root_count() == n)
    };

    let seen = m.agent.count("GET", ROOTS);
    m.agent.set_index_backwards(ROOTS);
    m.agent.rotate(DevCa::generate(&td).unwrap().cert_pem());
    eventually("both ferries to see 2 roots", || roots(2)).await;
    let after: Vec<Call> = m
        .agent
        .calls()
        .into_iter()
        .filter(|c| c.path == ROOTS)
        .collect();
    assert!(
        after[seen..].iter().any(|c| c.param("index").is_none()),
        "an index going backwards resets to a fetch without index; calls:\n{}",
        m.agent.call_log()
    );
    assert_echo(m.entry(), b"after the rewind").await;

    let seen = m.agent.count("GET", ROOTS);
    m.agent
        .fail_next(ROOTS, 1, 500, "rpc error making call: No cluster leader");
    m.agent.malformed_next(ROOTS, 1);
    m.agent.rotate(DevCa::generate(&td).unwrap().cert_pem());
    eventually("both ferries to see 3 roots", || roots(3)).await;
    // Both faults used up (two failed calls, then each ferry blocks again).
    m.agent
        .wait_for_calls("GET", ROOTS, seen + 4, DEADLINE)
        .await;
    assert!(roots(3), "the last good roots stay");
    assert_echo(m.entry(), b"after the faults").await;

    m.agent.rotate(DevCa::generate(&td).unwrap().cert_pem());
    eventually("both ferries to see 4 roots", || roots(4)).await;
    assert_echo(m.entry(), b"the change applied").await;
}

// ---------------------------------------------------------------------------
// 8. ACL token.

/// With ACLs on, every call both ferries make carries `-token`, including
/// roots (which would work without it) and authorize.
#[tokio::test]
async fn every_call_carries_the_token() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki).token(TOKEN)).await;
    let m = AgentMesh::on(pki, agent, &["-token", TOKEN], &["-token", TOKEN]).await;
    assert_echo(m.entry(), b"with a token").await;
    wait_for_blocking_call(&m.agent, INTENTIONS, 0).await;

    let calls = m.agent.calls();
    for path in [ROOTS, LEAF_API, LEAF_WEB, HEALTH_API, AUTHORIZE, INTENTIONS] {
        assert!(
            calls.iter().any(|c| c.path == path),
            "no call to {path}; calls:\n{}",
            m.agent.call_log()
        );
    }
    let without: Vec<&Call> = calls
        .iter()
        .filter(|c| c.token.as_deref() != Some(TOKEN))
        .collect();
    assert!(without.is_empty(), "calls without the token: {without:?}");
}

/// The real binary at `-log-level debug` with `-token`, serving one
/// connection each way through the agent (inbound: authorize; upstream:
/// health), never writes the token to its logs, and sent it on every call.
#[tokio::test]
async fn the_token_never_appears_in_the_logs() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki).token(TOKEN)).await;
    let app = EchoServer::start().await;
    let api = server(&agent, "api", &app, &["-token", TOKEN]).await;
    agent.set_instances("api", vec![Instance::sidecar(api.inbound())]);

    let (url, app_addr) = (agent.url(), app.addr_arg());
    let mut bin = FerryProcess::start(&[
        "-http-addr",
        &url,
        "-token",
        TOKEN,
        "-log-level",
        "debug",
        "-service",
        "web",
        "-listen",
        "127.0.0.1:0",
        "-service-addr",
        &app_addr,
        "-upstream",
        "api:0",
    ]);
    let inbound = bin.listen_addr("inbound listener ready").await;
    let upstream = bin.listen_addr("upstream listener ready").await;
    bin.line("upstream instances updated").await;

    assert_echo(upstream, b"web to api through the binary").await;
    let seen = presented(inbound, &pki.leaf("api")).await;
    let web_leaf = agent_leaf(&agent, "web", Some(TOKEN)).await;
    assert_eq!(seen, first_cert(web_leaf["CertPEM"].as_str().unwrap()));
    bin.line("connection closed").await;
    let lines = bin.stop();

    assert!(
        lines.iter().any(|l| l.contains("DEBUG")),
        "debug logging is on"
    );
    let leaked: Vec<&String> = lines.iter().filter(|l| l.contains(TOKEN)).collect();
    assert!(leaked.is_empty(), "the token is in the logs: {leaked:#?}");
    let calls = agent.calls();
    for c in &calls {
        assert_eq!(c.token.as_deref(), Some(TOKEN), "{c:?}");
    }
    assert!(
        calls
            .iter()
            .any(|c| c.path == AUTHORIZE && c.body.contains("svc/api")),
        "the binary asked authorize for api's connection"
    );
}

/// A token the agent does not know (403 `ACL not found` on the leaf) and
/// no token at all (403 naming the missing permission), each in its own
/// binary: each logs the refusal once (not once per retry), never prints a
/// token, and never serves: its ports are bound, but a handshake there
/// never completes and the app is never reached.
#[tokio::test]
async fn a_refused_token_is_logged_once_and_nothing_is_served() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki).token(TOKEN)).await;
    let app = EchoServer::start().await;
    let (port, anon_port) = (dead_addr().await, dead_addr().await);
    let (url, app_addr) = (agent.url(), app.addr_arg());
    let (listen, anon_listen) = (port.to_string(), anon_port.to_string());
    let wrong = "not-the-token-42";
    let mut bin = FerryProcess::start(&[
        "-http-addr",
        &url,
        "-token",
        wrong,
        "-service",
        "api",
        "-listen",
        &listen,
        "-service-addr",
        &app_addr,
    ]);
    let mut anon = FerryProcess::start(&[
        "-http-addr",
        &url,
        "-service",
        "billing",
        "-listen",
        &anon_listen,
        "-service-addr",
        &app_addr,
    ]);
    // Three refused leaf calls each: the third is sent after the second
    // failure was handled (and logged, if it were logged per retry).
    agent.wait_for_calls("GET", LEAF_API, 3, DEADLINE).await;
    agent
        .wait_for_calls("GET", "/v1/agent/connect/ca/leaf/billing", 3, DEADLINE)
        .await;
    let web = pki.leaf("web");
    for p in [port, anon_port] {
        let tcp = TcpStream::connect(p)
            .await
            .expect("bound before certificates");
        assert!(
            timeout(
                STILL_PENDING,
                raw_client(Some(&web)).connect(any_name(), tcp)
            )
            .await
            .is_err(),
            "no handshake completes on {p}"
        );
    }
    assert_eq!(app.counts.accepted(), 0, "the app is never reached");
    let (lines, anon_lines) = (bin.stop(), anon.stop());

    let acl: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("ACL not found"))
        .collect();
    assert_eq!(acl.len(), 1, "logged once per change of state: {lines:#?}");
    assert!(acl[0].contains("403"), "{}", acl[0]);
    assert!(acl[0].contains("leaf"), "names the endpoint: {}", acl[0]);
    let denied: Vec<&String> = anon_lines
        .iter()
        .filter(|l| l.contains("HTTP 403"))
        .collect();
    assert_eq!(denied.len(), 1, "logged once: {anon_lines:#?}");
    assert!(
        denied[0].contains(r#"missing_permission=service:write on "billing""#),
        "names the missing permission: {}",
        denied[0]
    );
    for lines in [&lines, &anon_lines] {
        assert!(
            !lines.iter().any(|l| l.contains("certificates ready")),
            "ferry did not serve: {lines:#?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains(wrong) || l.contains(TOKEN)),
            "no token is logged: {lines:#?}"
        );
    }
}
