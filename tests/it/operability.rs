//! What operators see and use: the admin listener (`/metrics` parsed as a
//! Prometheus scraper would, `/ready`, `/live`, `/status`), the drain on
//! shutdown (in-process and the real binary under SIGTERM/SIGINT), the
//! access-log line's fields (text and JSON), and the `-register` TTL check
//! following the leaf's remaining lifetime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry::identity::dev_ca::{DevCa, Leaf, LeafSpec};
use ferry::identity::tls::{Credentials, PemBundle};
use prometheus_parse::Scrape;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use crate::support::fake_agent::{AgentOpts, FakeAgent, Instance};
use crate::support::*;

const LEAF_API: &str = "/v1/agent/connect/ca/leaf/api";
/// How long a future that must stay pending is given to (wrongly) finish.
const STILL_PENDING: Duration = Duration::from_millis(300);
/// The fields of the access-log line, in order.
const LOG_FIELDS: [&str; 13] = [
    "direction",
    "peer",
    "service",
    "source",
    "destination",
    "target_addr",
    "phase",
    "attempts",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "outcome",
    "detail",
];

/// The documented JSON type of each access-log key (README, "Access log").
#[derive(Clone, Copy, Debug)]
enum Kind {
    Text,
    Count,
    Millis,
}

const LOG_SCHEMA: [(&str, Kind); 17] = [
    ("timestamp", Kind::Text),
    ("level", Kind::Text),
    ("target", Kind::Text),
    ("message", Kind::Text),
    ("direction", Kind::Text),
    ("peer", Kind::Text),
    ("service", Kind::Text),
    ("source", Kind::Text),
    ("destination", Kind::Text),
    ("target_addr", Kind::Text),
    ("phase", Kind::Text),
    ("attempts", Kind::Count),
    ("bytes_in", Kind::Count),
    ("bytes_out", Kind::Count),
    ("duration_ms", Kind::Millis),
    ("outcome", Kind::Text),
    ("detail", Kind::Text),
];

/// The fixed set of `outcome` values.
const OUTCOMES: [&str; 7] = [
    "done", "denied", "failed", "refused", "revoked", "drained", "evicted",
];

/// One JSON object whose keys are all distinct: unlike `serde_json::Value`,
/// which keeps the last of two equal keys, this refuses the line.
struct StrictObject(serde_json::Map<String, Value>);

impl<'de> serde::Deserialize<'de> for StrictObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = StrictObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object with distinct keys")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StrictObject, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
                    }
                    out.insert(k, v);
                }
                Ok(StrictObject(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Parses a log line strictly: a JSON object, no key twice.
fn strict_json(line: &str) -> Value {
    match serde_json::from_str::<StrictObject>(line) {
        Ok(StrictObject(map)) => Value::Object(map),
        Err(e) => panic!("not a strict JSON object ({e}): {line}"),
    }
}

// ---------------------------------------------------------------------------
// Helpers.

/// `GET http://<admin><path>`: status code and body.
async fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    let url = format!("http://{admin}{path}");
    within(&format!("GET {url}"), async {
        let resp = http().get(&url).send().await.expect("GET");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body"))
    })
    .await
}

/// Scrapes `/metrics` and parses it with a real Prometheus text parser.
async fn scrape(admin: SocketAddr) -> (Scrape, String) {
    let (status, body) = get(admin, "/metrics").await;
    assert_eq!(status, 200, "/metrics: {body}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = Scrape::parse(lines).expect("/metrics parses as Prometheus text");
    (parsed, body)
}

/// The value of sample `metric` whose labels include all of `labels`.
fn sample(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| sample_value(metric, &x.value))
}

/// A sample's name, labels it must have, and value.
type Want<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Scrapes until every `(metric, labels, value)` in `want` holds (counters
/// are updated when a connection's task ends, a little after the client
/// saw EOF); panics with the last scrape after DEADLINE.
async fn expect_metrics(admin: SocketAddr, want: &[Want<'_>]) -> Scrape {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (s, text) = scrape(admin).await;
        let wrong: Vec<String> = want
            .iter()
            .filter(|(m, l, v)| sample(&s, m, l) != Some(*v))
            .map(|(m, l, v)| format!("{m}{l:?}: want {v}, got {:?}", sample(&s, m, l)))
            .collect();
        if wrong.is_empty() {
            return s;
        }
        if Instant::now() > deadline {
            panic!("metrics on {admin} never matched:\n{wrong:#?}\nlast scrape:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The leaf certificate's notAfter and serial (Consul's colon-hex format),
/// read independently of ferry.
fn cert_facts(leaf: &Leaf) -> (i64, String) {
    let (_, pem) = x509_parser::pem::parse_x509_pem(leaf.cert_pem.as_bytes()).expect("pem");
    let cert = pem.parse_x509().expect("x509");
    let serial = cert
        .tbs_certificate
        .serial
        .to_bytes_be()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    (cert.validity().not_after.timestamp(), serial)
}

fn credentials(pki: &Pki, leaf: &Leaf, service: &str) -> Arc<Credentials> {
    let bundle = PemBundle {
        roots: pki.ca.cert_pem().to_string(),
        chain: leaf.cert_pem.clone(),
        key: leaf.key_pem.clone(),
        origin: ["roots".into(), "leaf".into(), "key".into()],
    };
    Arc::new(Credentials::new(&bundle, service).expect("credentials"))
}

/// A new mesh connection to `addr`, presenting `leaf`, gets nowhere:
/// [`refused`] (at connect, in the handshake, or closed without a reply),
/// and at once (within 2 s).
async fn new_connection_refused(addr: SocketAddr, leaf: &Leaf) {
    let r = timeout(Duration::from_secs(2), mesh_echo(addr, leaf))
        .await
        .expect("a new connection during the drain is closed at once");
    assert!(refused(&r), "no reply during the drain: {r:?}");
}

/// The listener at `addr` closes soon: connects are refused within
/// DEADLINE. (For the binary, where the test cannot tell exactly when the
/// drain has stopped the accept loop.)
async fn closes_soon(addr: SocketAddr) {
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts while draining"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------
// 1. /metrics.

/// `/metrics` on both ferries of a mesh parses as Prometheus text, has every
/// family, and its counters move by exactly what happened: two echoes (1234
/// bytes) count as accepted, closed `done`, bytes each way, authz `allow` on
/// the server and accepted/bytes under `upstream="api"` on the client, with
/// the instance gauge per upstream; a denied peer moves authz `deny`; a
/// client certificate from a foreign CA moves handshake failures with
/// `reason="untrusted"`; a dead upstream moves its connect failures only.
/// The leaf-expiry gauge equals the leaf's notAfter, and a rotation moves
/// it and the rotation counter.
#[tokio::test]
async fn metrics_count_what_happened() {
    let pki = Pki::new();
    let api_leaf = pki.leaf("api");
    pki.leaf("web");
    let billing = pki.leaf("billing");
    let app = EchoServer::start().await;
    let (dir, app_addr) = (pki.dir_arg(), app.addr_arg());
    let admin0 = ["-admin-addr", "127.0.0.1:0"];
    let mut extra = vec!["-allow", "web", "-default-deny"];
    extra.extend_from_slice(&admin0);
    let server = Ferry::start(&api_args(&dir, &app_addr, &extra)).await;
    let (dead1, dead2) = (dead_addr().await, dead_addr().await);
    let client = StandaloneArgs::new("web", &dir)
        .upstream("api", &[server.inbound()])
        .upstream("db", &[dead1, dead2])
        .extra(&admin0)
        .start()
        .await;
    let (s_admin, c_admin) = (server.running.admin.unwrap(), client.running.admin.unwrap());

    // Traffic: two echoes through the mesh, 1000 + 234 bytes.
    assert_echo(client.upstream("api"), &[7u8; 1000]).await;
    assert_echo(client.upstream("api"), &[8u8; 234]).await;
    let inbound_done: &[(&str, &str)] = &[
        ("direction", "inbound"),
        ("service", "api"),
        ("outcome", "done"),
    ];
    expect_metrics(
        s_admin,
        &[
            ("ferry_inbound_connections_accepted_total", &[], 2.0),
            ("ferry_connections_closed_total", inbound_done, 2.0),
            ("ferry_inbound_received_bytes_total", &[], 1234.0),
            ("ferry_inbound_sent_bytes_total", &[], 1234.0),
            ("ferry_authz_decisions_total", &[("decision", "allow")], 2.0),
            ("ferry_authz_decisions_total", &[("decision", "deny")], 0.0),
            ("ferry_inbound_connections_active", &[], 0.0),
        ],
    )
    .await;
    let api: &[(&str, &str)] = &[("upstream", "api")];
    let db: &[(&str, &str)] = &[("upstream", "db")];
    let upstream_done: &[(&str, &str)] = &[
        ("direction", "upstream"),
        ("service", "api"),
        ("outcome", "done"),
    ];
    expect_metrics(
        c_admin,
        &[
            ("ferry_upstream_connections_accepted_total", api, 2.0),
            ("ferry_upstream_sent_bytes_total", api, 1234.0),
            ("ferry_upstream_received_bytes_total", api, 1234.0),
            ("ferry_connections_closed_total", upstream_done, 2.0),
            ("ferry_upstream_instances", api, 1.0),
            ("ferry_upstream_instances", db, 2.0),
            ("ferry_upstream_connections_accepted_total", db, 0.0),
        ],
    )
    .await;

    // A denied peer.
    let mut denied = mesh_conn(server.inbound(), &billing).await;
    let got = round_trip(&mut denied, b"let me in").await;
    assert!(got.map_or(true, |b| b.is_empty()), "denied: no reply");
    expect_metrics(
        s_admin,
        &[("ferry_authz_decisions_total", &[("decision", "deny")], 1.0)],
    )
    .await;

    // A client certificate from a CA the roots do not include.
    let foreign = DevCa::generate(pki.trust_domain()).unwrap();
    let stranger = foreign
        .leaf("web", "dc1", Duration::from_secs(3600))
        .unwrap();
    let tcp = TcpStream::connect(server.inbound()).await.unwrap();
    if let Ok(mut t) = raw_client(Some(&stranger)).connect(any_name(), tcp).await {
        let got = round_trip(&mut t, b"x").await;
        assert!(got.map_or(true, |b| b.is_empty()), "untrusted: no reply");
    }
    expect_metrics(
        s_admin,
        &[(
            "ferry_inbound_handshake_failures_total",
            &[("reason", "untrusted")],
            1.0,
        )],
    )
    .await;

    // An upstream whose instances are all dead.
    let mut s = TcpStream::connect(client.upstream("db")).await.unwrap();
    let got = round_trip(&mut s, b"db?").await;
    assert!(
        got.map_or(true, |b| b.is_empty()),
        "dead upstream: no reply"
    );
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (s, text) = scrape(c_admin).await;
        let failures = sample(&s, "ferry_upstream_connect_failures_total", db);
        if failures.is_some_and(|v| v >= 1.0) {
            assert_eq!(
                sample(&s, "ferry_upstream_connect_failures_total", api),
                Some(0.0),
                "only db's failures move:\n{text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no db connect failure:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The leaf's expiry, then a rotation to a longer-lived leaf.
    let (not_after, _) = cert_facts(&api_leaf);
    let expiry = "ferry_leaf_expiry_timestamp_seconds";
    let rotations = "ferry_certificate_rotations_total";
    expect_metrics(
        s_admin,
        &[(expiry, &[], not_after as f64), (rotations, &[], 0.0)],
    )
    .await;
    let renewed = pki
        .ca
        .leaf("api", "dc1", Duration::from_secs(7200))
        .unwrap();
    let (renewed_after, _) = cert_facts(&renewed);
    assert!(renewed_after > not_after);
    server.running.rotate(credentials(&pki, &renewed, "api"));
    expect_metrics(
        s_admin,
        &[(expiry, &[], renewed_after as f64), (rotations, &[], 1.0)],
    )
    .await;

    // Every family that has series by now, as a scraper sees it. (A
    // labelled family with no series yet, e.g. handshake failures before
    // the first one, is left out of the exposition, as client_golang does.)
    let common = [
        "ferry_connections_closed",
        "ferry_leaf_expiry_timestamp_seconds",
        "ferry_certificate_rotations",
    ];
    let (s, text) = scrape(s_admin).await;
    for family in common.iter().chain(&[
        "ferry_inbound_connections_accepted",
        "ferry_inbound_connections_active",
        "ferry_inbound_handshake_failures",
        "ferry_authz_decisions",
        "ferry_connections_revoked",
        "ferry_local_connect_failures",
        "ferry_inbound_received_bytes",
        "ferry_inbound_sent_bytes",
    ]) {
        assert!(
            s.docs.contains_key(*family),
            "{family} on the server:\n{text}"
        );
    }
    let (s, text) = scrape(c_admin).await;
    for family in common.iter().chain(&[
        "ferry_upstream_connections_accepted",
        "ferry_upstream_connections_active",
        "ferry_upstream_connect_failures",
        "ferry_upstream_retries",
        "ferry_upstream_ejections",
        "ferry_upstream_unavailable",
        "ferry_upstream_sent_bytes",
        "ferry_upstream_received_bytes",
        "ferry_upstream_instances",
    ]) {
        assert!(
            s.docs.contains_key(*family),
            "{family} on the client:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. /ready, /live, /status.

/// With the agent holding the leaf, the admin port already answers: /ready
/// 503, /live 200, /status 503. Once the leaf is delivered /ready is 200 and
/// /status names the identity, the leaf's serial and notAfter, the
/// listeners and the discovered instances. During a drain with a live
/// connection /ready is 503 again (and /live still 200) until it finishes.
///
/// The admin port is picked by binding 127.0.0.1:0 and releasing it, since
/// `start` only returns the bound address once the certificates are in:
/// another process could take the port in between (then `start` fails with
/// a bind error, not a wrong pass).
#[tokio::test]
async fn ready_follows_certificates_and_drain() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = EchoServer::start().await;
    let api_leaf = pki.issue(&LeafSpec::consul(pki.uri("api"), Duration::from_secs(3600)));
    agent.set_leaf("api", &api_leaf);
    let db_instance = dead_addr().await;
    agent.set_instances("db", vec![Instance::sidecar(db_instance)]);
    agent.stall(LEAF_API, true);

    let admin = dead_addr().await;
    let (url, app_addr, admin_arg) = (agent.url(), app.addr_arg(), admin.to_string());
    let args = [
        "-http-addr",
        &url,
        "-service",
        "api",
        "-listen",
        "127.0.0.1:0",
        "-service-addr",
        &app_addr,
        "-upstream",
        "db:127.0.0.1:0",
        "-admin-addr",
        &admin_arg,
    ];
    let mut start = std::pin::pin!(Ferry::start(&args));
    // Drive `start` while probing the admin port: it must not return.
    let probe = async {
        agent.wait_for_call("GET", LEAF_API, DEADLINE).await;
        let deadline = Instant::now() + DEADLINE;
        let mut probed = false;
        while !probed {
            let http = http();
            if let Ok(r) = http.get(format!("http://{admin}/ready")).send().await {
                assert_eq!(r.status().as_u16(), 503, "/ready before the leaf");
                probed = true;
            }
            assert!(Instant::now() < deadline, "admin port never answered");
            if !probed {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        assert_eq!(get(admin, "/live").await.0, 200, "/live before the leaf");
        let (status, body) = get(admin, "/status").await;
        assert_eq!(status, 503, "/status before the leaf: {body}");
        assert_eq!(get(admin, "/ready").await.0, 503, "still not ready");
    };
    tokio::select! {
        _ = start.as_mut() => panic!("start returned while the leaf was held"),
        _ = probe => {}
    }

    agent.stall(LEAF_API, false);
    let ferry = within("start once the leaf arrives", start).await;
    assert_eq!(ferry.running.admin, Some(admin));
    assert_eq!(get(admin, "/ready").await, (200, "ready\n".to_string()));

    let (not_after, serial) = cert_facts(&api_leaf);
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        let (code, body) = get(admin, "/status").await;
        assert_eq!(code, 200, "/status: {body}");
        let v: Value = serde_json::from_str(&body).expect("/status is JSON");
        if v["upstreams"][0]["instances"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            break v;
        }
        assert!(Instant::now() < deadline, "no instances in /status: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status["service"], "api");
    assert_eq!(status["identity"], pki.uri("api"));
    assert_eq!(status["leaf"]["serial"], serial.as_str());
    assert_eq!(status["leaf"]["not_after_unix"], not_after);
    assert_eq!(status["inbound"], ferry.inbound().to_string());
    assert_eq!(status["upstreams"][0]["name"], "db");
    assert_eq!(
        status["upstreams"][0]["listen"],
        ferry.upstream("db").to_string()
    );
    assert_eq!(
        status["upstreams"][0]["instances"][0]["address"],
        db_instance.to_string()
    );

    // Drain with a live connection: not ready while it waits.
    let web = pki.leaf("web");
    let mut live = mesh_conn(ferry.inbound(), &web).await;
    echo_once(&mut live, b"before the drain").await;
    let mut shut = std::pin::pin!(ferry.running.shutdown(Duration::from_secs(10)));
    assert!(
        timeout(STILL_PENDING, shut.as_mut()).await.is_err(),
        "the drain waits for the live connection"
    );
    assert_eq!(get(admin, "/ready").await.0, 503, "/ready while draining");
    assert_eq!(get(admin, "/live").await.0, 200, "/live while draining");
    echo_once(&mut live, b"during the drain").await;
    finish(&mut live).await;
    assert!(within("drain", shut).await, "clean drain");
}

// ---------------------------------------------------------------------------
// 3. Drain, in-process.

/// During `shutdown(grace)` a live connection keeps echoing and finishes
/// normally, a new connection is refused or closed at once, the drain
/// waits for the live one, and `shutdown` returns true (clean) when it
/// finishes within the grace.
#[tokio::test]
async fn drain_lets_live_connections_finish() {
    let pki = Pki::new();
    pki.leaf("api");
    let web = pki.leaf("web");
    let app = EchoServer::start().await;
    let (dir, app_addr) = (pki.dir_arg(), app.addr_arg());
    let ferry = Ferry::start(&api_args(&dir, &app_addr, &[])).await;
    let addr = ferry.inbound();

    let mut live = mesh_conn(addr, &web).await;
    echo_once(&mut live, b"before").await;
    let mut shut = std::pin::pin!(ferry.running.shutdown(Duration::from_secs(10)));
    assert!(
        timeout(STILL_PENDING, shut.as_mut()).await.is_err(),
        "shutdown waits for the live connection"
    );
    new_connection_refused(addr, &web).await;
    echo_once(&mut live, b"during the drain").await;
    finish(&mut live).await;
    assert!(within("drain", shut).await, "clean drain");
    assert_eq!(
        app.counts.accepted(),
        1,
        "only the live connection reached the app"
    );
}

/// A connection that never finishes is closed by ferry once the grace
/// (300 ms) is over, and `shutdown` returns false, after about the grace.
#[tokio::test]
async fn drain_closes_what_outlives_the_grace() {
    let pki = Pki::new();
    pki.leaf("api");
    let web = pki.leaf("web");
    let app = EchoServer::start().await;
    let (dir, app_addr) = (pki.dir_arg(), app.addr_arg());
    let ferry = Ferry::start(&api_args(&dir, &app_addr, &[])).await;

    let mut live = mesh_conn(ferry.inbound(), &web).await;
    echo_once(&mut live, b"never done").await;
    let grace = Duration::from_millis(300);
    let t0 = Instant::now();
    let clean = within("shutdown", ferry.running.shutdown(grace)).await;
    let took = t0.elapsed();
    assert!(!clean, "the drain was not clean");
    assert!(
        took >= grace && took < grace + Duration::from_secs(3),
        "shutdown took {took:?} with a {grace:?} grace"
    );
    let mut buf = [0u8; 16];
    let r = within("ferry closes the connection", live.read(&mut buf)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "closed by ferry, got {r:?}");
}

// ---------------------------------------------------------------------------
// 4. The real binary and signals.

/// SIGTERM with a live connection: the binary stops being ready for new
/// work but keeps serving that connection, exits 0 once it finishes and
/// logs "drained cleanly".
#[tokio::test]
async fn sigterm_drains_then_exits_zero() {
    let pki = Pki::new();
    pki.leaf("api");
    let web = pki.leaf("web");
    let app = EchoServer::start().await;
    let (dir, app_addr) = (pki.dir_arg(), app.addr_arg());
    let mut ferry = FerryProcess::start(&api_args(&dir, &app_addr, &["-drain-timeout", "30s"]));
    let addr = ferry.listen_addr("inbound listener ready").await;

    let mut live = mesh_conn(addr, &web).await;
    echo_once(&mut live, b"before").await;
    ferry.signal("TERM");
    ferry.line("draining").await;
    echo_once(&mut live, b"during the drain").await;
    assert!(ferry.try_exit().is_none(), "still draining");
    closes_soon(addr).await;
    finish(&mut live).await;
    let status = ferry.exit_within(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "exit after a clean drain");
    ferry.line("drained cleanly").await;
}

/// A second signal (SIGINT after SIGTERM) ends the drain at once, well
/// before a 30 s drain timeout, with a connection still open.
///
/// The second signal is sent once "draining" is logged; the binary
/// subscribes to it microseconds after that line, so a (very unlikely) lost
/// signal would show up as a timeout here.
#[tokio::test]
async fn second_signal_exits_at_once() {
    let pki = Pki::new();
    pki.leaf("api");
    let web = pki.leaf("web");
    let app = EchoServer::start().await;
    let (dir, app_addr) = (pki.dir_arg(), app.addr_arg());
    let mut ferry = FerryProcess::start(&api_args(&dir, &app_addr, &["-drain-timeout", "30s"]));
    let addr = ferry.listen_addr("inbound listener ready").await;

    let mut live = mesh_conn(addr, &web).await;
    echo_once(&mut live, b"stays open").await;
    ferry.signal("TERM");
    ferry.line("draining").await;
    let t0 = Instant::now();
    ferry.signal("INT");
    let status = ferry.exit_within(Duration::from_secs(5)).await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
    ferry.line("second signal").await;
}

// ---------------------------------------------------------------------------
// 5. The access-log line.

/// Runs the binary with `extra` flags, makes one allowed echo (11 bytes)
/// and one denied connection, and returns every stderr line.
async fn access_log(extra: &[&str]) -> (Pki, Vec<String>) {
    let pki = Pki::new();
    pki.leaf("api");
    let web = pki.leaf("web");
    let billing = pki.leaf("billing");
    let app = EchoServer::start().await;
    let (dir, app_addr) = (pki.dir_arg(), app.addr_arg());
    let mut flags = vec!["-allow", "web", "-default-deny"];
    flags.extend_from_slice(extra);
    let mut ferry = FerryProcess::start(&api_args(&dir, &app_addr, &flags));
    let ready = ferry.line("inbound listener ready").await;
    let addr: SocketAddr = match serde_json::from_str::<Value>(&ready) {
        Ok(v) => v["listen"].as_str().expect("listen").parse().expect("addr"),
        Err(_) => ferry.listen_addr("inbound listener ready").await,
    };

    let mut ok = mesh_conn(addr, &web).await;
    assert_eq!(
        round_trip(&mut ok, b"hello, api!").await.expect("echo"),
        b"hello, api!"
    );
    let mut denied = mesh_conn(addr, &billing).await;
    let got = round_trip(&mut denied, b"no").await;
    assert!(got.map_or(true, |b| b.is_empty()));
    ferry.line("connection closed").await;
    ferry.line("connection denied").await;
    (pki, ferry.stop())
}

/// Text logs: the closed and the denied line each carry every field.
#[tokio::test]
async fn access_log_line_has_every_field() {
    let (pki, lines) = access_log(&[]).await;
    for msg in ["connection closed", "connection denied"] {
        let line = lines.iter().find(|l| l.contains(msg)).expect(msg);
        for field in LOG_FIELDS {
            assert!(
                line.contains(&format!(" {field}=")),
                "{msg}: no {field}= in\n{line}"
            );
        }
    }
    let closed = lines
        .iter()
        .find(|l| l.contains("connection closed"))
        .unwrap();
    for want in [
        "direction=\"inbound\"".to_string(),
        format!("source=\"{}\"", pki.uri("web")),
        "bytes_in=11".into(),
        "bytes_out=11".into(),
        "attempts=".into(),
    ] {
        assert!(closed.contains(&want), "no {want:?} in\n{closed}");
    }
}

/// `-log-json`: every stderr line is a JSON object, and the closed and
/// denied lines have every field at the top level.
#[tokio::test]
async fn json_access_log_line_has_every_field() {
    let (pki, lines) = access_log(&["-log-json"]).await;
    // Every line of the run, not only the access lines, is strict JSON.
    let parsed: Vec<Value> = lines.iter().map(|l| strict_json(l)).collect();
    assert!(parsed.iter().all(Value::is_object));
    for msg in ["connection closed", "connection denied"] {
        let v = parsed
            .iter()
            .find(|v| v["message"] == msg)
            .unwrap_or_else(|| panic!("no {msg:?} line in {lines:#?}"));
        for field in LOG_FIELDS {
            assert!(v.get(field).is_some(), "{msg}: no {field} in {v}");
        }
        assert_eq!(v["direction"], "inbound", "{v}");
        assert_eq!(v["service"], "api", "{v}");
        assert_eq!(v["destination"], pki.uri("api"), "{v}");
    }
    let closed = parsed
        .iter()
        .find(|v| v["message"] == "connection closed")
        .unwrap();
    assert_eq!(closed["source"], pki.uri("web"));
    assert_eq!(closed["bytes_in"], 11);
    assert_eq!(closed["bytes_out"], 11);
    assert_eq!(closed["phase"], "splice");
    let denied = parsed
        .iter()
        .find(|v| v["message"] == "connection denied")
        .unwrap();
    assert_eq!(denied["source"], pki.uri("billing"));
    assert_eq!(denied["phase"], "authorize");
    assert_eq!(denied["outcome"], "denied");
    assert_eq!(closed["outcome"], "done");
    assert_eq!(closed["detail"], "closed");
    assert_eq!(
        closed["target"], "ferry::access",
        "the logger's target is its own"
    );

    // Every access line, whatever its outcome, has each documented key
    // with its documented type.
    let access: Vec<&Value> = parsed
        .iter()
        .filter(|v| v["target"] == "ferry::access")
        .collect();
    assert!(access.len() >= 2, "{lines:#?}");
    for v in access {
        for (key, kind) in LOG_SCHEMA {
            let f = &v[key];
            let ok = match kind {
                Kind::Text => f.is_string(),
                Kind::Count => f.is_u64(),
                Kind::Millis => f.is_f64() || f.is_u64(),
            };
            assert!(ok, "{key} should be {kind:?}, is {f} in {v}");
        }
        let outcome = v["outcome"].as_str().unwrap();
        assert!(OUTCOMES.contains(&outcome), "outcome {outcome:?} in {v}");
        assert!(v["duration_ms"].as_f64().unwrap() >= 0.0);
    }
}

// ---------------------------------------------------------------------------
// 6. The TTL check and the leaf's lifetime.

/// A `-register`ed ferry whose leaf is past 90 % of its lifetime (300 s,
/// 20 s left) and not renewed sets its TTL check to warning, with a note
/// about renewal; a fresh leaf from the agent brings it back to passing.
/// (Critical at expiry cannot be reached here — ferry refuses an expired
/// leaf at load — and is covered by the unit test in src/register.rs.)
#[tokio::test]
async fn ttl_check_warns_when_the_leaf_is_not_renewed() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = EchoServer::start().await;
    let now = time::OffsetDateTime::now_utc();
    let old = pki.issue(&LeafSpec {
        uris: vec![pki.uri("web")],
        not_before: now - time::Duration::seconds(280),
        not_after: now + time::Duration::seconds(20),
        is_ca: false,
    });
    agent.set_leaf("web", &old);
    let (url, app_addr) = (agent.url(), app.addr_arg());
    let _ferry = Ferry::start(&[
        "-service",
        "web",
        "-listen",
        "127.0.0.1:0",
        "-service-addr",
        &app_addr,
        "-register",
        "-http-addr",
        &url,
    ])
    .await;
    let check = || agent.check("web-proxy-ttl").expect("TTL check");
    eventually("the TTL check turns warning", || {
        check().status == "warning"
    })
    .await;
    let c = check();
    assert!(
        c.output.contains("has not been renewed"),
        "note: {:?}",
        c.output
    );

    let fresh = pki.issue(&LeafSpec::consul(pki.uri("web"), Duration::from_secs(3600)));
    agent.set_leaf("web", &fresh);
    eventually("the TTL check is passing again", || {
        check().status == "passing"
    })
    .await;
    assert_eq!(check().output, "ferry is serving");
}
