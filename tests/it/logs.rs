//! The one line per connection, read from the real binary's stderr: a
//! denied connection names the peer address, the identity, the phase and
//! the reason; a finished one carries both identities, bytes each way and
//! the duration.

use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn each_connection_is_logged_once_with_who_what_and_why() {
    let pki = Pki::new();
    let web = pki.leaf("web");
    let billing = pki.leaf("billing");
    pki.leaf("api");
    let app = EchoServer::start().await;
    let dir = pki.dir_arg();
    let app_addr = app.addr_arg();
    let ferry = FerryProcess::start(&api_args(
        &dir,
        &app_addr,
        &["-allow", "web", "-default-deny"],
    ));
    let addr = ferry.listen_addr("inbound listener ready").await;

    // Denied: billing.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let billing_port = tcp.local_addr().unwrap().port();
    let mut tls = raw_client(Some(&billing))
        .connect(any_name(), tcp)
        .await
        .expect("handshake");
    let got = round_trip(&mut tls, b"let me in").await;
    assert!(
        got.map_or(true, |b| b.is_empty()),
        "denied peer got nothing back"
    );
    let denied = ferry.line("connection denied").await;
    for want in [
        format!("peer=127.0.0.1:{billing_port}"),
        format!("source=\"{}\"", pki.uri("billing")),
        format!("destination=\"{}\"", pki.uri("api")),
        "phase=\"authorize\"".to_string(),
        "outcome=\"denied\"".to_string(),
        "detail=default deny (deny)".to_string(),
    ] {
        assert!(
            denied.contains(&want),
            "denied line lacks {want:?}:\n{denied}"
        );
    }

    // Allowed: web, 11 bytes each way.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = raw_client(Some(&web))
        .connect(any_name(), tcp)
        .await
        .expect("handshake");
    let got = round_trip(&mut tls, b"hello, api!").await.expect("echo");
    assert_eq!(got, b"hello, api!");
    let closed = ferry.line("connection closed").await;
    for want in [
        format!("source=\"{}\"", pki.uri("web")),
        format!("target_addr=\"{app_addr}\""),
        "phase=\"splice\"".to_string(),
        "bytes_in=11".to_string(),
        "bytes_out=11".to_string(),
        "duration_ms=".to_string(),
        "outcome=\"done\"".to_string(),
        "detail=closed".to_string(),
    ] {
        assert!(
            closed.contains(&want),
            "closed line lacks {want:?}:\n{closed}"
        );
    }

    // A failed handshake is one line too, naming the phase and the TLS reason.
    let tcp = TcpStream::connect(addr).await.unwrap();
    if let Ok(mut t) = raw_client(None).connect(any_name(), tcp).await {
        // TLS 1.3: the refusal shows on the first read.
        let got = round_trip(&mut t, b"x").await;
        assert!(
            got.map_or(true, |b| b.is_empty()),
            "no certificate, no reply"
        );
    }
    let failed = ferry.line("connection failed").await;
    assert!(failed.contains("phase=\"handshake\""), "{failed}");
    assert!(failed.contains("detail=TLS:"), "{failed}");
}
