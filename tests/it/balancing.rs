//! Choosing upstream instances: round robin across healthy instances,
//! retrying past dead ones within one connection, ejecting an instance that
//! keeps failing and taking it back once it recovers.
//!
//! The instances here are mTLS echo servers presenting `api` leaves, so the
//! upstream ferry really verifies each one's identity.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// An upstream ferry for `web` whose `api` upstream has `instances`, plus extra flags.
async fn web_ferry(pki: &Pki, instances: &[SocketAddr], extra: &[&str]) -> Ferry {
    let dir = pki.dir_arg();
    StandaloneArgs::new("web", &dir)
        .upstream("api", instances)
        .extra(extra)
        .start()
        .await
}

/// Three healthy instances each get an equal share, in turn.
#[tokio::test]
async fn round_robin_spreads_connections_evenly() {
    let pki = Pki::new();
    pki.leaf("web");
    let leaf = pki.leaf("api");
    let a = TlsEchoServer::start(&pki, &leaf).await;
    let b = TlsEchoServer::start(&pki, &leaf).await;
    let c = TlsEchoServer::start(&pki, &leaf).await;
    let ferry = web_ferry(&pki, &[a.addr, b.addr, c.addr], &[]).await;

    for i in 0..9 {
        assert_echo(ferry.upstream("api"), format!("request {i}").as_bytes()).await;
    }
    let shares = [
        a.counts.accepted(),
        b.counts.accepted(),
        c.counts.accepted(),
    ];
    assert_eq!(shares, [3, 3, 3], "round robin over three instances");
    assert_eq!(
        ferry.metrics().upstream_retries.get(),
        0,
        "no retries needed"
    );
}

/// A dead instance costs a retry, not a failed connection.
#[tokio::test]
async fn retries_past_a_dead_instance() {
    let pki = Pki::new();
    pki.leaf("web");
    let leaf = pki.leaf("api");
    let a = TlsEchoServer::start(&pki, &leaf).await;
    let dead = dead_addr().await;
    let c = TlsEchoServer::start(&pki, &leaf).await;
    // Ejection off, so every round passes over the dead instance.
    let ferry = web_ferry(&pki, &[a.addr, dead, c.addr], &["-eject-after", "0"]).await;

    for i in 0..6 {
        assert_echo(ferry.upstream("api"), format!("request {i}").as_bytes()).await;
    }
    assert_eq!(
        a.counts.accepted() + c.counts.accepted(),
        6,
        "every connection reached a live instance"
    );
    let m = ferry.metrics();
    assert_eq!(
        m.upstream_attempt_failed.get(),
        2,
        "the dead instance was first in line twice in six"
    );
    assert_eq!(m.upstream_retries.get(), 2);
    assert_eq!(m.upstream_ejections.get(), 0);
}

/// After repeated failures an instance is skipped; once it is back and its
/// ejection has expired, it gets traffic again.
#[tokio::test]
async fn ejects_a_failing_instance_and_takes_it_back() {
    let pki = Pki::new();
    pki.leaf("web");
    let leaf = pki.leaf("api");
    let a = TlsEchoServer::start(&pki, &leaf).await;
    let flaky = dead_addr().await;
    let ferry = web_ferry(
        &pki,
        &[a.addr, flaky],
        &["-eject-after", "2", "-eject-for", "1s"],
    )
    .await;
    let flaky_state = || {
        ferry
            .running
            .instances("api")
            .expect("api upstream")
            .into_iter()
            .find(|s| s.addr == flaky)
            .expect("flaky is known")
    };

    // Two connections that try the dead instance first eject it.
    for i in 0..4 {
        assert_echo(ferry.upstream("api"), format!("warm-up {i}").as_bytes()).await;
    }
    assert!(
        flaky_state().ejected,
        "ejected after 2 failures: {:?}",
        flaky_state()
    );
    assert_eq!(ferry.metrics().upstream_ejections.get(), 1);

    // While ejected, nobody tries it: no new failed attempts.
    let failed = ferry.metrics().upstream_attempt_failed.get();
    for i in 0..4 {
        assert_echo(ferry.upstream("api"), format!("ejected {i}").as_bytes()).await;
    }
    // Ejection only ends by expiry, so if it still holds now it held for the
    // whole loop (which takes milliseconds against a 1 s ejection).
    assert!(flaky_state().ejected, "still ejected after the loop");
    assert_eq!(
        ferry.metrics().upstream_attempt_failed.get(),
        failed,
        "an ejected instance is skipped"
    );

    // The instance comes back on the same port; once the ejection expires it
    // is tried and, succeeding, rejoins the rotation.
    let listener = TcpListener::bind(flaky)
        .await
        .expect("rebind the flaky instance's port");
    let back = TlsEchoServer::on(&pki, &leaf, listener);
    eventually("ejection to expire", || !flaky_state().ejected).await;
    for i in 0..10 {
        assert_echo(ferry.upstream("api"), format!("recovered {i}").as_bytes()).await;
        if back.counts.accepted() > 0 {
            break;
        }
    }
    assert!(
        back.counts.accepted() > 0,
        "the recovered instance gets traffic again"
    );
    assert_eq!(
        flaky_state().consecutive_failures,
        0,
        "a success resets its failure count"
    );
}

/// With every instance down, the local connection is closed with nothing
/// sent back, the failure is counted, and the ferry keeps serving once an
/// instance is reachable again.
#[tokio::test]
async fn no_instance_left_closes_the_local_connection() {
    let pki = Pki::new();
    pki.leaf("web");
    let leaf = pki.leaf("api");
    let (d1, d2) = (dead_addr().await, dead_addr().await);
    let ferry = web_ferry(&pki, &[d1, d2], &[]).await;

    let mut s = TcpStream::connect(ferry.upstream("api")).await.unwrap();
    let got = round_trip(&mut s, b"anyone there?").await;
    assert!(
        got.as_ref().map_or(true, |b| b.is_empty()),
        "nothing comes back: {got:?}"
    );
    eventually("the failure to be counted", || {
        ferry.metrics().upstream_unavailable.get() == 1
    })
    .await;
    assert_eq!(
        ferry.metrics().upstream_attempt_failed.get(),
        2,
        "both instances were tried"
    );

    let listener = TcpListener::bind(d1).await.expect("rebind");
    let _back = TlsEchoServer::on(&pki, &leaf, listener);
    assert_echo(ferry.upstream("api"), b"back again").await;
}
