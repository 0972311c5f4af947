//! Exposed paths (`Proxy.Expose.Paths`): the agent's HTTP check reaches the
//! app's `/health` through ferry's plain-HTTP listener, and nothing else
//! does: other paths are 404 and other methods 405 without the app seeing
//! them; slow and oversized requests are cut off; HTTP/1.1 and h2c both
//! work, towards the listener and towards the app. Also the Envoy-style
//! metrics and stats listeners (`envoy_prometheus_bind_addr`,
//! `envoy_stats_bind_addr`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::registration::{free_ports, registration_mode, sidecar};
use crate::support::fake_agent::{expose_check, http_check, AgentOpts, FakeAgent, Health};
use crate::support::*;

/// A local app answering HTTP/1.1 and h2c: `/health` with the status in
/// `status`; every request is recorded (path and query).
struct App {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    async fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("addr");
        let status = Arc::new(AtomicU16::new(200));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (st, sn) = (status.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (st, sn) = (st.clone(), sn.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let pq = req
                            .uri()
                            .path_and_query()
                            .map_or("", |p| p.as_str())
                            .to_string();
                        sn.lock().unwrap().push(pq);
                        let code = st.load(Ordering::SeqCst);
                        async move {
                            let mut r =
                                hyper::Response::new(Full::new(Bytes::from("app says hi\n")));
                            *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        App {
            addr,
            status,
            seen,
            task,
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/1.1 request on a fresh connection; the status code.
async fn status_of(to: SocketAddr, method: &str, path: &str) -> u16 {
    let mut s = TcpStream::connect(to).await.expect("connect");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    within("answer", s.read_to_end(&mut got))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&got);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

/// The sidecar for `api` with the public listener on 127.0.0.1 and
/// `paths` exposed (and `config` merged into Proxy.Config).
fn exposing(port: u16, app_port: u16, paths: serde_json::Value) -> serde_json::Value {
    let mut reg = sidecar("api-sidecar-proxy", "api", port, app_port);
    reg["Proxy"]["Config"] = json!({ "bind_address": "127.0.0.1" });
    // The registration's own spelling, as an HCL service definition has it.
    reg["Proxy"]["Expose"] = json!({ "paths": paths });
    reg
}

/// The agent-style HTTP check through the exposed listener follows the
/// app's `/health`: passing on 200, critical on 500 and when the app is
/// gone. Other paths (including prefixes and neighbours of the exposed
/// one) are 404, POST is 405, and the app never sees any of them; the
/// query string goes along. Requests are counted per path and status.
#[tokio::test]
async fn exposed_check_follows_the_app_and_nothing_else_reaches_it() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = App::start().await;
    let [port] = free_ports().await;
    // The listener port the agent would pick for an exposed check of
    // http://127.0.0.1:APP/health (the first of the expose range may be
    // taken on a shared machine, so a free port stands in for it).
    let (_, mut path) = expose_check(
        &format!("http://127.0.0.1:{}/health", app.addr.port()),
        "127.0.0.1",
        0,
    )
    .expect("an exposable check");
    let [listener_port] = free_ports().await;
    path["ListenerPort"] = json!(listener_port);
    agent.register(exposing(port, app.addr.port(), json!([path])));
    let ferry = registration_mode(&agent, "-proxy-id", "api-sidecar-proxy").await;
    let exposed = loopback(listener_port);
    let check_url = format!("http://{exposed}/health");

    assert_eq!(http_check(&check_url, DEADLINE).await, Health::Passing);
    app.status.store(500, Ordering::SeqCst);
    assert_eq!(http_check(&check_url, DEADLINE).await, Health::Critical);
    app.status.store(200, Ordering::SeqCst);
    assert_eq!(status_of(exposed, "GET", "/health?verbose=1").await, 200);
    assert_eq!(status_of(exposed, "HEAD", "/health").await, 200);
    let mut head = TcpStream::connect(exposed).await.expect("connect");
    head.write_all(b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    within("HEAD answer", head.read_to_end(&mut got))
        .await
        .expect("read");
    let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(
        got.contains("content-length: 12\r\n"),
        "HEAD keeps the app's length: {got:?}"
    );
    let reached = app.seen().len();
    assert_eq!(reached, 5);
    assert_eq!(app.seen()[2], "/health?verbose=1", "the query goes along");

    for p in [
        "/",
        "/healthz",
        "/health/",
        "/health/../admin",
        "/other",
        "/HEALTH",
    ] {
        assert_eq!(status_of(exposed, "GET", p).await, 404, "{p}");
    }
    assert_eq!(status_of(exposed, "POST", "/health").await, 405);
    assert_eq!(status_of(exposed, "DELETE", "/health").await, 405);
    assert_eq!(
        app.seen().len(),
        reached,
        "none of those reached the app: {:?}",
        app.seen()
    );

    let text = ferry.metrics().render();
    assert!(
        text.contains(r#"ferry_expose_requests_total{path="/health",code="200"} 4"#),
        "{text}"
    );
    assert!(
        text.contains(r#"ferry_expose_requests_total{path="other",code="404"} 6"#),
        "{text}"
    );

    drop(app);
    assert_eq!(
        http_check(&check_url, DEADLINE).await,
        Health::Critical,
        "the app is down"
    );
}

/// A client that sends half a request head and stops is disconnected
/// after the header timeout (3 s); one whose head is larger than the bound
/// is refused. Neither reaches the app.
#[tokio::test]
async fn slow_and_oversized_requests_are_cut_off() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = App::start().await;
    let [port, listener_port] = free_ports().await;
    agent.register(exposing(
        port,
        app.addr.port(),
        json!([{ "path": "/health", "local_path_port": app.addr.port(), "listener_port": listener_port }]),
    ));
    let _ferry = registration_mode(&agent, "-proxy-id", "api-sidecar-proxy").await;
    let exposed = loopback(listener_port);

    let started = Instant::now();
    let mut slow = TcpStream::connect(exposed).await.expect("connect");
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let r = tokio::time::timeout(DEADLINE, slow.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "the slow request was never cut off");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "cut off after {took:?}, before the timeout"
    );

    let mut big = TcpStream::connect(exposed).await.expect("connect");
    let huge = "a".repeat(64 * 1024);
    let req = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n");
    let _ = big.write_all(req.as_bytes()).await;
    let mut got = Vec::new();
    let _ = within("oversized answered or closed", big.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || text.starts_with("HTTP/1.1 431"),
        "oversized head: {text:?}"
    );
    assert!(app.seen().is_empty(), "{:?}", app.seen());
}

/// h2c with prior knowledge towards the exposed listener (hyper's client),
/// and `Protocol: http2` towards the app.
#[tokio::test]
async fn h2c_towards_the_listener_and_the_app() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = App::start().await;
    let [port, l1, l2] = free_ports().await;
    agent.register(exposing(
        port,
        app.addr.port(),
        json!([
            { "path": "/health", "local_path_port": app.addr.port(), "listener_port": l1 },
            { "path": "/grpc.health.v1.Health/Check", "local_path_port": app.addr.port(), "listener_port": l2, "protocol": "http2" }
        ]),
    ));
    let _ferry = registration_mode(&agent, "-proxy-id", "api-sidecar-proxy").await;

    for (listener, path) in [
        (l1, "/health"),
        (l2, "/grpc.health.v1.Health/Check"),
        (l1, "/nope"),
    ] {
        let io = TokioIo::new(
            TcpStream::connect(loopback(listener))
                .await
                .expect("connect"),
        );
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2c handshake");
        let driver = tokio::spawn(conn);
        let req = hyper::Request::get(format!("http://127.0.0.1:{listener}{path}"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = within("h2 answer", sender.send_request(req))
            .await
            .expect("h2 response");
        let want = if path == "/nope" { 404 } else { 200 };
        assert_eq!(resp.status().as_u16(), want, "{path} on {listener}");
        if want == 200 {
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"app says hi\n");
        }
        driver.abort();
    }
    assert_eq!(app.seen(), ["/health", "/grpc.health.v1.Health/Check"]);
}

/// `envoy_prometheus_bind_addr` serves `/metrics` (and nothing else);
/// `envoy_stats_bind_addr` serves the admin endpoints.
#[tokio::test]
async fn envoy_metrics_and_stats_bind_addrs() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let [port, prom, stats] = free_ports().await;
    let mut reg = sidecar("api-sidecar-proxy", "api", port, 9);
    reg["Proxy"]["Config"] = json!({
        "envoy_prometheus_bind_addr": format!("127.0.0.1:{prom}"),
        "envoy_stats_bind_addr": format!("127.0.0.1:{stats}"),
    });
    agent.register(reg);
    let _ferry = registration_mode(&agent, "-proxy-id", "api-sidecar-proxy").await;

    let codes: HashMap<&str, u16> = HashMap::from([
        (
            "prom /metrics",
            status_of(loopback(prom), "GET", "/metrics").await,
        ),
        (
            "prom /ready",
            status_of(loopback(prom), "GET", "/ready").await,
        ),
        (
            "stats /ready",
            status_of(loopback(stats), "GET", "/ready").await,
        ),
        (
            "stats /metrics",
            status_of(loopback(stats), "GET", "/metrics").await,
        ),
    ]);
    assert_eq!(codes["prom /metrics"], 200);
    assert_eq!(codes["prom /ready"], 404, "metrics only");
    assert_eq!(codes["stats /ready"], 200);
    assert_eq!(codes["stats /metrics"], 200);
}

/// The answer's status on a fresh connection, or None when nothing
/// answers (refused, closed).
async fn maybe_status(to: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(to).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut got = Vec::new();
    within("answer", s.read_to_end(&mut got)).await.ok()?;
    String::from_utf8_lossy(&got)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Exposed paths follow the registration while ferry runs: a listener
/// whose path changes serves the new one only, a new listener starts, and
/// one no longer listed stops.
#[tokio::test]
async fn exposed_paths_follow_the_registration_live() {
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = App::start().await;
    let [port, l1, l2] = free_ports().await;
    let app_port = app.addr.port();
    let path =
        |p: &str, l: u16| json!({ "path": p, "local_path_port": app_port, "listener_port": l });
    agent.register(exposing(port, app_port, json!([path("/health", l1)])));
    let _ferry = registration_mode(&agent, "-proxy-id", "api-sidecar-proxy").await;
    assert_eq!(maybe_status(loopback(l1), "/health").await, Some(200));

    agent.register(exposing(
        port,
        app_port,
        json!([path("/ready", l1), path("/health", l2)]),
    ));
    let deadline = Instant::now() + DEADLINE;
    while maybe_status(loopback(l1), "/ready").await != Some(200) {
        assert!(Instant::now() < deadline, "/ready never exposed on {l1}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        maybe_status(loopback(l1), "/health").await,
        Some(404),
        "no longer exposed there"
    );
    let deadline = Instant::now() + DEADLINE;
    while maybe_status(loopback(l2), "/health").await != Some(200) {
        assert!(Instant::now() < deadline, "/health never exposed on {l2}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    agent.register(exposing(port, app_port, json!([path("/ready", l1)])));
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect(loopback(l2)).await.is_ok() {
        assert!(Instant::now() < deadline, "{l2} still listens");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(maybe_status(loopback(l1), "/ready").await, Some(200));
}
