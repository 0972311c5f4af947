//! ferry with a Consul agent's registrations: registration mode
//! (`-proxy-id`, `-sidecar-for`), where the identity, public listener, local
//! app, timeouts and upstreams come from a `connect-proxy` registration and
//! upstream changes apply while running; and self-registration
//! (`-register`). All against the in-process fake agent, over real sockets
//! and mTLS on 127.0.0.1.
//!
//! Registrations must name real ports (Consul refuses port 0 for a proxy),
//! so these tests use [`free_ports`]: ports bound on 127.0.0.1:0 and
//! released. Race: between the release and ferry's bind another process (or
//! an outgoing connection's ephemeral port) could take one; the kernel
//! cycles through ~28k ephemeral ports, so within the few milliseconds
//! involved this is very unlikely, and it would show as a bind error or a
//! "nothing listens" assertion failing, never as a silent pass.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::support::fake_agent::{AgentOpts, FakeAgent, Instance};
use crate::support::*;

/// `N` distinct ports where nothing listens now: all bound at once on
/// 127.0.0.1:0 (so they differ), then released. See the module comment for
/// the race.
pub(crate) async fn free_ports<const N: usize>() -> [u16; N] {
    let mut held = Vec::new();
    for _ in 0..N {
        held.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect();
    ports.try_into().expect("N ports")
}

/// A `connect-proxy` registration for `service`'s sidecar `id`, public
/// listener on `port`, local app on 127.0.0.1:`app_port`, no upstreams.
pub(crate) fn sidecar(id: &str, service: &str, port: u16, app_port: u16) -> Value {
    json!({
        "Kind": "connect-proxy",
        "ID": id,
        "Name": format!("{service}-sidecar-proxy"),
        "Address": "127.0.0.1",
        "Port": port,
        "Proxy": {
            "DestinationServiceName": service,
            "DestinationServiceID": format!("{service}-1"),
            "LocalServiceAddress": "127.0.0.1",
            "LocalServicePort": app_port,
        },
    })
}

/// One `Proxy.Upstreams[]` entry.
pub(crate) fn upstream(name: &str, port: u16) -> Value {
    json!({ "DestinationType": "service", "DestinationName": name, "LocalBindPort": port })
}

/// `registration` with `Proxy.Upstreams` set to `upstreams`.
pub(crate) fn with_upstreams(mut registration: Value, upstreams: &[Value]) -> Value {
    registration["Proxy"]["Upstreams"] = Value::Array(upstreams.to_vec());
    registration
}

/// ferry in registration mode, everything from the agent.
pub(crate) async fn registration_mode(agent: &FakeAgent, flag: &str, id: &str) -> Ferry {
    Ferry::start(&[flag, id, "-http-addr", &agent.url()]).await
}

/// A standalone ferry for `web` with one upstream to `target` at `instance`:
/// a mesh peer that checks the server presents `target`'s identity.
pub(crate) async fn mesh_client(pki: &Pki, target: &str, instance: SocketAddr) -> Ferry {
    pki.leaf("web");
    let dir = pki.dir_arg();
    StandaloneArgs::new("web", &dir)
        .upstream(target, &[instance])
        .start()
        .await
}

/// Parses `args` like the binary (empty environment) and returns the
/// configuration error's text.
fn config_error(args: &[&str]) -> String {
    let argv = std::iter::once("ferry").chain(args.iter().copied());
    let cli = ferry::cli::parse(argv).unwrap_or_else(|e| panic!("flags {args:?}: {e}"));
    match ferry::Config::from_args(&cli.proxy, &NO_ENV) {
        Ok(_) => panic!("{args:?} was accepted; it should be a configuration error"),
        Err(e) => e.to_string(),
    }
}

/// Parses `args` (they must be valid) and returns why `ferry::start` refused.
async fn start_error(args: &[&str]) -> String {
    let argv = std::iter::once("ferry").chain(args.iter().copied());
    let cli = ferry::cli::parse(argv).unwrap_or_else(|e| panic!("flags {args:?}: {e}"));
    let (config, _) =
        ferry::Config::from_args(&cli.proxy, &NO_ENV).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    match within("ferry::start", ferry::start(config, fast_watch())).await {
        Ok(_) => panic!("ferry started with {args:?}; it should have refused"),
        Err(e) => e.to_string(),
    }
}

/// Polls until connecting to `addr` is refused (a listener that has just
/// been told to stop closes its socket a moment later); panics after
/// DEADLINE.
async fn until_refused(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            other => {
                if Instant::now() > deadline {
                    panic!("{what}: {addr} still accepts after {DEADLINE:?}: {other:?}");
                }
                drop(other);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Sends `msg` on an open stream and reads exactly as many bytes back.
async fn echo_on<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    within("echo on an open connection", async {
        s.write_all(msg).await.expect("write");
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.expect("read echo");
        assert_eq!(got, msg);
    })
    .await
}

/// Waits until ferry's upstream `name` knows `addr` as an instance: ferry
/// binds upstream listeners before discovery has answered (see
/// `early_upstream_connection_waits_for_the_first_discovery_answer`).
pub(crate) async fn until_discovered(ferry: &Ferry, name: &str, addr: SocketAddr) {
    eventually(&format!("{name} instances discovered"), || {
        ferry
            .running
            .instances(name)
            .is_some_and(|list| list.iter().any(|i| i.addr == addr))
    })
    .await;
}

/// Waits until the agent has received `n` GETs of the registration after
/// `since` (taken after the change, so each of them saw it). ferry's reads
/// are sequential, so with `n` = 2 it has handled the answer to the first.
pub(crate) async fn registration_reads_after(
    agent: &FakeAgent,
    id: &str,
    since: Instant,
    n: usize,
) {
    let path = format!("/v1/agent/service/{id}");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let after = agent
            .calls()
            .iter()
            .filter(|c| c.method == "GET" && c.path == path && c.at > since)
            .count();
        if after >= n {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "ferry read {id} {after} times since the change, wanted {n}; calls:\n{}",
                agent.call_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `-proxy-id` alone is enough: the registration gives the identity (leaf
/// for `api`, authorize with target `api`), the local app, the public
/// listener and the upstream. The registration says `Address` 192.0.2.10
/// and `Port` P but `Proxy.Config.bind_address` 127.0.0.1 and `bind_port` B
/// (as Nomad registers a bridge-mode sidecar): ferry listens on
/// 127.0.0.1:B — nothing answers on P — and a `web` peer that
/// insists on `api`'s identity reaches the app through B. The upstream `db`
/// listens on its `LocalBindPort` and reaches the `db` instance the agent
/// lists, over mTLS.
#[tokio::test]
async fn proxy_id_serves_inbound_on_bind_port_and_the_registered_upstream() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = EchoServer::start().await;
    let db = TlsEchoServer::start(&pki, &pki.leaf("db")).await;
    agent.set_instances("db", vec![Instance::sidecar(db.addr)]);
    let [port, bind_port, db_port] = free_ports().await;
    let mut reg = sidecar("api-sidecar-proxy", "api", port, app.addr.port());
    // As Nomad does: Address/Port are the host's (192.0.2.10 is a
    // documentation address, not bindable here), Config holds the bind.
    reg["Address"] = json!("192.0.2.10");
    reg["Proxy"]["Config"] = json!({ "bind_address": "127.0.0.1", "bind_port": bind_port });
    agent.register(with_upstreams(reg, &[upstream("db", db_port)]));

    let ferry = registration_mode(&agent, "-proxy-id", "api-sidecar-proxy").await;

    assert_eq!(
        ferry.inbound(),
        loopback(bind_port),
        "Proxy.Config.bind_address/bind_port override Address/Port"
    );
    let on_port = TcpStream::connect(loopback(port)).await;
    assert!(
        on_port.is_err(),
        "nothing may listen on the registered Port {port}: {on_port:?}"
    );
    assert_eq!(ferry.running.upstream_names(), ["db"]);
    assert_eq!(ferry.upstream("db"), loopback(db_port));
    assert!(agent.count("GET", "/v1/agent/connect/ca/leaf/api") >= 1);
    assert_eq!(
        agent.count("GET", "/v1/agent/connect/ca/leaf/"),
        agent.count("GET", "/v1/agent/connect/ca/leaf/api"),
        "the leaf is for Proxy.DestinationServiceName; calls:\n{}",
        agent.call_log()
    );

    // Inbound: mTLS from web, identity api checked by the client.
    let web = mesh_client(&pki, "api", loopback(bind_port)).await;
    assert_echo(web.upstream("api"), b"web to api through bind_port").await;
    assert_eq!(app.counts.accepted(), 1, "the registered local app");
    let authz = agent
        .wait_for_call("POST", "/v1/agent/connect/authorize", DEADLINE)
        .await;
    let body: Value = serde_json::from_str(&authz.body).expect("authorize body");
    assert_eq!(body["Target"], "api");
    assert_eq!(body["ClientCertURI"], pki.uri("web").as_str());

    // Upstream: the registered LocalBindPort reaches db over mTLS.
    until_discovered(&ferry, "db", db.addr).await;
    assert_echo(loopback(db_port), b"api to db").await;
    assert_eq!(db.counts.accepted(), 1, "the instance the agent lists");
    assert!(agent.count("GET", "/v1/health/connect/db") >= 1);
}

/// `-sidecar-for <service-id>` picks, among all local services, the one
/// `connect-proxy` whose `Proxy.DestinationServiceID` equals the ID
/// ignoring case (here registered as `API-1`, asked for as `api-1`), not
/// the parent service itself nor another service's sidecar, and then runs
/// from that registration.
#[tokio::test]
async fn sidecar_for_finds_the_one_proxy_of_the_service_ignoring_case() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = EchoServer::start().await;
    let [api_port, web_port] = free_ports().await;
    agent.register(json!({ "ID": "api-1", "Name": "api", "Port": app.addr.port() }));
    let mut api = sidecar("api-1-sidecar-proxy", "api", api_port, app.addr.port());
    api["Proxy"]["DestinationServiceID"] = json!("API-1");
    agent.register(api);
    agent.register(sidecar("web-1-sidecar-proxy", "web", web_port, 9));

    let ferry = registration_mode(&agent, "-sidecar-for", "api-1").await;

    assert_eq!(ferry.inbound(), loopback(api_port), "api's sidecar's Port");
    assert_eq!(agent.count("GET", "/v1/agent/services"), 1);
    assert!(agent.count("GET", "/v1/agent/service/api-1-sidecar-proxy") >= 1);
    assert_eq!(
        agent.count("GET", "/v1/agent/service/web-1-sidecar-proxy"),
        0,
        "calls:\n{}",
        agent.call_log()
    );
    let web = mesh_client(&pki, "api", ferry.inbound()).await;
    assert_echo(web.upstream("api"), b"found by -sidecar-for").await;
    assert_eq!(app.counts.accepted(), 1);
}

/// `-sidecar-for` with no matching proxy, or with two (IDs differing only
/// in case still match), makes `ferry::start` fail with Consul's messages;
/// the second lists the candidates for `-proxy-id`. It fails before asking
/// for any certificate.
#[tokio::test]
async fn sidecar_for_refuses_no_proxy_and_two_proxies() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let [p1, p2, p3] = free_ports().await;
    agent.register(json!({ "ID": "api-1", "Name": "api", "Port": 9 }));
    agent.register(json!({ "ID": "api-2", "Name": "api", "Port": 9 }));
    let mut one = sidecar("api-1-sidecar-proxy", "api", p1, 9);
    one["Proxy"]["DestinationServiceID"] = json!("api-1");
    let mut two = sidecar("api-1-other-proxy", "api", p2, 9);
    two["Proxy"]["DestinationServiceID"] = json!("Api-1");
    agent.register(one);
    agent.register(two);
    // A proxy for another service is not one of api-2's.
    agent.register(sidecar("web-1-sidecar-proxy", "web", p3, 9));
    let url = agent.url();

    let none = start_error(&["-sidecar-for", "api-2", "-http-addr", &url]).await;
    assert_eq!(
        none,
        "proxy registration: No sidecar proxy registered for api-2"
    );
    let unknown = start_error(&["-sidecar-for", "nope", "-http-addr", &url]).await;
    assert_eq!(
        unknown,
        "proxy registration: No sidecar proxy registered for nope"
    );
    let many = start_error(&["-sidecar-for", "api-1", "-http-addr", &url]).await;
    assert!(
        many.starts_with("proxy registration: More than one sidecar proxy registered for api-1"),
        "{many}"
    );
    assert!(
        many.contains("api-1-other-proxy") && many.contains("api-1-sidecar-proxy"),
        "lists both candidates: {many}"
    );
    assert_eq!(
        agent.count("GET", "/v1/agent/connect/ca/leaf"),
        0,
        "no certificate asked for; calls:\n{}",
        agent.call_log()
    );
}

/// Upstream changes in the registration apply while ferry runs: an added
/// upstream starts listening and works; a removed one stops accepting new
/// connections while a connection opened through it before keeps working;
/// one whose `LocalBindPort` changes closes the old port and works on the
/// new one.
#[tokio::test]
async fn upstream_changes_in_the_registration_apply_live() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = EchoServer::start().await;
    let db = TlsEchoServer::start(&pki, &pki.leaf("db")).await;
    let cache = TlsEchoServer::start(&pki, &pki.leaf("cache")).await;
    agent.set_instances("db", vec![Instance::sidecar(db.addr)]);
    agent.set_instances("cache", vec![Instance::sidecar(cache.addr)]);
    let [port, db_port, cache_port, cache_port2] = free_ports().await;
    let base = sidecar("api-sidecar-proxy", "api", port, app.addr.port());
    agent.register(with_upstreams(base.clone(), &[upstream("db", db_port)]));
    let ferry = registration_mode(&agent, "-proxy-id", "api-sidecar-proxy").await;
    assert_eq!(ferry.running.upstream_names(), ["db"]);
    until_discovered(&ferry, "db", db.addr).await;

    // A connection through db, open across the changes below.
    let mut open = TcpStream::connect(loopback(db_port))
        .await
        .expect("connect db");
    echo_on(&mut open, b"before").await;

    // Added.
    agent.register(with_upstreams(
        base.clone(),
        &[upstream("db", db_port), upstream("cache", cache_port)],
    ));
    eventually("cache upstream added", || {
        ferry.running.upstream("cache") == Some(loopback(cache_port))
    })
    .await;
    until_discovered(&ferry, "cache", cache.addr).await;
    assert_echo(loopback(cache_port), b"to the new upstream").await;
    assert_eq!(cache.counts.accepted(), 1);

    // Removed: the port stops accepting; the open connection carries on.
    agent.register(with_upstreams(
        base.clone(),
        &[upstream("cache", cache_port)],
    ));
    eventually("db upstream removed", || {
        ferry.running.upstream_names() == ["cache"]
    })
    .await;
    until_refused(loopback(db_port), "removed upstream db").await;
    echo_on(&mut open, b"after removal").await;
    open.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    within("open connection ends cleanly", open.read_to_end(&mut rest))
        .await
        .expect("read to end");
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(db.counts.accepted(), 1, "no new connection reached db");

    // Moved: the new port is in the map only after the old one has closed.
    agent.register(with_upstreams(base, &[upstream("cache", cache_port2)]));
    eventually("cache moved to its new port", || {
        ferry.running.upstream("cache") == Some(loopback(cache_port2))
    })
    .await;
    until_discovered(&ferry, "cache", cache.addr).await;
    let old = TcpStream::connect(loopback(cache_port)).await;
    assert!(old.is_err(), "old cache port still accepts: {old:?}");
    assert_echo(loopback(cache_port2), b"on the new port").await;
    assert_eq!(ferry.running.upstream_names(), ["cache"]);
}

/// An upstream listener is bound (at start, or when a registration adds
/// it) before the first discovery answer for it has arrived. A connection
/// from the app in that window should wait for the instances (within the
/// upstream deadline), as it would with Consul's built-in proxy (which
/// resolves per connection) or Envoy (whose listeners wait for their
/// clusters to warm). Here the health query is held by the agent for a
/// moment: ferry starts, the app connects and sends, then the agent
/// answers; the bytes must come back from db.
#[tokio::test]
async fn early_upstream_connection_waits_for_the_first_discovery_answer() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = EchoServer::start().await;
    let db = TlsEchoServer::start(&pki, &pki.leaf("db")).await;
    agent.set_instances("db", vec![Instance::sidecar(db.addr)]);
    let [port, db_port] = free_ports().await;
    let base = sidecar("api-sidecar-proxy", "api", port, app.addr.port());
    agent.register(with_upstreams(base, &[upstream("db", db_port)]));
    agent.stall("/v1/health/connect/db", true);
    let ferry = registration_mode(&agent, "-proxy-id", "api-sidecar-proxy").await;
    agent
        .wait_for_call("GET", "/v1/health/connect/db", DEADLINE)
        .await;
    assert_eq!(
        ferry.running.instances("db").map(|i| i.len()),
        Some(0),
        "discovery is held: no instance known yet"
    );

    let mut early = TcpStream::connect(loopback(db_port))
        .await
        .expect("connect");
    early.write_all(b"early").await.expect("write");
    eventually("ferry accepted the early connection", || {
        ferry.metrics().upstream_accepted.get() == 1
    })
    .await;
    agent.stall("/v1/health/connect/db", false);
    let mut got = Vec::new();
    let read = within("early connection", async {
        early.shutdown().await?;
        early.read_to_end(&mut got).await
    })
    .await;
    assert!(
        read.is_ok() && got == b"early",
        "BUG: a connection made before the first discovery answer was closed \
         ({read:?}, got {got:?}; upstream_unavailable = {}) instead of waiting \
         for the instances",
        ferry.metrics().upstream_unavailable.get()
    );
    assert_eq!(db.counts.accepted(), 1);
}

/// A local app that never answers: a listener with backlog 0 whose one
/// queue slot is taken (Linux then drops further SYNs, so a connect hangs
/// instead of being refused). Keep the returned listener and filler alive.
/// The probe shows a connect really hangs here.
async fn black_hole() -> (TcpListener, TcpStream, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(loopback(0)).expect("bind");
    let listener = socket.listen(0).expect("listen");
    let at = listener.local_addr().expect("addr");
    let filler = TcpStream::connect(at).await.expect("fill the queue");
    let probe = tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(at)).await;
    assert!(
        probe.is_err(),
        "a connect to the black hole should hang: {probe:?}"
    );
    (listener, filler, at)
}

/// Opens an mTLS connection as `web` to `inbound` and returns how long after
/// the handshake ferry closed it (it dials the local app only after the
/// handshake and authorization).
async fn time_to_close(pki: &Pki, inbound: SocketAddr) -> Duration {
    let web = pki.leaf("web");
    let tcp = TcpStream::connect(inbound).await.expect("connect");
    let mut tls = within("handshake", raw_client(Some(&web)).connect(any_name(), tcp))
        .await
        .expect("handshake");
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = within("ferry closes the connection", tls.read(&mut buf)).await;
    assert!(matches!(n, Ok(0) | Err(_)), "the app cannot answer: {n:?}");
    started.elapsed()
}

/// `Proxy.Config.local_connect_timeout_ms` is honoured whether it arrives
/// as a string (`"250"`) or a float (`250.0`, what Go sends): with the local
/// app a black hole, the inbound connection fails in the connect-local
/// phase after about 250 ms, well before the 1 s default — which the
/// control, a registration without the setting, shows is what applies
/// otherwise.
#[tokio::test]
async fn local_connect_timeout_from_proxy_config_is_read_leniently() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let (_hole, _filler, hole) = black_hole().await;
    let [p1, p2, p3] = free_ports().await;
    let cases: [(&str, u16, Option<Value>); 3] = [
        ("as-string", p1, Some(json!("250"))),
        ("as-float", p2, Some(json!(250.0))),
        ("default", p3, None),
    ];
    let mut ferries = Vec::new();
    for (id, port, timeout) in cases {
        let mut reg = sidecar(id, "api", port, hole.port());
        if let Some(t) = timeout {
            reg["Proxy"]["Config"] = json!({ "local_connect_timeout_ms": t });
        }
        agent.register(reg);
        ferries.push((id, registration_mode(&agent, "-proxy-id", id).await));
    }

    let (s, f, d) = tokio::join!(
        time_to_close(&pki, ferries[0].1.inbound()),
        time_to_close(&pki, ferries[1].1.inbound()),
        time_to_close(&pki, ferries[2].1.inbound()),
    );
    for (id, ferry) in &ferries {
        assert_eq!(
            (
                ferry.metrics().authz_allowed.get(),
                ferry.metrics().local_connect_failed.get()
            ),
            (1, 1),
            "{id}: allowed, then the local app could not be reached"
        );
    }
    for (id, took) in [("as-string", s), ("as-float", f)] {
        assert!(
            took >= Duration::from_millis(240) && took < Duration::from_millis(900),
            "{id}: closed after {took:?}, expected about 250 ms"
        );
    }
    assert!(
        d >= Duration::from_millis(950),
        "default: closed after {d:?}, expected the 1 s default"
    );
}

/// When the registration stops being usable — deregistered (404), or
/// registered again as something that is not a `connect-proxy` — ferry keeps
/// serving on its last good configuration: inbound and upstream connections
/// still work and the upstream set is unchanged. Once a usable registration
/// is back, its changes apply again.
#[tokio::test]
async fn unusable_registration_keeps_the_last_good_config() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = EchoServer::start().await;
    let db = TlsEchoServer::start(&pki, &pki.leaf("db")).await;
    agent.set_instances("db", vec![Instance::sidecar(db.addr)]);
    let [port, db_port, db_port2] = free_ports().await;
    let id = "api-sidecar-proxy";
    let base = sidecar(id, "api", port, app.addr.port());
    agent.register(with_upstreams(base.clone(), &[upstream("db", db_port)]));
    let ferry = registration_mode(&agent, "-proxy-id", id).await;
    until_discovered(&ferry, "db", db.addr).await;
    let web = mesh_client(&pki, "api", ferry.inbound()).await;
    assert_echo(web.upstream("api"), b"first").await;
    assert_echo(loopback(db_port), b"first").await;

    // Deregistered: the agent answers 404.
    assert!(agent.deregister(id));
    let gone = Instant::now();
    registration_reads_after(&agent, id, gone, 2).await;
    assert_eq!(ferry.running.upstream_names(), ["db"]);
    assert_echo(web.upstream("api"), b"after the 404").await;
    assert_echo(loopback(db_port), b"after the 404").await;

    // Registered again, but as a typical service.
    agent.register(json!({ "ID": id, "Name": "api", "Port": port }));
    let changed = Instant::now();
    registration_reads_after(&agent, id, changed, 2).await;
    assert_eq!(
        agent.service(id).expect("registered")["Kind"],
        Value::Null,
        "the fake now lists a typical service"
    );
    assert_eq!(ferry.running.upstream_names(), ["db"]);
    assert_echo(web.upstream("api"), b"after the kind change").await;
    assert_echo(loopback(db_port), b"after the kind change").await;
    assert_eq!(app.counts.accepted(), 3);
    assert_eq!(db.counts.accepted(), 3);

    // A usable registration again: its upstream change applies.
    agent.register(with_upstreams(base, &[upstream("db", db_port2)]));
    eventually("db moved once the registration is usable", || {
        ferry.running.upstream("db") == Some(loopback(db_port2))
    })
    .await;
    until_discovered(&ferry, "db", db.addr).await;
    assert_echo(loopback(db_port2), b"usable again").await;
}

/// `-register` registers `<service>-proxy-<register-id>` as Consul's proxy
/// does: Kind connect-proxy, Name `web-proxy`, the bound address and port
/// (127.0.0.1 is registered as is; only any-addresses are left out), and a
/// passing 30 s TTL check `<ID>-ttl`. On shutdown it deregisters first: with
/// a connection open and a 5 s grace, the deregister call reaches the agent
/// (and the service is gone) while the connection is still open and working;
/// the drain ends only when the test closes it.
#[tokio::test]
async fn register_registers_with_a_ttl_check_and_deregisters_before_draining() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = EchoServer::start().await;
    let app_addr = app.addr_arg();
    let url = agent.url();
    let ferry = Ferry::start(&[
        "-service",
        "web",
        "-listen",
        "127.0.0.1:0",
        "-service-addr",
        &app_addr,
        "-register",
        "-register-id",
        "r1",
        "-http-addr",
        &url,
    ])
    .await;
    let inbound = ferry.inbound();

    assert_eq!(agent.service_ids(), ["web-proxy-r1"]);
    let svc = agent.service("web-proxy-r1").expect("registered");
    assert_eq!(svc["Kind"], "connect-proxy");
    assert_eq!(svc["ID"], "web-proxy-r1");
    assert_eq!(svc["Service"], "web-proxy");
    assert_eq!(svc["Address"], "127.0.0.1");
    assert_eq!(svc["Port"], inbound.port());
    assert_eq!(svc["Proxy"]["DestinationServiceName"], "web");
    let check = agent.check("web-proxy-r1-ttl").expect("TTL check");
    assert_eq!(
        (check.kind.as_str(), check.status.as_str()),
        ("ttl", "passing")
    );
    assert_eq!(check.ttl, Some(Duration::from_secs(30)));
    assert_eq!(check.service_id, "web-proxy-r1");
    assert_eq!(check.name, "proxy heartbeat");
    let reg = agent
        .wait_for_call("PUT", "/v1/agent/service/register", DEADLINE)
        .await;
    assert_eq!(reg.param("replace-existing-checks"), Some("true".into()));

    // A connection in flight through the registered listener.
    let client = pki.leaf("frontend");
    let tcp = TcpStream::connect(inbound).await.expect("connect");
    let mut tls = within(
        "handshake",
        raw_client(Some(&client)).connect(any_name(), tcp),
    )
    .await
    .expect("handshake");
    echo_on(&mut tls, b"before shutdown").await;

    let shutdown = tokio::spawn(ferry.running.shutdown(Duration::from_secs(5)));
    let dereg = agent
        .wait_for_call("PUT", "/v1/agent/service/deregister/web-proxy-r1", DEADLINE)
        .await;
    assert!(agent.service("web-proxy-r1").is_none(), "deregistered");
    assert!(agent.check("web-proxy-r1-ttl").is_none(), "check removed");
    assert!(
        !shutdown.is_finished(),
        "still draining the open connection"
    );
    echo_on(&mut tls, b"still served after deregistration").await;
    until_refused(inbound, "the listener after shutdown began").await;

    let closed_at = Instant::now();
    tls.shutdown().await.expect("close_notify");
    let mut rest = Vec::new();
    within("the connection ends", tls.read_to_end(&mut rest))
        .await
        .expect("read to end");
    let clean = within("shutdown", shutdown).await.expect("shutdown task");
    assert!(clean, "the open connection finished on its own");
    assert!(
        dereg.at < closed_at,
        "deregistered {:?} before the connection closed",
        closed_at - dereg.at
    );
    assert_eq!(agent.count("PUT", "/v1/agent/service/deregister"), 1);
}

/// `-register` needs an agent and a public listener: with `-certs`, or
/// without `-listen`, the configuration is refused with a message naming
/// the problem. In registration mode it is ignored, with a warning.
#[tokio::test]
async fn register_needs_an_agent_and_a_listener() {
    let pki = Pki::new();
    pki.leaf("web");
    let dir = pki.dir_arg();
    let with_certs = config_error(
        &StandaloneArgs::new("web", &dir)
            .listen("127.0.0.1:9")
            .extra(&["-register"])
            .args(),
    );
    assert_eq!(
        with_certs,
        "-register needs a Consul agent; it cannot be used with -certs"
    );
    let no_listen = config_error(&[
        "-service",
        "web",
        "-upstream",
        "db:127.0.0.1:0",
        "-register",
        "-http-addr",
        "http://127.0.0.1:8500",
    ]);
    assert_eq!(
        no_listen,
        "-register needs -listen: the registration advertises the public listener"
    );

    let argv = [
        "ferry",
        "-proxy-id",
        "p1",
        "-register",
        "-http-addr",
        "http://127.0.0.1:8500",
    ];
    let cli = ferry::cli::parse(argv).expect("flags");
    let (config, warnings) = ferry::Config::from_args(&cli.proxy, &NO_ENV).expect("config");
    assert!(config.register.is_none());
    assert!(
        warnings.iter().any(|w| w.contains("-register")),
        "{warnings:?}"
    );
}

/// When the agent loses the registration (here deregistered behind
/// ferry's back right after start), the next heartbeat (every 100 ms with
/// the test timing, 10 s in production)
/// (`PUT /v1/agent/check/pass/<ID>-ttl`) gets a 404 and ferry registers
/// again, with its TTL check passing.
#[tokio::test]
async fn heartbeat_registers_again_after_the_agent_lost_the_registration() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = EchoServer::start().await;
    let app_addr = app.addr_arg();
    let url = agent.url();
    let ferry = Ferry::start(&[
        "-service",
        "web",
        "-listen",
        "127.0.0.1:0",
        "-service-addr",
        &app_addr,
        "-register",
        "-register-id",
        "r1",
        "-http-addr",
        &url,
    ])
    .await;
    assert!(agent.deregister("web-proxy-r1"));

    let beat = agent
        .wait_for_call("PUT", "/v1/agent/check/pass/web-proxy-r1-ttl", DEADLINE)
        .await;
    assert_eq!(beat.param("note"), Some("ferry is serving".into()));
    agent
        .wait_for_calls("PUT", "/v1/agent/service/register", 2, DEADLINE)
        .await;
    let svc = agent.service("web-proxy-r1").expect("registered again");
    assert_eq!(svc["Port"], ferry.inbound().port());
    let check = agent.check("web-proxy-r1-ttl").expect("check again");
    assert_eq!(check.status, "passing");
}
