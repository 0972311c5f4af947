//! ferry beside a real Envoy 1.40, configured the way Consul configures its
//! sidecars (templates in tests/envoy/): bytes both ways at TLS 1.2 and
//! 1.3, half-close, intermediates, every refusal from either side, SNI
//! routing, and certificate rotation with a Consul agent.
//!
//! "The app was never reached" differs by side: ferry dials its app only
//! after the handshake and intentions, so the app sees no connection at
//! all; Envoy's tcp_proxy dials its app as soon as it accepts, before RBAC
//! decides, so there the proof is that no client byte arrived.
//!
//! Envoy comes from `make deps` (or FERRY_ENVOY); without it these fail.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry::identity::dev_ca::{Leaf, LeafSpec};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;

use crate::support::envoy::{
    allow_all, envoy_serial, is_logged_cert, rbac_rules, sni, Answer, Certs, CountingApp, Envoy,
    EnvoyConfig, SniRoute, TlsMax, Upstream, BANNER, PUBLIC_LISTENER_NAME, SNI_LISTENER_NAME,
};
use crate::support::fake_agent::{AgentOpts, FakeAgent, Instance, Intention};
use crate::support::*;

// ---------------------------------------------------------------------------
// Helpers.

/// Transfer sizes every direction is checked with.
const SIZES: [usize; 3] = [1, 64 * 1024, 8 * 1024 * 1024];
/// Connections open at once in the concurrency check.
const CONCURRENT: usize = 100;
/// Connections [`exercise`] makes.
const EXERCISED: u64 = (SIZES.len() + CONCURRENT) as u64;

/// `len` bytes that differ per `seed` and show any loss or reordering
/// (no period at buffer-sized boundaries).
fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + (i >> 16) + seed * 7) % 251) as u8)
        .collect()
}

/// Sends `msg` and half-closes while reading the echo, and returns it.
async fn exchange(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(msg).await?;
        w.shutdown().await
    };
    let recv = async {
        let mut got = Vec::with_capacity(msg.len());
        r.read_to_end(&mut got).await.map(|_| got)
    };
    let (sent, got) = within("exchange", async { tokio::join!(send, recv) }).await;
    let got = got?;
    // A refusing peer may reset before all was written; what came back counts.
    if got.is_empty() {
        return Ok(got);
    }
    sent.map(|_| got)
}

/// Asserts `msg` comes back byte for byte through `addr`.
async fn assert_exchange(addr: SocketAddr, msg: &[u8]) {
    let got = exchange(addr, msg).await.expect("exchange");
    assert_eq!(got.len(), msg.len(), "echoed length through {addr}");
    assert!(got == msg, "echoed bytes differ through {addr}");
}

/// Every size in [`SIZES`], then [`CONCURRENT`] connections open at once,
/// each echoing its own bytes: [`EXERCISED`] connections in all. While all
/// are held, Envoy's gauge `active` must count every one of them.
async fn exercise(entry: SocketAddr, envoy: &Envoy, active: &str) {
    for (seed, size) in SIZES.iter().enumerate() {
        assert_exchange(entry, &pattern(*size, seed)).await;
    }
    // Every connection echoes once, then waits for the others; the test
    // looks at Envoy, then lets them all finish.
    let held = Arc::new(Barrier::new(CONCURRENT + 1));
    let release = Arc::new(Barrier::new(CONCURRENT + 1));
    let tasks: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let (held, release) = (held.clone(), release.clone());
            tokio::spawn(async move {
                let mut s = TcpStream::connect(entry).await.expect("connect");
                echo_once(&mut s, &pattern(1000 + i, i)).await;
                held.wait().await;
                release.wait().await;
                finish(&mut s).await;
            })
        })
        .collect();
    within("all connections open", held.wait()).await;
    // (The earlier connections may take a moment to leave the gauge.)
    envoy.wait_stat(active, |v| v == CONCURRENT as u64).await;
    release.wait().await;
    for t in tasks {
        within("concurrent connection", t)
            .await
            .expect("concurrent connection");
    }
}

/// A connection through `addr` that a proxy refuses: nothing comes back.
async fn assert_refused(addr: SocketAddr, what: &str) {
    // A reset (an error) is a refusal too.
    if let Ok(got) = exchange(addr, b"let me in").await {
        assert!(got.is_empty(), "{what}: got {got:?} back");
    }
}

/// Flags of a standalone ferry for `service`: an inbound listener in front
/// of `app` (if any) and one upstream per `(name, instance)`.
fn ferry_args(
    dir: &str,
    service: &str,
    app: Option<&str>,
    upstreams: &[(&str, SocketAddr)],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-service".into(),
        service.into(),
        "-certs".into(),
        dir.into(),
    ];
    if let Some(app) = app {
        args.extend([
            "-listen".into(),
            "127.0.0.1:0".into(),
            "-service-addr".into(),
            app.into(),
        ]);
    }
    for (name, addr) in upstreams {
        args.extend(["-upstream".into(), format!("{name}:0")]);
        args.extend(["-upstream-addr".into(), format!("{name}={addr}")]);
    }
    args
}

async fn ferry(args: &[String]) -> Ferry {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Ferry::start(&args).await
}

/// A leaf for `service` in another trust domain, signed by `pki`'s CA: it
/// chains to a trusted root, so only the trust-domain check can refuse it.
fn foreign_leaf(pki: &Pki, service: &str) -> Leaf {
    let uri = format!(
        "spiffe://0ther000-0000-4000-8000-000000000000.consul/ns/default/dc/dc1/svc/{service}"
    );
    pki.issue(&LeafSpec::consul(uri, Duration::from_secs(3600)))
}

/// A leaf for a test's own mesh client (not written to `pki`'s dir, which
/// the proxies read).
fn client_leaf(pki: &Pki, service: &str) -> Leaf {
    pki.ca
        .leaf(service, "dc1", Duration::from_secs(3600))
        .expect("leaf")
}

/// The Certs of `service` laid out by `pki.leaf`.
fn certs(pki: &Pki, service: &str) -> Certs {
    Certs::in_certs_dir(pki.dir(), service)
}

/// Consul's RBAC for `destination` under default deny with one allow.
fn only_from(pki: &Pki, source: &str, destination: &str) -> Value {
    rbac_rules(
        pki.trust_domain(),
        destination,
        &[Intention::allow(source, destination)],
        false,
    )
}

/// Access-log entries of `listener` whose `field` is `value`.
fn logged<'a>(entries: &'a [Value], field: &str, value: &str) -> Vec<&'a Value> {
    entries.iter().filter(|e| e[field] == value).collect()
}

// ---------------------------------------------------------------------------
// Bytes both ways, TLS 1.2 and 1.3.

/// web (Envoy) -> api (ferry) -> app, Envoy's upstream TLS as `tls`;
/// Envoy's cluster stats say which version every handshake used.
async fn envoy_to_ferry(tls: TlsMax, want: &str, not: &str) {
    let pki = Pki::new();
    pki.leaf("web");
    pki.leaf("api");
    let app = EchoServer::start().await;
    let dir = pki.dir_arg();
    let app_addr = app.addr_arg();
    let api = Ferry::start(&api_args(&dir, &app_addr, &[])).await;
    let config = EnvoyConfig::sidecar("web").upstream(
        Upstream::new(
            "api",
            pki.trust_domain(),
            api.inbound(),
            &certs(&pki, "web"),
        )
        .tls(tls),
    );
    let envoy = Envoy::start(&config).await;

    let cluster = format!("cluster.{}", sni("api", "dc1", pki.trust_domain()));
    let active = format!("{cluster}.upstream_cx_active");
    exercise(envoy.upstream("api"), &envoy, &active).await;

    envoy
        .wait_stat(&format!("{cluster}.ssl.versions.{want}"), |v| {
            v == EXERCISED
        })
        .await;
    assert_eq!(
        envoy.stat(&format!("{cluster}.ssl.versions.{not}")).await,
        0
    );
    assert_eq!(app.counts.accepted() as u64, EXERCISED);
    assert_eq!(api.metrics().authz_allowed.get(), EXERCISED);
    // Envoy's log names ferry's identity as the server it reached.
    let entries = envoy
        .wait_access_log("api:127.0.0.1:0", EXERCISED as usize)
        .await;
    assert!(entries
        .iter()
        .all(|e| e["peer_uri"] == pki.uri("api") && e["tls"] == want));
}

/// Envoy as client offers at most TLS 1.2 with Consul's empty TLS
/// parameters, and ferry serves it.
#[tokio::test]
async fn envoy_to_ferry_tls12_by_default() {
    envoy_to_ferry(TlsMax::Default, "TLSv1.2", "TLSv1.3").await;
}

/// With the mesh's outgoing maximum raised, Envoy and ferry agree on TLS 1.3.
#[tokio::test]
async fn envoy_to_ferry_tls13_when_raised() {
    envoy_to_ferry(TlsMax::V13, "TLSv1.3", "TLSv1.2").await;
}

/// web (ferry) -> api (Envoy, RBAC allowing web) -> app, Envoy's
/// downstream TLS as `tls`. Envoy's log shows Consul's SNI from ferry and
/// ferry's identity on every connection.
async fn ferry_to_envoy(tls: TlsMax, want: &str, not: &str) {
    let pki = Pki::new();
    pki.leaf("web");
    pki.leaf("api");
    let app = EchoServer::start().await;
    let config = EnvoyConfig::sidecar("api").public_listener(
        &certs(&pki, "api"),
        only_from(&pki, "web", "api"),
        tls,
        app.addr,
    );
    let envoy = Envoy::start(&config).await;
    let web = ferry(&ferry_args(
        &pki.dir_arg(),
        "web",
        None,
        &[("api", envoy.public())],
    ))
    .await;

    let active = "listener.public_listener.downstream_cx_active";
    exercise(web.upstream("api"), &envoy, active).await;

    envoy
        .wait_stat(
            &format!("listener.public_listener.ssl.versions.{want}"),
            |v| v == EXERCISED,
        )
        .await;
    assert_eq!(
        envoy
            .stat(&format!("listener.public_listener.ssl.versions.{not}"))
            .await,
        0
    );
    assert_eq!(envoy.stat("connect_authz.rbac.allowed").await, EXERCISED);
    assert_eq!(envoy.stat("connect_authz.rbac.denied").await, 0);
    let entries = envoy
        .wait_access_log(PUBLIC_LISTENER_NAME, EXERCISED as usize)
        .await;
    for e in &entries {
        assert_eq!(e["peer_uri"], pki.uri("web"), "{e}");
        assert_eq!(e["tls"], want, "{e}");
        // A sidecar listener has no tls_inspector and no server_names, so
        // Envoy does not even record the SNI ferry sent (see the SNI test).
        assert!(e["sni"].is_null(), "{e}");
    }
}

/// ferry offers TLS 1.3 and Envoy, as a server, takes it by default.
#[tokio::test]
async fn ferry_to_envoy_tls13_by_default() {
    ferry_to_envoy(TlsMax::Default, "TLSv1.3", "TLSv1.2").await;
}

/// An Envoy inbound capped at TLS 1.2 (Consul's incoming maximum) still
/// serves ferry.
#[tokio::test]
async fn ferry_to_envoy_tls12_when_capped() {
    ferry_to_envoy(TlsMax::V12, "TLSv1.2", "TLSv1.3").await;
}

// ---------------------------------------------------------------------------
// Half-close and intermediates through mixed chains.

/// The two mixed chains: client -> web (Envoy) -> api (ferry) -> app and
/// client -> web (ferry) -> api (Envoy) -> app, with the certificates in
/// `pki`'s dir and both apps at `app`. Returns the two entry points.
struct Mixed {
    _api_ferry: Ferry,
    _web_ferry: Ferry,
    _web_envoy: Envoy,
    _api_envoy: Envoy,
    via_envoy_client: SocketAddr,
    via_ferry_client: SocketAddr,
}

impl Mixed {
    async fn start(pki: &Pki, app: SocketAddr) -> Mixed {
        let dir = pki.dir_arg();
        let app_arg = app.to_string();
        let api_config = EnvoyConfig::sidecar("api").public_listener(
            &certs(pki, "api"),
            only_from(pki, "web", "api"),
            TlsMax::Default,
            app,
        );
        let api_flags = api_args(&dir, &app_arg, &[]);
        let (api_ferry, api_envoy) =
            tokio::join!(Ferry::start(&api_flags), Envoy::start(&api_config));
        let web_config = EnvoyConfig::sidecar("web").upstream(Upstream::new(
            "api",
            pki.trust_domain(),
            api_ferry.inbound(),
            &certs(pki, "web"),
        ));
        let web_args = ferry_args(&dir, "web", None, &[("api", api_envoy.public())]);
        let (web_envoy, web_ferry) = tokio::join!(Envoy::start(&web_config), ferry(&web_args));
        Mixed {
            via_envoy_client: web_envoy.upstream("api"),
            via_ferry_client: web_ferry.upstream("api"),
            _api_ferry: api_ferry,
            _web_ferry: web_ferry,
            _web_envoy: web_envoy,
            _api_envoy: api_envoy,
        }
    }
}

/// A client that half-closes still gets the whole answer through either
/// mixed chain: the app replies only once it has read EOF, so the FIN had
/// to cross Envoy and ferry while the way back stayed open.
#[tokio::test]
async fn half_close_crosses_both_mixed_chains() {
    let pki = Pki::new();
    pki.leaf("web");
    pki.leaf("api");
    let app = CountingApp::start(Answer::AfterEof).await;
    let mesh = Mixed::start(&pki, app.addr).await;
    for (entry, what) in [
        (mesh.via_envoy_client, "Envoy -> ferry"),
        (mesh.via_ferry_client, "ferry -> Envoy"),
    ] {
        let question = pattern(100_000, 3);
        let mut s = TcpStream::connect(entry).await.expect("connect");
        s.write_all(&question).await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut answer = Vec::new();
        within(what, s.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            String::from_utf8_lossy(&answer),
            "got 100000 bytes",
            "{what}: the answer after EOF"
        );
    }
    assert_eq!(app.received(), 200_000);
}

/// The other half: the app speaks first and closes its write side at once;
/// the client reads that to EOF through either mixed chain and can still
/// send afterwards, and the app gets it.
#[tokio::test]
async fn server_half_close_crosses_both_mixed_chains() {
    let pki = Pki::new();
    pki.leaf("web");
    pki.leaf("api");
    let app = CountingApp::start(Answer::BannerFirst).await;
    let mesh = Mixed::start(&pki, app.addr).await;
    let mut sent = 0;
    for (entry, what) in [
        (mesh.via_envoy_client, "Envoy -> ferry"),
        (mesh.via_ferry_client, "ferry -> Envoy"),
    ] {
        let mut s = TcpStream::connect(entry).await.expect("connect");
        let mut banner = Vec::new();
        within(what, s.read_to_end(&mut banner))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(banner, BANNER, "{what}");
        s.write_all(b"thanks").await.expect("write after EOF");
        s.shutdown().await.expect("shutdown");
        sent += 6;
        eventually(
            &format!("{what}: the app to read what came after its FIN"),
            || app.received() == sent,
        )
        .await;
    }
}

/// Leaves signed by an intermediate, presented as Consul's CertPEM (leaf
/// then intermediate) with only the root trusted, work both ways.
#[tokio::test]
async fn intermediate_chains_work_both_ways() {
    let pki = Pki::new();
    let inter = pki.ca.intermediate().expect("intermediate");
    for svc in ["web", "api"] {
        let leaf = inter
            .leaf(svc, "dc1", Duration::from_secs(3600))
            .expect("leaf");
        assert_eq!(leaf.cert_pem.matches("BEGIN CERTIFICATE").count(), 2);
        ferry::identity::dev_ca::write_leaf(pki.dir(), svc, &leaf).expect("write leaf");
    }
    let app = EchoServer::start().await;
    let mesh = Mixed::start(&pki, app.addr).await;
    assert_exchange(mesh.via_envoy_client, &pattern(64 * 1024, 1)).await;
    assert_exchange(mesh.via_ferry_client, &pattern(64 * 1024, 2)).await;
    assert_eq!(app.counts.accepted(), 2);
}

// ---------------------------------------------------------------------------
// Refusals, from either side, and both proxies serving afterwards.

/// Envoy's RBAC (Consul's default-allow shape: a DENY policy for billing)
/// refuses a ferry presenting billing's identity. No byte of billing's
/// reaches the app (Envoy did connect to it, before RBAC decided); web
/// still gets through the same Envoy, and the billing ferry still serves
/// its own inbound.
#[tokio::test]
async fn envoy_rbac_refuses_a_ferry_with_another_identity() {
    let pki = Pki::new();
    for svc in ["web", "api", "billing"] {
        pki.leaf(svc);
    }
    let app = CountingApp::start(Answer::Echo).await;
    let rbac = rbac_rules(
        pki.trust_domain(),
        "api",
        &[Intention::deny("billing", "api")],
        true,
    );
    let config = EnvoyConfig::sidecar("api").public_listener(
        &certs(&pki, "api"),
        rbac,
        TlsMax::Default,
        app.addr,
    );
    let envoy = Envoy::start(&config).await;
    let billing_app = EchoServer::start().await;
    let dir = pki.dir_arg();
    let ups = [("api", envoy.public())];
    let billing_args = ferry_args(&dir, "billing", Some(&billing_app.addr_arg()), &ups);
    let web_args = ferry_args(&dir, "web", None, &ups);
    let (billing, web) = tokio::join!(ferry(&billing_args), ferry(&web_args));

    assert_refused(billing.upstream("api"), "billing through Envoy's RBAC").await;
    envoy
        .wait_stat("connect_authz.rbac.denied", |v| v == 1)
        .await;
    // Envoy's tcp_proxy dialed the app on accept, before RBAC said no.
    eventually("Envoy's early dial of its app", || app.accepted() == 1).await;
    assert_eq!(
        app.received(),
        0,
        "no byte of the denied peer reached the app"
    );

    // Envoy still serves web, and only web's bytes reach the app.
    assert_exchange(web.upstream("api"), b"web is allowed").await;
    assert_eq!(app.received(), b"web is allowed".len() as u64);
    assert_eq!(envoy.stat("connect_authz.rbac.allowed").await, 1);
    // The billing ferry still serves its own inbound.
    let mut conn = mesh_conn(billing.inbound(), &client_leaf(&pki, "web")).await;
    echo_once(&mut conn, b"billing still serves").await;
    finish(&mut conn).await;
}

/// An app that speaks first (a banner) shows where each proxy decides.
/// Envoy dials its app on accept and RBAC judges the client's first bytes
/// (or its EOF), so a denied ferry (billing) that sends nothing is handed
/// the app's banner and holds the app connection until it closes; ferry
/// authorizes before it dials, so a denied Envoy gets nothing and the app
/// never sees the connection. Neither app receives a client byte.
#[tokio::test]
async fn a_denied_peer_gets_the_banner_from_envoy_but_nothing_from_ferry() {
    let pki = Pki::new();
    for svc in ["api", "billing"] {
        pki.leaf(svc);
    }
    let (envoy_app, ferry_app) = tokio::join!(
        CountingApp::start(Answer::BannerFirst),
        CountingApp::start(Answer::BannerFirst)
    );
    let dir = pki.dir_arg();
    let ferry_app_arg = ferry_app.addr_arg();
    let api_flags = api_args(&dir, &ferry_app_arg, &["-default-deny", "-allow", "web"]);
    let api_config = EnvoyConfig::sidecar("api").public_listener(
        &certs(&pki, "api"),
        only_from(&pki, "web", "api"),
        TlsMax::Default,
        envoy_app.addr,
    );
    let (api_ferry, api_envoy) = tokio::join!(Ferry::start(&api_flags), Envoy::start(&api_config));
    let billing_args = ferry_args(&dir, "billing", None, &[("api", api_envoy.public())]);
    let billing_config = EnvoyConfig::sidecar("billing").upstream(Upstream::new(
        "api",
        pki.trust_domain(),
        api_ferry.inbound(),
        &certs(&pki, "billing"),
    ));
    let (billing_ferry, billing_envoy) =
        tokio::join!(ferry(&billing_args), Envoy::start(&billing_config));

    // billing (ferry) -> api (Envoy): the banner comes back before RBAC.
    let mut s = TcpStream::connect(billing_ferry.upstream("api"))
        .await
        .expect("connect");
    let mut got = Vec::new();
    within("Envoy's answer", s.read_to_end(&mut got))
        .await
        .expect("read");
    assert_eq!(
        got, BANNER,
        "Envoy handed its app's banner to a denied peer"
    );
    // RBAC has had no client byte to judge yet: the silent peer still holds
    // Envoy's connection to the app. Its EOF is what gets it denied.
    assert_eq!(api_envoy.stat("connect_authz.rbac.denied").await, 0);
    assert_eq!(
        api_envoy.stat("cluster.local_app.upstream_cx_active").await,
        1
    );
    s.shutdown().await.expect("shutdown");
    api_envoy
        .wait_stat("connect_authz.rbac.denied", |v| v == 1)
        .await;

    // billing (Envoy) -> api (ferry): nothing, and no app connection.
    let mut s = TcpStream::connect(billing_envoy.upstream("api"))
        .await
        .expect("connect");
    let mut got = Vec::new();
    let _ = within("ferry's answer", s.read_to_end(&mut got)).await;
    assert!(got.is_empty(), "ferry handed {got:?} to a denied peer");
    eventually("ferry to deny billing", || {
        api_ferry.metrics().authz_denied.get() == 1
    })
    .await;
    assert_eq!(ferry_app.accepted(), 0);
    assert_eq!((envoy_app.received(), ferry_app.received()), (0, 0));
}

/// ferry's intentions (default deny, allow web) refuse an Envoy presenting
/// billing's identity, before its app is dialed; afterwards ferry still
/// lets web in and the billing Envoy still serves its own inbound.
#[tokio::test]
async fn ferry_intentions_refuse_an_envoy() {
    let pki = Pki::new();
    for svc in ["web", "api", "billing"] {
        pki.leaf(svc);
    }
    let app = CountingApp::start(Answer::Echo).await;
    let dir = pki.dir_arg();
    let app_arg = app.addr_arg();
    let api = Ferry::start(&api_args(
        &dir,
        &app_arg,
        &["-default-deny", "-allow", "web"],
    ))
    .await;
    let billing_app = EchoServer::start().await;
    let config = EnvoyConfig::sidecar("billing")
        .public_listener(
            &certs(&pki, "billing"),
            allow_all(),
            TlsMax::Default,
            billing_app.addr,
        )
        .upstream(Upstream::new(
            "api",
            pki.trust_domain(),
            api.inbound(),
            &certs(&pki, "billing"),
        ));
    let envoy = Envoy::start(&config).await;

    assert_refused(envoy.upstream("api"), "billing Envoy into ferry").await;
    eventually("ferry to deny billing", || {
        api.metrics().authz_denied.get() == 1
    })
    .await;
    assert_eq!(app.accepted(), 0, "ferry never dialed its app for billing");
    eventually("ferry to close the denied connection", || {
        closed_count(api.metrics(), "inbound", "api", "denied") == 1
    })
    .await;

    // ferry still serves web; the billing Envoy still serves its inbound.
    let mut conn = mesh_conn(api.inbound(), &client_leaf(&pki, "web")).await;
    echo_once(&mut conn, b"web is allowed").await;
    finish(&mut conn).await;
    assert_eq!(app.accepted(), 1);
    let mut conn = mesh_conn(envoy.public(), &client_leaf(&pki, "web")).await;
    echo_once(&mut conn, b"the billing Envoy still serves").await;
    finish(&mut conn).await;
}

/// ferry dialing api refuses an Envoy that presents billing's certificate
/// (a wrong instance behind api's address). None of the client's bytes
/// reach that Envoy's app; ferry's billing upstream, pointed at the same
/// Envoy, still works, so both keep serving.
#[tokio::test]
async fn ferry_refuses_an_envoy_presenting_another_service() {
    let pki = Pki::new();
    for svc in ["web", "billing"] {
        pki.leaf(svc);
    }
    let app = CountingApp::start(Answer::Echo).await;
    let config = EnvoyConfig::sidecar("billing").public_listener(
        &certs(&pki, "billing"),
        only_from(&pki, "web", "billing"),
        TlsMax::Default,
        app.addr,
    );
    let envoy = Envoy::start(&config).await;
    let ups = [("api", envoy.public()), ("billing", envoy.public())];
    let web = ferry(&ferry_args(&pki.dir_arg(), "web", None, &ups)).await;

    assert_refused(web.upstream("api"), "ferry to an Envoy that is not api").await;
    eventually("ferry to log the failed upstream connection", || {
        closed_count(web.metrics(), "upstream", "api", "failed") == 1
    })
    .await;
    assert!(web.metrics().upstream_attempt_failed.get() >= 1);
    assert_eq!(app.received(), 0, "no client byte reached billing's app");
    assert_eq!(envoy.stat("connect_authz.rbac.allowed").await, 0);

    assert_exchange(web.upstream("billing"), b"billing is billing").await;
    assert_eq!(app.received(), b"billing is billing".len() as u64);
}

/// Envoy dialing api refuses a ferry that presents billing's certificate:
/// its exact SAN match fails, so the handshake does, and ferry never dials
/// its app. Envoy's billing upstream to the same ferry still works.
#[tokio::test]
async fn envoy_refuses_a_ferry_presenting_another_service() {
    let pki = Pki::new();
    for svc in ["web", "billing"] {
        pki.leaf(svc);
    }
    let app = CountingApp::start(Answer::Echo).await;
    let billing = ferry(&ferry_args(
        &pki.dir_arg(),
        "billing",
        Some(&app.addr_arg()),
        &[],
    ))
    .await;
    let web_certs = certs(&pki, "web");
    let td = pki.trust_domain();
    let config = EnvoyConfig::sidecar("web")
        .upstream(Upstream::new("api", td, billing.inbound(), &web_certs))
        .upstream(Upstream::new("billing", td, billing.inbound(), &web_certs));
    let envoy = Envoy::start(&config).await;

    assert_refused(envoy.upstream("api"), "Envoy to a ferry that is not api").await;
    let cluster = format!("cluster.{}", sni("api", "dc1", td));
    envoy
        .wait_stat(&format!("{cluster}.ssl.fail_verify_san"), |v| v >= 1)
        .await;
    eventually("ferry to count the failed handshake", || {
        billing.metrics().inbound_handshake_failed.get() >= 1
    })
    .await;
    assert_eq!(app.accepted(), 0, "ferry never dialed its app");

    assert_exchange(envoy.upstream("billing"), b"billing is billing").await;
    assert_eq!(app.accepted(), 1);
}

/// A certificate from another trust domain is refused whichever side
/// checks it, even though it chains to a trusted root:
/// - ferry as server refuses an Envoy client from the other domain;
/// - Envoy's RBAC (trust domain pinned in the regex) refuses such a client
///   (a raw mesh client here: ferry takes its trust domain from its own
///   leaf, so a foreign ferry would refuse Envoy first);
/// - ferry as client refuses an Envoy server from the other domain;
/// - Envoy as client refuses a ferry server from the other domain.
/// Then the proper pairs still work through the same processes.
#[tokio::test]
async fn foreign_trust_domain_is_refused_both_ways() {
    let pki = Pki::new();
    let td = pki.trust_domain().to_string();
    pki.leaf("web");
    pki.leaf("api");
    let foreign_dir = tempfile::tempdir().expect("tempdir");
    let foreign_web = foreign_leaf(&pki, "web");
    let foreign_api = foreign_leaf(&pki, "api");
    let foreign_web_certs =
        Certs::write(foreign_dir.path(), "web", &foreign_web, pki.ca.cert_pem());
    let foreign_api_certs =
        Certs::write(foreign_dir.path(), "api", &foreign_api, pki.ca.cert_pem());
    std::fs::copy(pki.path("ca.pem"), foreign_dir.path().join("ca.pem")).expect("copy ca");
    // The foreign api ferry reads its leaf as <service>.pem from its own dir.
    let foreign_dir_arg = foreign_dir.path().display().to_string();

    let app = CountingApp::start(Answer::Echo).await;
    let dir = pki.dir_arg();
    let app_arg = app.addr_arg();
    let foreign_api_args = ferry_args(&foreign_dir_arg, "api", Some(&app_arg), &[]);
    let api_flags = api_args(&dir, &app_arg, &[]);
    let (api, foreign_api_ferry) = tokio::join!(Ferry::start(&api_flags), ferry(&foreign_api_args));
    // One Envoy with the real api inbound and a real web client (to the
    // foreign ferry), one with the foreign api inbound and a foreign web
    // client (to the real ferry).
    let real = EnvoyConfig::sidecar("api")
        .public_listener(
            &certs(&pki, "api"),
            only_from(&pki, "web", "api"),
            TlsMax::Default,
            app.addr,
        )
        .upstream(Upstream::new(
            "api",
            &td,
            foreign_api_ferry.inbound(),
            &certs(&pki, "web"),
        ));
    let foreign = EnvoyConfig::sidecar("api")
        .public_listener(&foreign_api_certs, allow_all(), TlsMax::Default, app.addr)
        .upstream(Upstream::new("api", &td, api.inbound(), &foreign_web_certs));
    let (real, foreign) = tokio::join!(Envoy::start(&real), Envoy::start(&foreign));

    // ferry as server: the foreign Envoy client is refused in the handshake.
    assert_refused(foreign.upstream("api"), "foreign Envoy into ferry").await;
    eventually("ferry to refuse the foreign client", || {
        api.metrics().inbound_handshake_failed.get() >= 1
    })
    .await;
    assert_eq!(api.metrics().authz_allowed.get(), 0);

    // Envoy's RBAC: the foreign client's URI does not match the pinned regex.
    let tcp = TcpStream::connect(real.public()).await.expect("connect");
    let mut tls = within(
        "handshake",
        raw_client(Some(&foreign_web)).connect(any_name(), tcp),
    )
    .await
    .expect("Envoy completes the handshake; RBAC decides after");
    let back = round_trip(&mut tls, b"foreign bytes").await;
    assert!(
        back.map_or(true, |b| b.is_empty()),
        "foreign client got an answer"
    );
    real.wait_stat("connect_authz.rbac.denied", |v| v == 1)
        .await;

    // ferry as client: the foreign Envoy server is refused.
    let web = ferry(&ferry_args(&dir, "web", None, &[("api", foreign.public())])).await;
    assert_refused(web.upstream("api"), "ferry to a foreign Envoy").await;
    eventually("ferry to fail the upstream connection", || {
        closed_count(web.metrics(), "upstream", "api", "failed") == 1
    })
    .await;

    // Envoy as client: the foreign ferry server is refused (SAN mismatch).
    assert_refused(real.upstream("api"), "Envoy to a foreign ferry").await;
    let cluster = format!("cluster.{}", sni("api", "dc1", &td));
    real.wait_stat(&format!("{cluster}.ssl.fail_verify_san"), |v| v >= 1)
        .await;

    // Not one client byte reached the app, on either side.
    assert_eq!(app.received(), 0);
    assert_eq!(foreign_api_ferry.metrics().authz_allowed.get(), 0);

    // The proper pairs still work: web (ferry) -> api (Envoy), and a web
    // mesh client -> api (ferry).
    let web_real = ferry(&ferry_args(&dir, "web", None, &[("api", real.public())])).await;
    assert_exchange(web_real.upstream("api"), b"same mesh").await;
    let mut conn = mesh_conn(api.inbound(), &client_leaf(&pki, "web")).await;
    echo_once(&mut conn, b"same mesh, too").await;
    finish(&mut conn).await;
    assert_eq!(
        app.received(),
        (b"same mesh".len() + b"same mesh, too".len()) as u64
    );
}

// ---------------------------------------------------------------------------
// SNI routing.

/// An Envoy listener with one filter chain per SNI (a terminating
/// gateway's shape) routes ferry's connections by the SNI ferry sends:
/// the api upstream lands on api's chain and app, billing's on billing's,
/// and ferry accepts each because the chain presents that service's leaf.
/// A client sending another name matches no chain and reaches nothing.
#[tokio::test]
async fn ferry_sni_selects_the_envoy_filter_chain() {
    let pki = Pki::new();
    for svc in ["web", "api", "billing"] {
        pki.leaf(svc);
    }
    let td = pki.trust_domain();
    let (api_app, billing_app) = tokio::join!(
        CountingApp::start(Answer::Echo),
        CountingApp::start(Answer::Echo)
    );
    let route = |svc: &str, app: &CountingApp| SniRoute {
        server_name: sni(svc, "dc1", td),
        certs: certs(&pki, svc),
        rbac: only_from(&pki, "web", svc),
        app: app.addr,
    };
    let config = EnvoyConfig::sidecar("gateway")
        .sni_listener(vec![route("api", &api_app), route("billing", &billing_app)]);
    let envoy = Envoy::start(&config).await;
    let gw = envoy.sni_listener();
    let web = ferry(&ferry_args(
        &pki.dir_arg(),
        "web",
        None,
        &[("api", gw), ("billing", gw)],
    ))
    .await;

    assert_exchange(web.upstream("api"), b"for api").await;
    assert_eq!((api_app.received(), billing_app.received()), (7, 0));
    assert_exchange(web.upstream("billing"), b"for billing").await;
    assert_eq!((api_app.received(), billing_app.received()), (7, 11));
    // Envoy saw Consul's SNI for each, and ferry's identity.
    let entries = envoy.wait_access_log(SNI_LISTENER_NAME, 2).await;
    for svc in ["api", "billing"] {
        let hits = logged(&entries, "sni", &sni(svc, "dc1", td));
        assert_eq!(hits.len(), 1, "{entries:?}");
        assert_eq!(hits[0]["peer_uri"], pki.uri("web"));
    }

    // No chain matches another name: the handshake fails, no app is dialed.
    let tcp = TcpStream::connect(gw).await.expect("connect");
    let refused = match raw_client(Some(&client_leaf(&pki, "web")))
        .connect(any_name(), tcp)
        .await
    {
        Ok(mut tls) => round_trip(&mut tls, b"nobody")
            .await
            .map_or(true, |b| b.is_empty()),
        Err(_) => true,
    };
    assert!(refused, "an unknown SNI must match no filter chain");
    envoy
        .wait_stat("listener.gateway.no_filter_chain_match", |v| v == 1)
        .await;
    assert_eq!((api_app.accepted(), billing_app.accepted()), (1, 1));
}

// ---------------------------------------------------------------------------
// With a Consul agent: rotation, and one mesh.

/// Starts an in-process ferry on `agent` with `args` after `-http-addr`.
async fn on_agent(agent: &FakeAgent, args: &[&str]) -> Ferry {
    let url = agent.url();
    let mut all = vec!["-http-addr", url.as_str()];
    all.extend_from_slice(args);
    Ferry::start(&all).await
}

/// Waits until ferry's balancer for `upstream` lists exactly `addr`.
async fn wait_instance(ferry: &Ferry, upstream: &str, addr: SocketAddr) {
    eventually(&format!("{upstream} instances to be [{addr}]"), || {
        ferry
            .running
            .instances(upstream)
            .is_some_and(|i| i.len() == 1 && i[0].addr == addr)
    })
    .await;
}

/// A leaf and roots as the agent hands them to a proxy (`CertPEM`,
/// `PrivateKeyPEM`, every `RootCert`), for Envoy.
async fn agent_certs(agent: &FakeAgent, service: &str, dir: &std::path::Path) -> Certs {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client");
    let get = |path: String| {
        let http = http.clone();
        async move {
            let resp = http.get(path).send().await.expect("agent GET");
            assert!(resp.status().is_success(), "agent: {}", resp.status());
            resp.json::<Value>().await.expect("agent JSON")
        }
    };
    let leaf = get(format!(
        "{}/v1/agent/connect/ca/leaf/{service}",
        agent.url()
    ))
    .await;
    let roots = get(format!("{}/v1/agent/connect/ca/roots", agent.url())).await;
    let roots_pem: String = roots["Roots"]
        .as_array()
        .expect("Roots")
        .iter()
        .map(|r| r["RootCert"].as_str().expect("RootCert").to_string())
        .collect();
    let leaf = Leaf {
        cert_pem: leaf["CertPEM"].as_str().expect("CertPEM").into(),
        key_pem: leaf["PrivateKeyPEM"]
            .as_str()
            .expect("PrivateKeyPEM")
            .into(),
    };
    Certs::write(dir, service, &leaf, &roots_pem)
}

/// ferry in agent mode rotates its leaf and roots (a CA rotation as Consul
/// does it) while Envoy holds connections open both ways through it:
/// web (ferry) -> api (Envoy) and api's upstream (Envoy) -> web (ferry).
/// Nothing open is dropped, and Envoy's log shows the old leaf on the held
/// connections and the new one on new connections, in both directions.
///
/// Envoy's files are static, so it trusts both roots from the start, as it
/// would once Consul had pushed the new root to it over SDS.
#[tokio::test]
async fn ferry_rotates_under_envoy_connections() {
    let pki = Pki::new();
    let td = pki.trust_domain().to_string();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let old_web = pki
        .ca
        .leaf("web", "dc1", Duration::from_secs(3600))
        .expect("leaf");
    agent.set_leaf("web", &old_web);
    let new_ca = ferry::identity::dev_ca::DevCa::generate(&td).expect("new CA");
    let new_web = new_ca
        .leaf("web", "dc1", Duration::from_secs(3600))
        .expect("leaf");

    let (api_app, web_app) = tokio::join!(EchoServer::start(), EchoServer::start());
    let web_app_arg = web_app.addr_arg();
    let web = on_agent(
        &agent,
        &[
            "-service",
            "web",
            "-listen",
            "127.0.0.1:0",
            "-service-addr",
            &web_app_arg,
            "-upstream",
            "api:0",
        ],
    )
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let both_roots = format!("{}{}", pki.ca.cert_pem(), new_ca.cert_pem());
    let api_leaf = pki
        .ca
        .leaf("api", "dc1", Duration::from_secs(3600))
        .expect("leaf");
    let api_certs = Certs::write(dir.path(), "api", &api_leaf, &both_roots);
    let config = EnvoyConfig::sidecar("api")
        .public_listener(
            &api_certs,
            only_from(&pki, "web", "api"),
            TlsMax::Default,
            api_app.addr,
        )
        .upstream(Upstream::new("web", &td, web.inbound(), &api_certs));
    let envoy = Envoy::start(&config).await;
    agent.set_instances("api", vec![Instance::sidecar(envoy.public())]);
    wait_instance(&web, "api", envoy.public()).await;

    // Held both ways, echoing before the rotation.
    let mut to_envoy = TcpStream::connect(web.upstream("api"))
        .await
        .expect("connect");
    echo_once(&mut to_envoy, b"web to api, before").await;
    let mut to_ferry = TcpStream::connect(envoy.upstream("web"))
        .await
        .expect("connect");
    echo_once(&mut to_ferry, b"api to web, before").await;
    let old_serial = web
        .running
        .credentials()
        .expect("certificates")
        .identity
        .serial
        .replace(':', "");
    assert_eq!(old_serial, envoy_serial(&old_web));

    // The CA rotates: the new root is listed (the old one stays), then the
    // leaf is re-issued by it.
    agent.rotate(new_ca.cert_pem());
    eventually("ferry to trust both roots", || {
        web.running
            .credentials()
            .is_some_and(|c| c.root_count() == 2)
    })
    .await;
    agent.set_leaf("web", &new_web);
    let new_serial = envoy_serial(&new_web);
    eventually("ferry to present the new leaf", || {
        web.running
            .credentials()
            .expect("certificates")
            .identity
            .serial
            .replace(':', "")
            == new_serial
    })
    .await;

    // New connections both ways see the new leaf.
    assert_exchange(web.upstream("api"), b"web to api, after").await;
    assert_exchange(envoy.upstream("web"), b"api to web, after").await;
    let inbound = envoy.wait_access_log(PUBLIC_LISTENER_NAME, 1).await;
    assert_eq!(
        logged(&inbound, "peer_serial", &new_serial).len(),
        1,
        "{inbound:?}"
    );
    let outbound = envoy.wait_access_log("web:127.0.0.1:0", 1).await;
    let peer_cert = |e: &Value| e["peer_cert"].as_str().unwrap_or("").to_string();
    assert!(
        is_logged_cert(&peer_cert(&outbound[0]), &new_web),
        "{outbound:?}"
    );

    // The held connections still echo, then close in order.
    echo_once(&mut to_envoy, b"web to api, still").await;
    echo_once(&mut to_ferry, b"api to web, still").await;
    finish(&mut to_envoy).await;
    finish(&mut to_ferry).await;
    let inbound = envoy.wait_access_log(PUBLIC_LISTENER_NAME, 2).await;
    assert_eq!(
        logged(&inbound, "peer_serial", &old_serial).len(),
        1,
        "{inbound:?}"
    );
    let outbound = envoy.wait_access_log("web:127.0.0.1:0", 2).await;
    assert!(
        is_logged_cert(&peer_cert(&outbound[1]), &old_web),
        "{outbound:?}"
    );
    assert_eq!(
        (api_app.counts.accepted(), web_app.counts.accepted()),
        (2, 2)
    );
}

/// ferry in agent mode and Envoy, with certificates from the same agent
/// CA and intentions from the same list, are one mesh: web (ferry) -> api
/// (Envoy) and web (Envoy) -> api (ferry). The intentions (default deny,
/// `* -> api` allowed, `billing -> api` denied) make Envoy's RBAC carve
/// billing out of the wildcard; a billing client is refused by both api
/// sidecars alike, and web gets through both on the wildcard.
#[tokio::test]
async fn ferry_and_envoy_form_one_mesh_on_one_agent() {
    let pki = Pki::new();
    let td = pki.trust_domain().to_string();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let intentions = vec![
        Intention::allow("*", "api"),
        Intention::deny("billing", "api"),
    ];
    agent.set_intentions(intentions.clone());
    agent.set_default_allow(false);

    let dir = tempfile::tempdir().expect("tempdir");
    let web_certs = agent_certs(&agent, "web", dir.path()).await;
    let api_certs = agent_certs(&agent, "api", dir.path()).await;
    let (ferry_app, envoy_app) = tokio::join!(
        CountingApp::start(Answer::Echo),
        CountingApp::start(Answer::Echo)
    );
    let ferry_app_arg = ferry_app.addr_arg();
    let rbac = rbac_rules(&td, "api", &intentions, false);
    let api_envoy_config = EnvoyConfig::sidecar("api").public_listener(
        &api_certs,
        rbac,
        TlsMax::Default,
        envoy_app.addr,
    );
    let api_ferry_args = [
        "-service",
        "api",
        "-listen",
        "127.0.0.1:0",
        "-service-addr",
        &ferry_app_arg,
    ];
    let (api_ferry, api_envoy, web_ferry) = tokio::join!(
        on_agent(&agent, &api_ferry_args),
        Envoy::start(&api_envoy_config),
        on_agent(&agent, &["-service", "web", "-upstream", "api:0"])
    );
    let web_envoy_config = EnvoyConfig::sidecar("web").upstream(Upstream::new(
        "api",
        &td,
        api_ferry.inbound(),
        &web_certs,
    ));
    let web_envoy = Envoy::start(&web_envoy_config).await;
    agent.set_instances("api", vec![Instance::sidecar(api_envoy.public())]);
    wait_instance(&web_ferry, "api", api_envoy.public()).await;

    assert_exchange(web_ferry.upstream("api"), &pattern(64 * 1024, 5)).await;
    assert_exchange(web_envoy.upstream("api"), &pattern(64 * 1024, 6)).await;
    assert_eq!((ferry_app.received(), envoy_app.received()), (65536, 65536));
    assert_eq!(api_ferry.metrics().authz_allowed.get(), 1);
    assert_eq!(api_envoy.stat("connect_authz.rbac.allowed").await, 1);

    // The same intentions refuse billing at both api sidecars.
    let billing = client_leaf(&pki, "billing");
    for (addr, what) in [
        (api_ferry.inbound(), "ferry"),
        (api_envoy.public(), "Envoy"),
    ] {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        if let Ok(mut tls) = raw_client(Some(&billing)).connect(any_name(), tcp).await {
            let back = round_trip(&mut tls, b"billing here").await;
            assert!(back.map_or(true, |b| b.is_empty()), "{what} let billing in");
        }
    }
    eventually("ferry to deny billing", || {
        api_ferry.metrics().authz_denied.get() == 1
    })
    .await;
    api_envoy
        .wait_stat("connect_authz.rbac.denied", |v| v == 1)
        .await;
    assert_eq!((ferry_app.received(), envoy_app.received()), (65536, 65536));
}

// ---------------------------------------------------------------------------
// The RBAC rules themselves.

/// The rules rendered from intentions have Consul's shapes (as in its
/// rbac goldens): default deny lists the allowed (no action: ALLOW),
/// default allow lists the denied (action DENY), intentions equal to the
/// default drop out, a wildcard excepts the exact sources above it, and
/// the trust domain is pinned with its dots escaped.
#[test]
fn rbac_rules_have_consul_shapes() {
    use serde_json::json;
    let td = "11111111-2222-4333-8444-555555555555.consul";
    let id = |svc: &str| {
        json!({ "authenticated": { "principal_name": { "safe_regex": { "regex":
            format!("^spiffe://11111111-2222-4333-8444-555555555555\\.consul/ns/default/dc/[^/]+/svc/{svc}$")
        } } } })
    };
    let policy = |principals: Vec<Value>| {
        json!({ "consul-intentions-layer4": {
            "permissions": [ { "any": true } ],
            "principals": principals,
        } })
    };
    assert_eq!(rbac_rules(td, "api", &[], false), json!({}));
    assert_eq!(
        rbac_rules(td, "api", &[], true),
        json!({ "action": "DENY" })
    );
    assert_eq!(
        rbac_rules(td, "api", &[Intention::allow("web", "api")], false),
        json!({ "policies": policy(vec![id("web")]) })
    );
    assert_eq!(
        rbac_rules(td, "api", &[Intention::deny("web", "api")], true),
        json!({ "action": "DENY", "policies": policy(vec![id("web")]) })
    );
    // An allow under default allow changes nothing; so does an intention
    // for another destination.
    let noise = [Intention::allow("web", "api"), Intention::deny("web", "db")];
    assert_eq!(
        rbac_rules(td, "api", &noise, true),
        json!({ "action": "DENY" })
    );
    // Default deny, `* allow` under `web deny`: any service but web.
    let ixns = [Intention::allow("*", "api"), Intention::deny("web", "api")];
    assert_eq!(
        rbac_rules(td, "api", &ixns, false),
        json!({ "policies": policy(vec![json!({ "and_ids": { "ids": [
            id("[^/]+"),
            { "not_id": id("web") },
        ] } })]) })
    );
    // An exact destination beats `*`, and L7 intentions count as deny.
    let ixns = [Intention::allow("web", "*"), Intention::l7("web", "api")];
    assert_eq!(rbac_rules(td, "api", &ixns, false), json!({}));
}
