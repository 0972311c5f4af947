//! Unix sockets on both local sides: an upstream that listens on a socket
//! file (`LocalBindSocketPath`/`LocalBindSocketMode`, or
//! `-upstream NAME:unix:PATH`) and a local app reached over a socket
//! (`Proxy.LocalServiceSocketPath`, or `-service-addr unix:PATH`). Socket
//! files: a stale one is replaced, the mode is set, ferry's own file is
//! removed when the upstream goes and at shutdown.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::registration::{
    free_ports, mesh_client, registration_mode, sidecar, until_discovered, with_upstreams,
};
use crate::support::fake_agent::{AgentOpts, FakeAgent, Instance};
use crate::support::*;

fn socket_upstream(name: &str, path: &Path, mode: &str) -> serde_json::Value {
    json!({ "DestinationName": name, "LocalBindSocketPath": path, "LocalBindSocketMode": mode })
}

/// Registration mode: upstream `db` on a socket with mode 0600 replaces a
/// stale socket file, carries the app's bytes to db over mTLS; the inbound
/// side reaches an app that listens on a socket. Removing the upstream
/// from the registration removes its file; shutdown removes the other.
#[tokio::test]
async fn registration_sockets_both_sides_with_mode_stale_file_and_cleanup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_sock = dir.path().join("db.sock");
    let cache_sock = dir.path().join("cache.sock");
    let app_sock = dir.path().join("app.sock");
    // A stale file where db will listen: a socket nobody accepts on.
    drop(std::os::unix::net::UnixListener::bind(&db_sock).expect("stale"));
    assert!(is_socket(&db_sock));

    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let db = TlsEchoServer::start(&pki, &pki.leaf("db")).await;
    let cache = TlsEchoServer::start(&pki, &pki.leaf("cache")).await;
    agent.set_instances("db", vec![Instance::sidecar(db.addr)]);
    agent.set_instances("cache", vec![Instance::sidecar(cache.addr)]);
    let (_app, app_counts) = unix_echo(&app_sock);
    let [port] = free_ports().await;
    let mut base = sidecar("api-sidecar-proxy", "api", port, 0);
    base["Proxy"]["LocalServiceSocketPath"] = json!(app_sock);
    agent.register(with_upstreams(
        base.clone(),
        &[
            socket_upstream("db", &db_sock, "0600"),
            socket_upstream("cache", &cache_sock, ""),
        ],
    ));
    let ferry = registration_mode(&agent, "-proxy-id", "api-sidecar-proxy").await;

    assert_eq!(ferry.running.upstream_socket("db"), Some(db_sock.clone()));
    assert!(
        is_socket(&db_sock),
        "the stale file was replaced by a socket"
    );
    assert_eq!(socket_mode(&db_sock), 0o600, "LocalBindSocketMode");
    until_discovered(&ferry, "db", db.addr).await;
    echo_unix(&db_sock, b"app to db over a socket").await;
    assert_eq!(db.counts.accepted(), 1);

    // Inbound: a mesh peer reaches the app on its socket.
    let web = mesh_client(&pki, "api", ferry.inbound()).await;
    assert_echo(web.upstream("api"), b"peer to the socket app").await;
    assert_eq!(app_counts.accepted(), 1);

    // Removed live: its file goes once its listener stopped.
    agent.register(with_upstreams(
        base,
        &[socket_upstream("db", &db_sock, "0600")],
    ));
    eventually("cache removed with its socket file", || {
        ferry.running.upstream_names() == ["db"] && !cache_sock.exists()
    })
    .await;

    assert!(ferry.running.shutdown(Duration::from_secs(2)).await);
    assert!(!db_sock.exists(), "removed at shutdown");
    assert!(app_sock.exists(), "the app's socket is not ours to remove");
}

/// A path that exists and is not a socket is never removed: ferry refuses
/// to start and the file is left as it was.
#[tokio::test]
async fn a_file_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path: PathBuf = dir.path().join("data");
    std::fs::write(&path, b"keep me").expect("write");
    let pki = Pki::new();
    pki.leaf("web");
    let up = format!("db:unix:{}", path.display());
    let args = [
        "-service",
        "web",
        "-upstream",
        &up,
        "-upstream-addr",
        "db=127.0.0.1:1",
        "-certs",
        &pki.dir_arg(),
    ];
    let argv = std::iter::once("ferry").chain(args.iter().copied());
    let cli = ferry::cli::parse(argv).expect("flags");
    let (config, _) = ferry::Config::from_args(&cli.proxy, &NO_ENV).expect("config");
    let err = match ferry::start(config, fast_watch()).await {
        Ok(_) => panic!("started on a path that is not a socket"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).expect("still there"), b"keep me");
}

/// Standalone flags: `-upstream api:unix:PATH` on the client side and
/// `-service-addr unix:PATH` on the server side carry bytes end to end.
#[tokio::test]
async fn standalone_flags_for_both_sockets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app_sock = dir.path().join("app.sock");
    let up_sock = dir.path().join("api.sock");
    let (_app, counts) = unix_echo(&app_sock);
    let pki = Pki::new();
    pki.leaf("api");
    pki.leaf("web");
    let dir_arg = pki.dir_arg();
    let service_addr = format!("unix:{}", app_sock.display());
    let server = StandaloneArgs::new("api", &dir_arg)
        .listen(service_addr)
        .start()
        .await;
    let up = format!("unix:{}", up_sock.display());
    let client = StandaloneArgs::new("web", &dir_arg)
        .upstream_on("api", up, &[server.inbound()])
        .start()
        .await;
    assert_eq!(client.running.upstream_socket("api"), Some(up_sock.clone()));
    echo_unix(&up_sock, b"socket to socket").await;
    assert_eq!(counts.accepted(), 1);
}
