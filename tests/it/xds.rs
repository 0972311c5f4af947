//! xDS mode: ferry configured by a Delta ADS server in Consul's manner
//! (support/ads.rs), with real sockets and real TLS. In order: the default
//! sidecar through the binary, intentions as RBAC, upstreams over EDS with
//! TLS, certificate rotation, refusals and stream faults, failover and
//! limits, Unix sockets for upstream listeners and the local app.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::Any;
use ferry::control::xds::bootstrap::Bootstrap;
use ferry::control::xds::Backoff;
use ferry::identity::dev_ca::Leaf;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::support::ads::{self, Ads, ClusterOpts, Intentions, Tls, CDS, EDS, LDS, SDS};
use crate::support::{
    assert_echo, dead_addr, echo_once, echo_unix, eventually, is_socket, mesh_conn, mesh_echo,
    plain_echo, refused, socket_mode, unix_echo, until, within, EchoServer, FerryProcess, MeshConn,
    Pki, TlsEchoServer,
};

/// A sidecar for `web` fed by an ADS server, plus the pieces to change it.
struct Sidecar {
    pki: Pki,
    ads: Ads,
    _app: EchoServer,
    public: SocketAddr,
    web: Leaf,
    _dir: tempfile::TempDir,
    bootstrap: PathBuf,
}

impl Sidecar {
    /// The default sidecar's resources (`clusters/defaults.latest.golden`,
    /// `listeners/defaults.latest.golden`) with inline certificates.
    async fn new(i: Intentions) -> Sidecar {
        let pki = Pki::new();
        let web = pki.leaf("web");
        let ads = Ads::start().await;
        let app = EchoServer::start().await;
        let public = dead_addr().await;
        ads.set(CDS, "local_app", ads::local_app(app.addr));
        let s = Sidecar {
            _dir: tempfile::tempdir().expect("tempdir"),
            bootstrap: PathBuf::new(),
            pki,
            ads,
            _app: app,
            public,
            web,
        };
        s.set_public(&s.inline(&s.web), &i);
        let mut s = s;
        s.bootstrap = s._dir.path().join("envoy_bootstrap.json");
        let boot = ads::bootstrap(s.ads.addr, "web", "a-secret-token");
        std::fs::write(&s.bootstrap, boot.to_string()).expect("write bootstrap");
        s
    }

    fn inline(&self, leaf: &Leaf) -> Tls {
        Tls::Inline {
            leaf: leaf.clone(),
            roots: self.pki.ca.cert_pem().to_string(),
        }
    }

    fn set_public(&self, tls: &Tls, i: &Intentions) {
        let (name, l) = ads::public_listener(self.public, tls, self.pki.trust_domain(), i);
        self.ads.set(LDS, &name, l);
    }

    /// Starts ferry in-process as `ferry envoy -c <bootstrap>` would.
    async fn start(&self) -> ferry::Running {
        ads::start_ferry(&self.bootstrap).await
    }

    fn uri(&self, svc: &str) -> String {
        self.pki.uri(svc)
    }

    fn sni(&self, svc: &str) -> String {
        crate::support::envoy::sni(svc, "dc1", self.pki.trust_domain())
    }
}

#[tokio::test]
async fn default_sidecar_through_the_binary_serves_the_public_listener_and_acks() {
    let s = Sidecar::new(Intentions::DefaultDeny(vec!["api".into()])).await;
    let path = s.bootstrap.display().to_string();
    // Nomad's own sidecar arguments.
    let mut ferry = FerryProcess::start(&[
        "envoy",
        "-c",
        &path,
        "-l",
        "info",
        "--concurrency",
        "1",
        "--disable-hot-restart",
    ]);
    ferry.line("inbound listener ready").await;
    let api = s.pki.leaf("api");
    let mut c = mesh_conn(s.public, &api).await;
    echo_once(&mut c, b"through the xDS-configured sidecar").await;
    assert!(
        s.ads.acks(CDS) >= 1 && s.ads.acks(LDS) >= 1,
        "{:?}",
        s.ads.replies()
    );
    assert!(
        s.ads.replies().iter().all(|r| r.error.is_none()),
        "{:?}",
        s.ads.replies()
    );
    ferry
        .line("envoy flag --disable-hot-restart is ignored")
        .await;
    let lines = ferry.stop();
    assert!(
        !lines.iter().any(|l| l.contains("a-secret-token")),
        "the token is never logged"
    );
}

/// What answers on the agent's port when the agent is gone: something
/// that is not HTTP/2 at all, counting the connections it gets.
async fn garbage_on(addr: SocketAddr) -> (tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
    let listener = within("the agent's port to be free", async {
        loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => return l,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            use tokio::io::AsyncWriteExt;
            let _ = c
                .write_all(b"HTTP/1.0 500 nope\r\n\r\n\x00\xff\xfe garbage")
                .await;
        }
    });
    (task, accepted)
}

#[tokio::test]
async fn garbage_on_the_agents_socket_keeps_the_last_good_state_and_logs_the_outage_once() {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let path = s.bootstrap.display().to_string();
    let mut ferry = FerryProcess::start(&["envoy", "-c", &path, "-l", "info"]);
    ferry.line("inbound listener ready").await;
    let api = s.pki.leaf("api");
    let mut held = mesh_conn(s.public, &api).await;
    echo_once(&mut held, b"before the agent goes").await;

    s.ads.stop().await;
    let (garbage, accepted) = garbage_on(s.ads.addr).await;
    eventually("ferry to retry against the garbage three times", || {
        accepted.load(Ordering::SeqCst) >= 3
    })
    .await;
    echo_once(&mut held, b"an open connection carries on").await;
    assert!(
        !refused(&mesh_echo(s.public, &api).await),
        "new connections are served on the last good state"
    );

    garbage.abort();
    let _ = garbage.await;
    s.ads.restart().await;
    // ferry resumes with the versions it holds, so the server has nothing
    // to send until something changes; the stream counts as open again at
    // its first response.
    s.set_public(
        &s.inline(&s.web),
        &Intentions::DefaultAllow(vec!["api".into()]),
    );
    until("a change after the agent is back applies", || async {
        refused(&mesh_echo(s.public, &api).await)
    })
    .await;
    ferry.line("xDS stream open again").await;
    let attempts = accepted.load(Ordering::SeqCst);
    let lines = ferry.stop();
    let down: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("xDS stream down"))
        .collect();
    // One outage, one warning, however many attempts met the garbage.
    assert_eq!(down.len(), 1, "{attempts} attempts: {down:#?}");
    let up = lines
        .iter()
        .filter(|l| l.contains("xDS stream open again"))
        .count();
    assert_eq!(up, 1, "{lines:#?}");
    let back = ferry_line(&lines, "xDS stream open again");
    // The agent's closing, then the garbage (tonic may dial more than once
    // per failed stream, so attempts and failures need not match).
    let failures: usize = field(back, "failures").parse().expect("failures=N");
    assert!(failures >= 2, "{back}: the failures of the outage counted");
}

fn ferry_line<'a>(lines: &'a [String], needle: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.contains(needle))
        .map(String::as_str)
        .unwrap_or_default()
}

/// The value of `name=` in a text log line.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split(&format!(" {name}="))
        .nth(1)
        .and_then(|v| v.split(' ').next())
        .unwrap_or_default()
}

#[test]
fn an_unknown_envoy_flag_is_a_usage_error_naming_it() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["envoy", "-c", "/nonexistent.json", "--hot-sauce", "1"])
        .output()
        .expect("run ferry");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--hot-sauce"), "{err}");
}

#[test]
fn ferry_envoy_runs_the_xds_binary_and_says_so_when_it_is_missing() {
    // Beside ferry (as cargo builds them): the same flag check answers.
    assert!(
        std::path::Path::new(env!("CARGO_BIN_EXE_ferry-envoy")).is_file(),
        "cargo builds ferry-envoy beside ferry"
    );
    // A ferry alone in a directory, with nothing on PATH.
    let dir = tempfile::tempdir().expect("tempdir");
    let alone = dir.path().join("ferry");
    std::fs::copy(env!("CARGO_BIN_EXE_ferry"), &alone).expect("copy ferry");
    let out = std::process::Command::new(&alone)
        .args(["envoy", "-c", "/nonexistent.json"])
        .env("PATH", dir.path().join("empty"))
        .output()
        .expect("run ferry");
    assert_eq!(out.status.code(), Some(127), "not found: the shell's code");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ferry-envoy") && err.contains("xds"),
        "names the missing binary and the feature: {err}"
    );
}

#[tokio::test]
async fn intentions_as_rbac_allow_deny_and_default_deny() {
    let s = Sidecar::new(Intentions::DefaultDeny(Vec::new())).await;
    let ferry = s.start().await;
    let addr = ferry.inbound.expect("public listener");
    assert_eq!(addr, s.public);
    let api = s.pki.leaf("api");
    let evil = s.pki.leaf("evil");
    assert!(
        refused(&mesh_echo(addr, &api).await),
        "rules {{}}: nobody passes"
    );

    s.set_public(
        &s.inline(&s.web),
        &Intentions::DefaultDeny(vec!["api".into()]),
    );
    until("api allowed", || async {
        !refused(&mesh_echo(addr, &api).await)
    })
    .await;
    assert!(
        refused(&mesh_echo(addr, &evil).await),
        "default deny: evil refused"
    );

    s.set_public(
        &s.inline(&s.web),
        &Intentions::DefaultAllow(vec!["evil".into()]),
    );
    until("evil denied, api still allowed", || async {
        !refused(&mesh_echo(addr, &api).await) && refused(&mesh_echo(addr, &evil).await)
    })
    .await;
    let other = s.pki.leaf("other");
    assert!(
        !refused(&mesh_echo(addr, &other).await),
        "default allow: others pass"
    );
}

#[tokio::test]
async fn an_rbac_change_closes_only_the_connections_it_now_denies() {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let ferry = s.start().await;
    let addr = ferry.inbound.expect("public listener");
    let api = s.pki.leaf("api");
    let evil = s.pki.leaf("evil");
    let mut keep = mesh_conn(addr, &api).await;
    echo_once(&mut keep, b"api before").await;
    let mut doomed = mesh_conn(addr, &evil).await;
    echo_once(&mut doomed, b"evil before").await;

    s.set_public(
        &s.inline(&s.web),
        &Intentions::DefaultAllow(vec!["evil".into()]),
    );
    let mut buf = [0u8; 16];
    let n = within("the denied connection to close", doomed.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "evil's open connection is closed: {n:?}"
    );
    echo_once(&mut keep, b"api after").await;
    assert!(refused(&mesh_echo(addr, &evil).await));
}

const DB_CLUSTER: &str = "db.default.dc1.internal.test";

/// Adds upstream `db` on a free port → `cluster` with `hosts`; returns the bind.
/// `DB_CLUSTER` in Consul's shape (SNI for `sni_svc`, SAN of `san_svc`)
/// with endpoints `hosts`.
fn set_db(
    s: &Sidecar,
    sni_svc: &str,
    san_svc: &str,
    opts: &ClusterOpts,
    hosts: &[(u32, SocketAddr, i32)],
) {
    s.ads.set(
        CDS,
        DB_CLUSTER,
        ads::eds_cluster(
            DB_CLUSTER,
            &s.sni(sni_svc),
            &[s.uri(san_svc)],
            &s.inline(&s.web),
            opts,
        ),
    );
    s.ads.set(EDS, DB_CLUSTER, ads::cla(DB_CLUSTER, hosts));
}

/// [`set_db`] behind upstream listener `db` on a free port, its address.
async fn add_db(
    s: &Sidecar,
    sni_svc: &str,
    san_svc: &str,
    opts: &ClusterOpts,
    hosts: &[(u32, SocketAddr, i32)],
) -> SocketAddr {
    let bind = dead_addr().await;
    set_db(s, sni_svc, san_svc, opts, hosts);
    let (name, l) = ads::upstream_listener("db", bind, DB_CLUSTER);
    s.ads.set(LDS, &name, l);
    bind
}

/// Upstream `db` with one healthy instance, db itself: the instance and
/// the upstream listener's address.
async fn one_db(s: &Sidecar) -> (TlsEchoServer, SocketAddr) {
    let db = TlsEchoServer::start(&s.pki, &s.pki.leaf("db")).await;
    let hosts = [(0, db.addr, ads::HEALTHY)];
    let bind = add_db(s, "db", "db", &ClusterOpts::default(), &hosts).await;
    (db, bind)
}

#[tokio::test]
async fn upstream_over_eds_sends_the_sni_checks_the_identity_and_endpoint_changes_hit_new_connections_only(
) {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let db = s.pki.leaf("db");
    let one = TlsEchoServer::start(&s.pki, &db).await;
    let two = TlsEchoServer::start(&s.pki, &db).await;
    let bind = add_db(
        &s,
        "db",
        "db",
        &ClusterOpts::default(),
        &[(0, one.addr, ads::HEALTHY)],
    )
    .await;
    let ferry = s.start().await;
    assert_eq!(ferry.upstream("db"), Some(bind));
    assert_echo(bind, b"to db over EDS").await;
    assert_eq!(one.first_sni().as_deref(), Some(s.sni("db").as_str()));

    // A held connection stays on instance one when the endpoints change.
    let mut held = TcpStream::connect(bind).await.expect("connect");
    echo_once(&mut held, b"held").await;
    s.ads.set(
        EDS,
        DB_CLUSTER,
        ads::cla(DB_CLUSTER, &[(0, two.addr, ads::HEALTHY)]),
    );
    until("new connections reach instance two", || async {
        assert_echo(bind, b"new").await;
        two.handshakes() > 0
    })
    .await;
    echo_once(&mut held, b"still held").await;

    // The cluster's SAN matcher names another service: db's cert is refused.
    let one_host = [(0, two.addr, ads::HEALTHY)];
    set_db(&s, "db", "payments", &ClusterOpts::default(), &one_host);
    until("a wrong server identity is refused", || async {
        refused(&plain_echo(bind).await)
    })
    .await;
}

#[tokio::test]
async fn a_new_inline_certificate_serves_new_handshakes_while_open_connections_continue() {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let ferry = s.start().await;
    let addr = ferry.inbound.expect("public");
    let api = s.pki.leaf("api");
    let mut held = mesh_conn(addr, &api).await;
    echo_once(&mut held, b"before").await;
    let old_serial = serial(&held);
    let new_web = s.pki.leaf("web");
    s.set_public(&s.inline(&new_web), &Intentions::DefaultAllow(Vec::new()));
    until("new handshakes present the new leaf", || async {
        let c = mesh_conn(addr, &api).await;
        serial(&c) != old_serial
    })
    .await;
    echo_once(&mut held, b"after").await;
}

fn serial(c: &MeshConn) -> String {
    let cert = c.get_ref().1.peer_certificates().expect("peer certs")[0].clone();
    ferry::identity::peer_identity(&cert)
        .expect("identity")
        .serial
}

#[tokio::test]
async fn sds_connect_leaf_and_root_are_waited_for_and_rotate_without_dropping_connections() {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    s.set_public(&Tls::Sds, &Intentions::DefaultAllow(Vec::new()));
    let start = s.start();
    // Until both secrets arrive the listener warms: start waits.
    let ads = s.ads.clone();
    let roots = s.pki.ca.cert_pem().to_string();
    let web = s.web.clone();
    let feeder = async move {
        ads.reply("the first LDS ACK", |r| {
            r.type_url == LDS && r.error.is_none()
        })
        .await;
        ads.set(SDS, "connect-root", ads::root_secret(&roots));
        ads.set(SDS, "connect-leaf", ads::leaf_secret(&web));
    };
    let (ferry, ()) = tokio::join!(start, feeder);
    let addr = ferry.inbound.expect("public");
    let api = s.pki.leaf("api");
    let mut held = mesh_conn(addr, &api).await;
    echo_once(&mut held, b"over SDS certs").await;
    let old = serial(&held);
    s.ads
        .set(SDS, "connect-leaf", ads::leaf_secret(&s.pki.leaf("web")));
    until("new handshakes use the rotated SDS leaf", || async {
        serial(&mesh_conn(addr, &api).await) != old
    })
    .await;
    echo_once(&mut held, b"held across rotation").await;
    assert!(s.ads.acks(SDS) >= 2);
}

#[tokio::test]
async fn a_bad_resource_is_nacked_with_a_reason_and_the_last_good_state_serves() {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let ferry = s.start().await;
    let addr = ferry.inbound.expect("public");
    let api = s.pki.leaf("api");
    // An HTTP listener (L7) beside the public one.
    let hcm = Any {
        type_url: "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager".into(),
        value: Vec::new(),
    };
    let (_, l) = ads::upstream_listener("web-http", dead_addr().await, "local_app");
    let mut bad: envoy_types::pb::envoy::config::listener::v3::Listener =
        prost::Message::decode(l.value.as_slice()).unwrap();
    bad.filter_chains[0].filters[0].config_type =
        Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(hcm));
    s.ads.set(LDS, "web-http:127.0.0.1:1", ads::any(&bad));
    let nack = s.ads.reply("a NACK", |r| r.error.is_some()).await;
    assert_eq!(nack.type_url, LDS);
    assert!(
        nack.error
            .as_deref()
            .unwrap()
            .contains("http_connection_manager"),
        "{nack:?}"
    );
    assert!(!nack.nonce.is_empty());
    let mut c = mesh_conn(addr, &api).await;
    echo_once(&mut c, b"last good state").await;

    // Garbage of an unknown type: NACKed, still serving.
    s.ads.send_raw(DeltaDiscoveryResponse {
        type_url: "type.googleapis.com/made.up.Thing".into(),
        resources: vec![Resource {
            name: "x".into(),
            resource: Some(Any {
                type_url: "type.googleapis.com/made.up.Thing".into(),
                value: vec![0xff, 0x00, 0x13],
            }),
            ..Default::default()
        }],
        ..Default::default()
    });
    s.ads
        .reply("a NACK of the unknown type", |r| {
            r.type_url.contains("made.up")
        })
        .await;
    // Undecodable bytes under a known type: NACKed too.
    s.ads.set(
        CDS,
        "junk",
        Any {
            type_url: ads::CDS.into(),
            value: vec![0xff; 7],
        },
    );
    s.ads
        .reply("a NACK of undecodable bytes", |r| {
            r.type_url == CDS && r.error.is_some()
        })
        .await;
    echo_once(&mut c, b"still serving").await;
    // A listener whose leaf names another service: the certificates do not
    // validate for `web`, so the listener is refused whole.
    let before = s.ads.replies().iter().filter(|r| r.error.is_some()).count();
    s.ads.remove(LDS, "web-http:127.0.0.1:1");
    let evil = s.pki.leaf("evil");
    s.set_public(&s.inline(&evil), &Intentions::DefaultAllow(Vec::new()));
    eventually("a NACK of the certificates", || {
        s.ads.replies().iter().filter(|r| r.error.is_some()).count() > before
            && s.ads.replies().iter().any(|r| {
                r.error
                    .as_deref()
                    .is_some_and(|e| e.contains("certificates"))
            })
    })
    .await;
    let fresh = mesh_conn(addr, &api).await;
    assert_eq!(serial(&fresh), serial(&c), "still the last good leaf");
    assert!(!refused(&mesh_echo(addr, &api).await));
    // Each answer is counted by type and result.
    let text = ferry.metrics.render();
    for series in [
        r#"ferry_xds_updates_total{resource="listener",result="nack"}"#,
        r#"ferry_xds_updates_total{resource="unknown",result="nack"}"#,
        r#"ferry_xds_updates_total{resource="cluster",result="nack"}"#,
        r#"ferry_xds_updates_total{resource="cluster",result="ack"}"#,
    ] {
        assert!(text.contains(series), "{series} in\n{text}");
    }
}

#[tokio::test]
async fn after_an_agent_restart_ferry_reconnects_resumes_with_versions_and_applies_changes() {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let ferry = s.start().await;
    let addr = ferry.inbound.expect("public");
    let api = s.pki.leaf("api");
    let mut held = mesh_conn(addr, &api).await;
    echo_once(&mut held, b"before restart").await;
    s.ads.stall(true);
    s.ads.restart().await;
    echo_once(&mut held, b"while the agent is away").await;
    assert!(
        !refused(&mesh_echo(addr, &api).await),
        "serving while the stream is down"
    );
    s.ads.stall(false);
    eventually("a resumed CDS request", || {
        s.ads
            .resumed()
            .iter()
            .any(|(t, v)| t == CDS && v.contains_key("local_app"))
    })
    .await;
    s.set_public(
        &s.inline(&s.web),
        &Intentions::DefaultAllow(vec!["api".into()]),
    );
    until("a change after the restart applies", || async {
        refused(&mesh_echo(addr, &api).await)
    })
    .await;
    let mut buf = [0u8; 4];
    let n = within("the held connection to close", held.read(&mut buf)).await;
    assert!(matches!(n, Ok(0) | Err(_)));
    let m = &ferry.metrics;
    assert!(
        m.xds_stream_failures.get() >= 1,
        "the restart ended a stream"
    );
    assert_eq!(m.xds_connected.get(), 1, "delivering again");
    assert!(m.render().contains("ferry_xds_connected 1"));
}

#[tokio::test]
async fn failover_to_a_lower_priority_when_the_first_has_no_healthy_hosts() {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let db = s.pki.leaf("db");
    let dc1 = TlsEchoServer::start(&s.pki, &db).await;
    let dc2 = TlsEchoServer::start(&s.pki, &db).await;
    let bind = add_db(
        &s,
        "db",
        "db",
        &ClusterOpts::default(),
        &[(0, dc1.addr, ads::UNHEALTHY), (1, dc2.addr, ads::HEALTHY)],
    )
    .await;
    let _ferry = s.start().await;
    assert_echo(bind, b"to the second datacenter").await;
    assert_eq!((dc1.handshakes(), dc2.handshakes()), (0, 1));
    s.ads.set(
        EDS,
        DB_CLUSTER,
        ads::cla(
            DB_CLUSTER,
            &[(0, dc1.addr, ads::HEALTHY), (1, dc2.addr, ads::HEALTHY)],
        ),
    );
    until("back to priority 0 once healthy", || async {
        assert_echo(bind, b"back").await;
        dc1.handshakes() > 0
    })
    .await;
}

#[tokio::test]
async fn aggregate_failover_legs_use_their_own_sni_and_identity() {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let db = s.pki.leaf("db");
    let remote = TlsEchoServer::start(&s.pki, &db).await;
    let primary = "db.default.dc1.internal.test";
    let legs = ads::failover_legs(primary);
    let dc2_sni = format!("db.default.dc2.internal.{}", s.pki.trust_domain());
    s.ads
        .set(CDS, primary, ads::aggregate_cluster(primary, &legs));
    s.ads.set(
        CDS,
        &legs[0],
        ads::eds_cluster(
            &legs[0],
            &s.sni("db"),
            &[s.uri("db")],
            &s.inline(&s.web),
            &ClusterOpts::default(),
        ),
    );
    s.ads.set(
        CDS,
        &legs[1],
        ads::eds_cluster(
            &legs[1],
            &dc2_sni,
            &[s.uri("db")],
            &s.inline(&s.web),
            &ClusterOpts::default(),
        ),
    );
    s.ads.set(EDS, &legs[0], ads::cla(&legs[0], &[]));
    // The second leg's endpoints are a mesh gateway that routes by SNI;
    // here the server itself stands in for it.
    s.ads.set(
        EDS,
        &legs[1],
        ads::cla(&legs[1], &[(0, remote.addr, ads::HEALTHY)]),
    );
    let bind = dead_addr().await;
    let (name, l) = ads::upstream_listener("db", bind, primary);
    s.ads.set(LDS, &name, l);
    let _ferry = s.start().await;
    assert_echo(bind, b"via the failover leg").await;
    assert_eq!(remote.first_sni().as_deref(), Some(dc2_sni.as_str()));
}

#[tokio::test]
async fn circuit_breaker_max_connections_caps_an_upstream() {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let db = s.pki.leaf("db");
    let one = TlsEchoServer::start(&s.pki, &db).await;
    let opts = ClusterOpts {
        max_connections: Some(1),
        outlier: Some((3, Duration::from_secs(30))),
        ..Default::default()
    };
    let bind = add_db(&s, "db", "db", &opts, &[(0, one.addr, ads::HEALTHY)]).await;
    let _ferry = s.start().await;
    let mut first = TcpStream::connect(bind).await.expect("connect");
    echo_once(&mut first, b"the one allowed").await;
    assert!(
        refused(&plain_echo(bind).await),
        "a second concurrent connection is refused"
    );
    drop(first);
    until("a slot frees up", || async {
        !refused(&plain_echo(bind).await)
    })
    .await;
}

#[tokio::test]
async fn a_prepared_query_upstream_accepts_any_datacenter_its_cluster_names() {
    // `clusters/connect-proxy-with-prepared-query*`-style: one SAN per
    // datacenter the query may answer from; the endpoints span both.
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let dc2_leaf = s.pki.leaf_in("geo-db", "dc2");
    let dc2 = TlsEchoServer::start(&s.pki, &dc2_leaf).await;
    let cluster = format!("geo-db.default.dc1.query.{}", s.pki.trust_domain());
    let sans = [
        s.pki.ca.spiffe_uri("dc1", "geo-db"),
        s.pki.ca.spiffe_uri("dc2", "geo-db"),
    ];
    s.ads.set(
        CDS,
        &cluster,
        ads::eds_cluster(
            &cluster,
            &cluster,
            &sans,
            &s.inline(&s.web),
            &ClusterOpts::default(),
        ),
    );
    s.ads.set(
        EDS,
        &cluster,
        ads::cla(&cluster, &[(0, dc2.addr, ads::HEALTHY)]),
    );
    let bind = dead_addr().await;
    let (name, l) = ads::upstream_listener("prepared_query:geo-db", bind, &cluster);
    s.ads.set(LDS, &name, l);
    let ferry = s.start().await;
    assert_eq!(ferry.upstream("prepared_query:geo-db"), Some(bind));
    assert_echo(bind, b"answered from dc2").await;
    assert_eq!(dc2.first_sni().as_deref(), Some(cluster.as_str()));
}

#[tokio::test]
async fn outlier_detection_ejects_a_failing_instance() {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let db = s.pki.leaf("db");
    let good = TlsEchoServer::start(&s.pki, &db).await;
    let dead = dead_addr().await;
    let opts = ClusterOpts {
        max_connections: None,
        outlier: Some((1, Duration::from_secs(60))),
        ..Default::default()
    };
    let hosts = [(0, dead, ads::HEALTHY), (0, good.addr, ads::HEALTHY)];
    let bind = add_db(&s, "db", "db", &opts, &hosts).await;
    let ferry = s.start().await;
    for _ in 0..2 {
        assert_echo(bind, b"past the dead one").await;
    }
    let states = ferry.instances("db").expect("db");
    let d = states
        .iter()
        .find(|i| i.addr == dead)
        .expect("dead instance");
    assert!(
        d.ejected,
        "one failure ejects (consecutive_5xx 1): {states:?}"
    );
}

/// Before Consul's health checks notice a datacenter is gone, outlier
/// detection does: once priority 0's instance is ejected, priority 1
/// serves; when the ejection expires, priority 0 is tried again.
#[tokio::test]
async fn an_ejected_priority_hands_over_to_the_next_until_its_ejection_expires() {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let db = s.pki.leaf("db");
    let dc2 = TlsEchoServer::start(&s.pki, &db).await;
    // Healthy in the catalog, but nothing listens.
    let dead = dead_addr().await;
    let opts = ClusterOpts {
        outlier: Some((2, Duration::from_millis(400))),
        ..ClusterOpts::default()
    };
    let hosts = [(0, dead, ads::HEALTHY), (1, dc2.addr, ads::HEALTHY)];
    let bind = add_db(&s, "db", "db", &opts, &hosts).await;
    let ferry = s.start().await;
    // Retries stay in priority 0 (Envoy's priority load with Consul's
    // settings): the two failures consecutive_5xx counts are refused.
    for n in 1..=2 {
        assert!(refused(&plain_echo(bind).await), "failure {n} of 2");
    }
    assert_echo(bind, b"priority 1 once priority 0 is ejected").await;
    assert_eq!(dc2.handshakes(), 1);
    let dead_state = || {
        ferry
            .instances("db")
            .expect("db")
            .into_iter()
            .find(|i| i.addr == dead)
            .expect("the dead instance")
    };
    assert!(dead_state().ejected);
    eventually("the ejection to expire", || !dead_state().ejected).await;
    assert!(
        refused(&plain_echo(bind).await),
        "priority 0 is tried again (and fails: ejected at once)"
    );
    assert!(dead_state().ejected);
    assert_echo(bind, b"priority 1 again").await;
}

#[tokio::test]
async fn an_ejected_aggregate_leg_hands_over_with_the_next_legs_sni_and_identity() {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let dc2_leaf = s.pki.leaf_in("db", "dc2");
    let remote = TlsEchoServer::start(&s.pki, &dc2_leaf).await;
    let dead = dead_addr().await;
    let legs = ads::failover_legs(DB_CLUSTER);
    let dc2_sni = crate::support::envoy::sni("db", "dc2", s.pki.trust_domain());
    let opts = ClusterOpts {
        outlier: Some((1, Duration::from_secs(60))),
        ..ClusterOpts::default()
    };
    s.ads
        .set(CDS, DB_CLUSTER, ads::aggregate_cluster(DB_CLUSTER, &legs));
    let leg_sans = [
        vec![s.pki.ca.spiffe_uri("dc1", "db")],
        vec![s.pki.ca.spiffe_uri("dc2", "db")],
    ];
    for (leg, (sni, sans)) in legs
        .iter()
        .zip([(s.sni("db"), &leg_sans[0]), (dc2_sni.clone(), &leg_sans[1])])
    {
        s.ads.set(
            CDS,
            leg,
            ads::eds_cluster(leg, &sni, sans, &s.inline(&s.web), &opts),
        );
    }
    s.ads.set(
        EDS,
        &legs[0],
        ads::cla(&legs[0], &[(0, dead, ads::HEALTHY)]),
    );
    s.ads.set(
        EDS,
        &legs[1],
        ads::cla(&legs[1], &[(0, remote.addr, ads::HEALTHY)]),
    );
    let bind = dead_addr().await;
    let (name, l) = ads::upstream_listener("db", bind, DB_CLUSTER);
    s.ads.set(LDS, &name, l);
    let _ferry = s.start().await;
    assert!(
        refused(&plain_echo(bind).await),
        "leg 0 first, and it fails"
    );
    assert_echo(bind, b"leg 1 once leg 0 is ejected").await;
    assert_eq!(remote.first_sni().as_deref(), Some(dc2_sni.as_str()));

    // Leg 1 still checks its own identity: a dc1 server there is refused.
    let dc1 = TlsEchoServer::start(&s.pki, &s.pki.leaf("db")).await;
    s.ads.set(
        EDS,
        &legs[1],
        ads::cla(&legs[1], &[(0, dc1.addr, ads::HEALTHY)]),
    );
    until("leg 1 to refuse dc1's identity", || async {
        refused(&plain_echo(bind).await)
    })
    .await;
    assert_eq!(
        dc1.handshakes(),
        0,
        "no handshake completed with the wrong identity"
    );
}

#[tokio::test]
async fn the_agent_over_nomads_unix_socket() {
    // Nomad's bridge mode: the bootstrap's local_agent is a `pipe`.
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("consul_grpc.sock");
    let ads = Ads::start_unix(&sock).await;
    let pki = Pki::new();
    let web = pki.leaf("web");
    let app = EchoServer::start().await;
    let public = dead_addr().await;
    ads.set(CDS, "local_app", ads::local_app(app.addr));
    let tls = Tls::Inline {
        leaf: web,
        roots: pki.ca.cert_pem().to_string(),
    };
    let (name, l) = ads::public_listener(
        public,
        &tls,
        pki.trust_domain(),
        &Intentions::DefaultAllow(Vec::new()),
    );
    ads.set(LDS, &name, l);
    let mut boot = ads::bootstrap(ads.addr, "web", "");
    boot["static_resources"]["clusters"][0]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]
        ["endpoint"]["address"] = serde_json::json!({"pipe": {"path": sock.display().to_string()}});
    let boot = Bootstrap::parse(&boot).expect("bootstrap");
    let args = ferry::cli::parse(["ferry"]).expect("flags").proxy;
    let config = ferry::Config::for_control_plane(&args, boot.service()).expect("config");
    let ferry = within(
        "start over the unix socket",
        ferry::app::xds::start(boot, config, Backoff::default()),
    )
    .await
    .expect("start");
    let mut c = mesh_conn(ferry.inbound.expect("public"), &pki.leaf("api")).await;
    echo_once(&mut c, b"configured over a unix socket").await;
    assert!(ads.acks(LDS) >= 1);
}

/// A sidecar's resources on `ads`, and a bootstrap pointing at it over TLS
/// with `ca` (Consul inlines the gRPC CA).
fn tls_bootstrap(ads: &Ads, pki: &Pki, app: SocketAddr, public: SocketAddr, ca: &str) -> Bootstrap {
    ads.set(CDS, "local_app", ads::local_app(app));
    let tls = Tls::Inline {
        leaf: pki.leaf("web"),
        roots: pki.ca.cert_pem().to_string(),
    };
    let (name, l) = ads::public_listener(
        public,
        &tls,
        pki.trust_domain(),
        &Intentions::DefaultAllow(Vec::new()),
    );
    ads.set(LDS, &name, l);
    let mut boot = ads::bootstrap(ads.addr, "web", "");
    boot["static_resources"]["clusters"][0]["transport_socket"] = serde_json::json!({
        "name": "tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"validation_context": {"trusted_ca": {"inline_string": ca}}}}});
    Bootstrap::parse(&boot).expect("bootstrap")
}

#[tokio::test]
async fn the_agent_over_tls_is_verified_by_its_ca_only() {
    let pki = Pki::new();
    // The agent's certificate names no host ferry could check, as Consul's
    // server certificates for 127.0.0.1 often do not: only the chain counts.
    let ads = Ads::start_tls(&pki, &pki.leaf("consul-agent")).await;
    let app = EchoServer::start().await;
    let public = dead_addr().await;
    let boot = tls_bootstrap(&ads, &pki, app.addr, public, pki.ca.cert_pem());
    let args = ferry::cli::parse(["ferry"]).expect("flags").proxy;
    let config = ferry::Config::for_control_plane(&args, boot.service()).expect("config");
    let ferry = within(
        "start over TLS",
        ferry::app::xds::start(boot, config, Backoff::default()),
    )
    .await
    .expect("start");
    let mut c = mesh_conn(ferry.inbound.expect("public"), &pki.leaf("api")).await;
    echo_once(&mut c, b"configured over TLS").await;

    // Another CA in the bootstrap: the agent is not trusted, nothing is applied.
    let other = Pki::new();
    let ads2 = Ads::start_tls(&pki, &pki.leaf("consul-agent")).await;
    let boot = tls_bootstrap(
        &ads2,
        &pki,
        app.addr,
        dead_addr().await,
        other.ca.cert_pem(),
    );
    let config = ferry::Config::for_control_plane(&args, boot.service()).expect("config");
    let start = ferry::app::xds::start(boot, config, Backoff::default());
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), start)
            .await
            .is_err(),
        "an agent whose certificate does not chain to the bootstrap's CA is never used"
    );
    assert!(ads2.replies().is_empty());
}

/// A socket path in the sidecar's tempdir.
fn socket_path(s: &Sidecar, name: &str) -> PathBuf {
    s._dir.path().join(name)
}

#[tokio::test]
async fn an_upstream_listener_moved_to_a_unix_socket_rebinds_with_its_mode_and_reaches_the_mtls_upstream(
) {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let (db, bind) = one_db(&s).await;
    let ferry = s.start().await;
    assert_echo(bind, b"to db over TCP first").await;

    // A stale socket where db will listen: bound, its listener gone.
    let sock = socket_path(&s, "db.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("stale socket"));
    // Consul's `local_bind_socket_mode = "0640"`: a new listener named
    // `db:<path>` replaces `db:<ip>:<port>`.
    s.ads.remove(LDS, &format!("db:{bind}"));
    let (name, l) = ads::upstream_listener_on_pipe("db", &sock, 0o640, DB_CLUSTER);
    s.ads.set(LDS, &name, l);
    eventually("db to listen on its socket", || {
        ferry.upstream_socket("db").as_deref() == Some(sock.as_path())
    })
    .await;
    assert!(is_socket(&sock), "the stale socket was replaced");
    assert_eq!(socket_mode(&sock), 0o640, "the pipe's mode");
    let before = db.handshakes();
    echo_unix(&sock, b"app to db over a socket").await;
    assert_eq!(db.handshakes(), before + 1, "over mTLS to db");
    assert!(refused(&plain_echo(bind).await), "the TCP listener is gone");

    // The listener removed: its socket file goes with it.
    s.ads.remove(LDS, &name);
    eventually("the socket file to be removed", || !sock.exists()).await;
    assert_eq!(ferry.upstream_socket("db"), None);
}

#[tokio::test]
async fn a_local_app_on_a_unix_socket_is_reached_through_the_public_listener() {
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let app_sock = socket_path(&s, "web.sock");
    let (_app, counts) = unix_echo(&app_sock);
    s.ads
        .set(CDS, "local_app", ads::local_app_on_pipe(&app_sock));
    let ferry = s.start().await;
    let mut c = mesh_conn(ferry.inbound.expect("public"), &s.pki.leaf("api")).await;
    echo_once(&mut c, b"mesh client to the app's socket").await;
    assert_eq!(counts.accepted(), 1);
    assert!(s.ads.replies().iter().all(|r| r.error.is_none()));
}

#[tokio::test]
async fn a_pipe_where_no_socket_can_serve_is_nacked_with_the_reason_and_the_last_good_state_serves()
{
    let s = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let (_db, bind) = one_db(&s).await;
    let ferry = s.start().await;
    let addr = ferry.inbound.expect("public");
    let api = s.pki.leaf("api");
    assert_echo(bind, b"before").await;

    // An upstream instance on a socket path: instances are other hosts.
    s.ads.set(
        EDS,
        DB_CLUSTER,
        ads::cla_on_pipe(DB_CLUSTER, &socket_path(&s, "db-instance.sock")),
    );
    let nack = s
        .ads
        .reply("a NACK of the pipe endpoint", |r| {
            r.type_url == EDS && r.error.is_some()
        })
        .await;
    let why = nack.error.unwrap_or_default();
    assert!(
        why.contains(&format!("endpoints {DB_CLUSTER}"))
            && why.contains("unix socket address refused: upstream instances"),
        "{why}"
    );
    assert_echo(bind, b"still to the last good instance").await;

    // The public listener on a socket path: mesh clients dial IP and port.
    let (name, l) = ads::public_listener(
        s.public,
        &s.inline(&s.web),
        s.pki.trust_domain(),
        &Intentions::DefaultAllow(Vec::new()),
    );
    let sock = socket_path(&s, "public.sock");
    s.ads
        .set(LDS, &name, ads::readdress(&l, ads::pipe(&sock, 0)));
    let nack = s
        .ads
        .reply("a NACK of the pipe public listener", |r| {
            r.type_url == LDS && r.error.is_some()
        })
        .await;
    let why = nack.error.unwrap_or_default();
    assert!(
        why.contains("unix socket address refused: the public listener"),
        "{why}"
    );
    assert!(!sock.exists(), "nothing bound there");
    assert!(!refused(&mesh_echo(addr, &api).await), "still serving");
    assert_echo(bind, b"and the upstream too").await;
}

/// The pipe fixtures are shapes Envoy takes: it ACKs them, binds the
/// upstream's socket with the same mode and dials the app's socket.
#[tokio::test]
async fn envoy_serves_the_same_pipe_shapes() {
    let e = Sidecar::new(Intentions::DefaultAllow(Vec::new())).await;
    let app_sock = socket_path(&e, "web.sock");
    let (_app, counts) = unix_echo(&app_sock);
    e.ads
        .set(CDS, "local_app", ads::local_app_on_pipe(&app_sock));
    let db = TlsEchoServer::start(&e.pki, &e.pki.leaf("db")).await;
    let one_host = [(0, db.addr, ads::HEALTHY)];
    set_db(&e, "db", "db", &ClusterOpts::default(), &one_host);
    let sock = socket_path(&e, "db.sock");
    let (name, l) = ads::upstream_listener_on_pipe("db", &sock, 0o640, DB_CLUSTER);
    e.ads.set(LDS, &name, l);
    let _envoy = crate::xds_oracle::XdsEnvoy::start(&e.bootstrap, e._dir.path());
    eventually("Envoy to bind the upstream's socket", || is_socket(&sock)).await;
    assert_eq!(socket_mode(&sock), 0o640, "Envoy applies the mode too");
    until("Envoy to carry bytes from the socket to db", || async {
        let Ok(mut c) = tokio::net::UnixStream::connect(&sock).await else {
            return false;
        };
        crate::support::round_trip(&mut c, b"via Envoy")
            .await
            .is_ok_and(|got| got == b"via Envoy")
    })
    .await;
    let api = e.pki.leaf("api");
    until("Envoy to reach the app's socket", || async {
        !refused(&mesh_echo(e.public, &api).await)
    })
    .await;
    assert!(counts.accepted() >= 1);
    assert!(
        e.ads.replies().iter().all(|r| r.error.is_none()),
        "Envoy accepted every resource: {:?}",
        e.ads.replies()
    );
}
