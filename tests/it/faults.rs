//! Faults on the data plane: a local app that refuses or resets, an upstream
//! instance that dies mid-stream, a mesh peer that vanishes without
//! close_notify. Each time the affected connection must end promptly on the
//! other side too, be counted and logged once, leave no gauge behind, and
//! ferry must then serve a fresh connection as if nothing happened.
//!
//! Abrupt deaths are TCP resets (SO_LINGER 0, then close). A fault server
//! only resets after reading something the client sent *after* it received
//! the echo, so no byte the test waits for can be lost to the reset.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ferry::identity::dev_ca::{Leaf, LeafSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::support::*;

const HOUR: Duration = Duration::from_secs(3600);

/// Reads until the connection ends (EOF or error), within the deadline, and
/// returns the bytes that still arrived.
async fn read_until_end<S: tokio::io::AsyncRead + Unpin>(s: &mut S, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = within(what, s.read_to_end(&mut got)).await;
    got
}

/// An `api` inbound ferry in front of `app` (an address), with its certs.
async fn api_ferry(pki: &Pki, app: SocketAddr) -> Ferry {
    let dir = pki.dir_arg();
    StandaloneArgs::new("api", &dir).listen(app).start().await
}

/// The local app refuses connections (nothing listens on `-service-addr`):
/// an allowed mesh client gets no reply and its connection is closed, the
/// failure is counted as `local_connect_failed` and as a `failed` close;
/// once an app listens on that address, a new connection is echoed.
#[tokio::test]
async fn local_app_refusing_fails_the_connection_until_it_comes_up() {
    let pki = Pki::new();
    pki.leaf("api");
    let web = pki.leaf("web");
    let app_addr = dead_addr().await;
    let ferry = api_ferry(&pki, app_addr).await;

    let got = round_trip(&mut mesh_conn(ferry.inbound(), &web).await, MSG).await;
    assert!(
        got.as_ref()
            .map_or_else(|e| e.kind() != io::ErrorKind::TimedOut, |b| b.is_empty()),
        "closed with no reply while the app is down: {got:?}"
    );
    let m = ferry.metrics();
    eventually("the failed connection to be counted closed", || {
        closed_count(m, "inbound", "api", "failed") == 1
    })
    .await;
    assert_eq!(m.local_connect_failed.get(), 1);
    assert_eq!(m.inbound_active.get(), 0);

    let app = EchoServer::on(TcpListener::bind(app_addr).await.expect("rebind app port"));
    let got = round_trip(&mut mesh_conn(ferry.inbound(), &web).await, MSG).await;
    assert_eq!(got.expect("echo"), MSG);
    assert_eq!(app.counts.accepted(), 1);
    eventually("the good connection to be counted done", || {
        closed_count(m, "inbound", "api", "done") == 1
    })
    .await;
    assert_eq!(m.local_connect_failed.get(), 1, "no new failure");
    assert_eq!(closed_count(m, "inbound", "api", "failed"), 1);
}

/// A local app that reads `n` bytes of its first connection and then resets
/// it; the task hands its listener back so the test can serve the same port.
fn resetting_app(listener: TcpListener, n: usize) -> JoinHandle<TcpListener> {
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await.expect("read the first bytes");
        reset_on_close(&s);
        drop(s);
        listener
    })
}

/// The local app resets mid-stream (the real binary): the mesh client's
/// connection ends within the deadline with nothing echoed, ferry logs one
/// `connection failed` line in the splice phase naming the local app side,
/// and the next connection is served.
#[tokio::test]
async fn local_app_reset_mid_stream_ends_the_peer_connection() {
    let pki = Pki::new();
    pki.leaf("api");
    let web = pki.leaf("web");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = listener.local_addr().unwrap().to_string();
    let app = resetting_app(listener, 4);
    let dir = pki.dir_arg();
    let mut ferry = FerryProcess::start(&api_args(&dir, &app_addr, &[]));
    let addr = ferry.listen_addr("inbound listener ready").await;

    let mut tls = mesh_conn(addr, &web).await;
    tls.write_all(MSG).await.expect("send");
    tls.flush().await.expect("flush");
    let got = read_until_end(&mut tls, "the mesh connection to end after the app reset").await;
    assert!(got.is_empty(), "nothing echoed: {got:?}");
    let failed = ferry.line("connection failed").await;
    assert!(failed.contains("phase=\"splice\""), "{failed}");
    assert!(failed.contains("detail=local app:"), "{failed}");

    let listener = within("the app to reset", app).await.unwrap();
    let _app = EchoServer::on(listener);
    let got = round_trip(&mut mesh_conn(addr, &web).await, MSG).await;
    assert_eq!(got.expect("echo"), MSG);
    ferry.line("connection closed").await;
    let lines = ferry.stop();
    let failures = lines.iter().filter(|l| l.contains("connection failed"));
    assert_eq!(failures.count(), 1, "one failure logged:\n{lines:#?}");
}

/// An upstream instance that echoes one message of its first connection,
/// reads the next, then resets it (no close_notify); the listener is handed
/// back so the instance can be restarted on the same port.
fn dying_instance(pki: &Pki, leaf: &Leaf, listener: TcpListener) -> JoinHandle<TcpListener> {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(pki, leaf));
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = acceptor.accept(tcp).await.expect("handshake");
        let mut buf = vec![0u8; MSG.len()];
        tls.read_exact(&mut buf).await.expect("read");
        tls.write_all(&buf).await.expect("echo");
        tls.flush().await.expect("flush");
        tls.read_exact(&mut buf[..1]).await.expect("read more");
        reset_on_close(tls.get_ref().0);
        drop(tls);
        listener
    })
}

/// An upstream instance dies mid-stream: the local client's connection ends
/// within the deadline after the one echo it got, the upstream ferry counts
/// a `failed` close and its active gauge returns to 0, and once the instance
/// is back on its port a new connection is served.
#[tokio::test]
async fn upstream_instance_dying_mid_stream_ends_the_local_connection() {
    let pki = Pki::new();
    pki.leaf("web");
    let api = pki.leaf("api");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inst_addr = listener.local_addr().unwrap();
    let instance = dying_instance(&pki, &api, listener);
    let dir = pki.dir_arg();
    let web = StandaloneArgs::new("web", &dir)
        .upstream("api", &[inst_addr])
        .start()
        .await;

    let mut s = TcpStream::connect(web.upstream("api")).await.unwrap();
    s.write_all(MSG).await.unwrap();
    let mut echo = vec![0u8; MSG.len()];
    within("the one echo", s.read_exact(&mut echo))
        .await
        .expect("echo");
    assert_eq!(echo, MSG);
    assert_eq!(web.metrics().upstream_active.get(), 1);
    s.write_all(b"!").await.unwrap();
    let got = read_until_end(&mut s, "the local connection to end").await;
    assert!(got.is_empty(), "nothing more arrived: {got:?}");

    let m = web.metrics();
    eventually("the upstream gauge to return to 0", || {
        m.upstream_active.get() == 0
    })
    .await;
    assert_eq!(closed_count(m, "upstream", "api", "failed"), 1);

    let listener = within("the instance to die", instance).await.unwrap();
    let _back = TlsEchoServer::on(&pki, &api, listener);
    assert_echo(web.upstream("api"), MSG).await;
    eventually("the good connection to be counted done", || {
        closed_count(m, "upstream", "api", "done") == 1
    })
    .await;
    assert_eq!(m.upstream_active.get(), 0);
    assert_eq!(closed_count(m, "upstream", "api", "failed"), 1);
}

/// A mesh peer gets one echo, then its TCP socket goes away without
/// close_notify (a FIN, or a reset if `reset`). Checks the app side is
/// closed, the gauge returns to 0, one close is counted with `outcome`, and
/// a fresh connection is echoed.
async fn peer_vanishes(reset: bool, outcome: &'static str) {
    let mesh = Mesh::echo("web", "api", &[]).await;
    let web = mesh.pki.issue(&LeafSpec::consul(mesh.pki.uri("web"), HOUR));
    let mut tls = mesh_conn(mesh.server.inbound(), &web).await;
    tls.write_all(MSG).await.unwrap();
    tls.flush().await.unwrap();
    let mut echo = vec![0u8; MSG.len()];
    within("the one echo", tls.read_exact(&mut echo))
        .await
        .expect("echo");
    assert_eq!(echo, MSG);
    let m = mesh.server.metrics();
    assert_eq!(m.inbound_active.get(), 1);
    assert_eq!(mesh.app.counts.closed(), 0, "the app is still connected");

    if reset {
        reset_on_close(tls.get_ref().0);
    }
    drop(tls);
    eventually("the app to see its connection end", || {
        mesh.app.counts.closed() == 1
    })
    .await;
    eventually("the inbound gauge to return to 0", || {
        m.inbound_active.get() == 0
    })
    .await;
    eventually("the close to be counted", || {
        closed_count(m, "inbound", "api", outcome) == 1
    })
    .await;

    assert_echo(mesh.entry("api"), MSG).await;
    assert_eq!(mesh.app.counts.accepted(), 2);
    eventually("the fresh connection to close", || {
        m.inbound_active.get() == 0 && mesh.app.counts.closed() == 2
    })
    .await;
}

/// A mesh peer closes its TCP socket without close_notify after one echo:
/// ferry treats it as a (truncated) end of stream, closes the app side (the
/// echo app sees EOF), counts a `done` close, the gauge returns to 0, and
/// ferry keeps serving.
#[tokio::test]
async fn mesh_peer_vanishing_without_close_notify_closes_the_app_side() {
    peer_vanishes(false, "done").await;
}

/// A mesh peer resets its TCP connection after one echo: ferry ends the
/// splice as failed on the peer side, closes the app side, the gauge returns
/// to 0, and ferry keeps serving.
#[tokio::test]
async fn mesh_peer_resetting_mid_stream_closes_the_app_side() {
    peer_vanishes(true, "failed").await;
}
