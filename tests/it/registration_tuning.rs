//! Each upstream's `Config` in a proxy registration changes what ferry does
//! for that upstream, at start and when the registration changes while
//! ferry runs: `limits.max_connections` caps local connections,
//! `passive_health_check` ejects failing instances, `connect_timeout_ms`
//! bounds finding an instance. Both shapes the agent delivers are used:
//! snake_case as registered, and Go field names with nanoseconds (merged
//! from `service-defaults`).

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::registration::{
    free_ports, registration_mode, sidecar, until_discovered, upstream, with_upstreams,
};
use crate::support::fake_agent::{AgentOpts, FakeAgent, Instance};
use crate::support::*;

/// `upstream(name, port)` with `Config` set.
fn tuned(name: &str, port: u16, config: Value) -> Value {
    let mut u = upstream(name, port);
    u["Config"] = config;
    u
}

/// Whether ferry closes a new local connection at once (a refusal by the
/// connection cap) rather than carrying it.
async fn refused_at_once(port: u16) -> bool {
    let mut s = TcpStream::connect(loopback(port)).await.expect("connect");
    let _ = s.write_all(b"x").await;
    let mut buf = [0u8; 1];
    matches!(
        within("refused connection closes", s.read(&mut buf)).await,
        Ok(0) | Err(_)
    )
}

/// `limits.max_connections` = 1 (as registered): a second local
/// connection while the first is open is closed at once, and the first
/// keeps working. Changed live to `MaxConnections` = 2 from a
/// `service-defaults` entry (the merged shape), two connections are
/// carried at once.
#[tokio::test]
async fn max_connections_caps_local_connections_and_applies_live() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let db = TlsEchoServer::start(&pki, &pki.leaf("db")).await;
    agent.set_instances("db", vec![Instance::sidecar(db.addr)]);
    let [port, db_port] = free_ports().await;
    let base = sidecar("api-sidecar-proxy", "api", port, 9);
    agent.register(with_upstreams(
        base.clone(),
        &[tuned(
            "db",
            db_port,
            json!({"limits": {"max_connections": 1}}),
        )],
    ));
    let ferry = registration_mode(&agent, "-proxy-id", "api-sidecar-proxy").await;
    until_discovered(&ferry, "db", db.addr).await;

    let mut first = TcpStream::connect(loopback(db_port))
        .await
        .expect("connect");
    echo_once(&mut first, b"first").await;
    assert!(
        refused_at_once(db_port).await,
        "a second connection over max_connections 1"
    );
    echo_once(&mut first, b"first still works").await;
    drop(first);

    // From a service-defaults entry, merged by the agent (Go names).
    agent.register_with_service_defaults(
        with_upstreams(base, &[upstream("db", db_port)]),
        &[("db", json!({"Limits": {"MaxConnections": 2}}))],
    );
    // The changed upstream restarts with a fresh limit: two at once are
    // carried, a third is refused.
    // (Retried until it holds: a connection made just before the restart
    // holds a slot of the old listener.)
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let (Some(_a), Some(_b)) = (carried(db_port).await, carried(db_port).await) {
            if refused_at_once(db_port).await {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "MaxConnections 2 never applied: not two carried and a third refused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A connection to `port` that carries a byte both ways (None also while
/// the listener is restarting).
async fn carried(port: u16) -> Option<TcpStream> {
    let mut s = TcpStream::connect(loopback(port)).await.ok()?;
    s.write_all(b"x").await.ok()?;
    let mut got = [0u8; 1];
    match within("echo", s.read(&mut got)).await {
        Ok(1) => Some(s),
        _ => None,
    }
}

/// `passive_health_check.max_failures` = 1 ejects an instance after one
/// failed connection; without it the global `-eject-after` (3) applies and
/// one failure does not eject. Applied live: the changed upstream starts
/// again with fresh health and the new policy.
#[tokio::test]
async fn passive_health_check_max_failures_ejects_and_applies_live() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let dead = dead_addr().await;
    agent.set_instances("db", vec![Instance::sidecar(dead)]);
    let [port, db_port] = free_ports().await;
    let base = sidecar("api-sidecar-proxy", "api", port, 9);
    agent.register(with_upstreams(base.clone(), &[upstream("db", db_port)]));
    let ferry = registration_mode(&agent, "-proxy-id", "api-sidecar-proxy").await;
    until_discovered(&ferry, "db", dead).await;

    assert!(refused_at_once(db_port).await, "no instance to reach");
    let state = &ferry.running.instances("db").expect("db")[0];
    assert_eq!(state.consecutive_failures, 1);
    assert!(
        !state.ejected,
        "the global -eject-after 3 applies: {state:?}"
    );

    // From a service-defaults entry: the agent merges it in with Go names
    // and nanoseconds.
    agent.register_with_service_defaults(
        with_upstreams(base, &[upstream("db", db_port)]),
        &[(
            "db",
            json!({"PassiveHealthCheck": {"Interval": "1s", "MaxFailures": 1, "BaseEjectionTime": "60s"}}),
        )],
    );
    eventually("db restarted with fresh health", || {
        ferry
            .running
            .instances("db")
            .is_some_and(|l| l.len() == 1 && l[0].consecutive_failures == 0)
    })
    .await;
    assert!(refused_at_once(db_port).await, "still no instance to reach");
    let state = &ferry.running.instances("db").expect("db")[0];
    assert!(
        state.ejected,
        "max_failures 1 ejects after one failure: {state:?}"
    );
}

/// `connect_timeout_ms` bounds finding an instance: against an instance
/// that accepts TCP and never answers the TLS handshake, a local
/// connection is given up after about 300 ms, not the default 10 s.
#[tokio::test]
async fn connect_timeout_ms_bounds_the_attempt() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    agent.set_instances("db", vec![Instance::sidecar(silent_addr)]);
    let [port, db_port] = free_ports().await;
    agent.register(with_upstreams(
        sidecar("api-sidecar-proxy", "api", port, 9),
        &[tuned("db", db_port, json!({"connect_timeout_ms": "300"}))],
    ));
    let ferry = registration_mode(&agent, "-proxy-id", "api-sidecar-proxy").await;
    until_discovered(&ferry, "db", silent_addr).await;

    let started = Instant::now();
    let mut s = TcpStream::connect(loopback(db_port))
        .await
        .expect("connect");
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    let took = started.elapsed();
    assert!(
        matches!(r, Ok(Ok(0) | Err(_))),
        "closed, not carried: {r:?}"
    );
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "given up after {took:?}, wanted about 300 ms"
    );
    holder.abort();
}

/// `Proxy.Config.max_inbound_connections` = 1 caps established inbound
/// connections: while one mesh connection is open, a second is closed,
/// and the first keeps working.
#[tokio::test]
async fn max_inbound_connections_caps_the_public_listener() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = EchoServer::start().await;
    let [port] = free_ports().await;
    let mut reg = sidecar("api-sidecar-proxy", "api", port, app.addr.port());
    reg["Proxy"]["Config"] = json!({ "max_inbound_connections": "1" });
    agent.register(reg);
    let ferry = registration_mode(&agent, "-proxy-id", "api-sidecar-proxy").await;
    let web = crate::registration::mesh_client(&pki, "api", ferry.inbound()).await;

    let mut first = TcpStream::connect(web.upstream("api"))
        .await
        .expect("connect");
    echo_once(&mut first, b"first").await;
    let mut second = TcpStream::connect(web.upstream("api"))
        .await
        .expect("connect");
    let _ = second.write_all(b"x").await;
    let mut buf = [0u8; 1];
    let r = within("second closed", second.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "over max_inbound_connections: {r:?}"
    );
    echo_once(&mut first, b"first still works").await;
    assert_eq!(app.counts.accepted(), 1, "the second never reached the app");
}

/// A malformed value is logged once per change of the registration, not
/// on every read: the real binary follows a registration whose
/// `local_connect_timeout_ms` is `"soon"`; an unrelated change (a tag) is
/// read and logs nothing new; changing the value to `"later"` logs again.
#[tokio::test]
async fn a_malformed_value_is_logged_once_per_change() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let [port] = free_ports().await;
    let with = |value: &str, tag: &str| {
        let mut reg = sidecar("api-sidecar-proxy", "api", port, 9);
        reg["Tags"] = json!([tag]);
        reg["Proxy"]["Config"] = json!({ "local_connect_timeout_ms": value });
        reg
    };
    agent.register(with("soon", "a"));
    let url = agent.url();
    let mut ferry = FerryProcess::start(&["-proxy-id", "api-sidecar-proxy", "-http-addr", &url]);
    ferry.line(r#"local_connect_timeout_ms: "soon""#).await;

    let since = Instant::now();
    agent.register(with("soon", "b"));
    // A read issued after the change: ferry handled the answer before it.
    crate::registration::registration_reads_after(&agent, "api-sidecar-proxy", since, 1).await;
    agent.register(with("later", "b"));
    ferry.line(r#"local_connect_timeout_ms: "later""#).await;

    let lines = ferry.stop();
    let noted: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("local_connect_timeout_ms"))
        .collect();
    assert_eq!(noted.len(), 2, "once per change: {noted:#?}");
}
