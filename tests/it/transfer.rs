//! Bytes round-trip through two ferries (app -> client ferry ==mTLS==>
//! server ferry -> echo app), whatever their size, in both directions, and
//! half-close carries through: a client that shuts down its write side still
//! gets the whole reply.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn small_message_round_trips() {
    let mesh = Mesh::echo("web", "api", &[]).await;
    assert_echo(mesh.entry("api"), b"hello through the mesh").await;
    assert_eq!(mesh.app.counts.accepted(), 1, "the app saw one connection");
    assert_eq!(mesh.server.metrics().authz_allowed.get(), 1);
}

#[tokio::test]
async fn multi_megabyte_round_trips_intact() {
    let mesh = Mesh::echo("web", "api", &[]).await;
    // 8 MiB of a pattern that would show any reordering or loss.
    let msg: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut s = TcpStream::connect(mesh.entry("api")).await.unwrap();
    // Write and read concurrently: the echo sends back while we still send.
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&msg).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::with_capacity(msg.len());
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let (_, got) = within("8 MiB echo", async { tokio::join!(send, recv) }).await;
    assert_eq!(got.len(), msg.len());
    assert!(got == msg, "bytes differ after the round trip");
    eventually("byte counters to settle", || {
        mesh.client.metrics().upstream_bytes_in.get() == msg.len() as u64
    })
    .await;
    assert_eq!(
        mesh.client.metrics().upstream_bytes_out.get(),
        msg.len() as u64
    );
    assert_eq!(
        mesh.server.metrics().inbound_bytes_in.get(),
        msg.len() as u64
    );
}

#[tokio::test]
async fn server_speaks_first_and_closes_first() {
    // The other direction: the remote app writes a large answer and closes
    // without the client sending anything, then the client closes.
    let big: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = listener.local_addr().unwrap();
    let payload = big.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(&payload).await.unwrap();
        s.shutdown().await.unwrap();
        // Keep reading until the client is done, to prove its half stays open.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"thanks");
    });
    let mesh = Mesh::start("web", "api", app_addr, &[]).await;

    let mut s = TcpStream::connect(mesh.entry("api")).await.unwrap();
    let mut got = Vec::new();
    within("server-first download", s.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(
        got == big,
        "download differs ({} of {} bytes)",
        got.len(),
        big.len()
    );
    // Our write side is still open after the server's FIN reached us.
    s.write_all(b"thanks").await.unwrap();
    s.shutdown().await.unwrap();
    eventually("server ferry to log the connection closed", || {
        mesh.server.metrics().inbound_active.get() == 0
    })
    .await;
    assert_eq!(mesh.server.metrics().inbound_bytes_in.get(), 6);
    assert_eq!(
        mesh.server.metrics().inbound_bytes_out.get(),
        big.len() as u64
    );
}

#[tokio::test]
async fn many_concurrent_connections_each_round_trip() {
    let mesh = Mesh::echo("web", "api", &[]).await;
    let entry = mesh.entry("api");
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            tokio::spawn(async move {
                let msg = format!("connection {i} says hello").into_bytes();
                assert_echo(entry, &msg).await;
            })
        })
        .collect();
    for t in tasks {
        within("concurrent echo", t).await.unwrap();
    }
    assert_eq!(mesh.app.counts.accepted(), 50);
}

/// Leaves signed by an intermediate CA (Consul's secondary datacenters,
/// Vault) work in both directions when the peer sends the intermediate in
/// its chain, as Consul's `CertPEM` does; only the root is trusted.
#[tokio::test]
async fn chains_through_an_intermediate_are_accepted_both_ways() {
    let pki = Pki::new();
    let inter = pki.ca.intermediate().expect("intermediate");
    for svc in ["web", "api"] {
        let leaf = inter
            .leaf(svc, "dc1", std::time::Duration::from_secs(3600))
            .unwrap();
        assert_eq!(
            leaf.cert_pem.matches("BEGIN CERTIFICATE").count(),
            2,
            "leaf + intermediate"
        );
        ferry::identity::dev_ca::write_leaf(pki.dir(), svc, &leaf).unwrap();
    }
    let app = EchoServer::start().await;
    let dir = pki.dir_arg();
    let app_addr = app.addr_arg();
    let server = Ferry::start(&api_args(&dir, &app_addr, &[])).await;
    let client = StandaloneArgs::new("web", &dir)
        .upstream("api", &[server.inbound()])
        .start()
        .await;
    assert_echo(client.upstream("api"), b"through an intermediate").await;

    // Without the intermediate, a client's leaf does not chain to the root.
    let bare = inter
        .leaf("web", "dc1", std::time::Duration::from_secs(3600))
        .unwrap();
    let leaf_only = ferry::identity::dev_ca::Leaf {
        cert_pem: bare
            .cert_pem
            .split_inclusive("-----END CERTIFICATE-----\n")
            .next()
            .unwrap()
            .to_string(),
        key_pem: bare.key_pem.clone(),
    };
    let tcp = TcpStream::connect(server.inbound()).await.unwrap();
    let refused = match raw_client(Some(&leaf_only)).connect(any_name(), tcp).await {
        Ok(mut tls) => round_trip(&mut tls, b"no intermediate")
            .await
            .map_or(true, |b| b.is_empty()),
        Err(_) => true,
    };
    assert!(refused, "a leaf without its intermediate must be refused");
    eventually("the handshake failure to be counted", || {
        server.metrics().inbound_handshake_failed.get() == 1
    })
    .await;
    assert_eq!(
        app.counts.accepted(),
        1,
        "only the good connection reached the app"
    );
}
