//! TLS session resumption between sidecars: a repeat connection to an
//! instance skips the certificate signatures and chain checks, which are
//! most of a handshake's CPU. Tickets are kept per upstream instance, so
//! round robin does not waste them on instances that cannot redeem them,
//! and enough are kept for a burst of concurrent connections to resume.

use std::net::SocketAddr;

use crate::support::*;

/// An inbound ferry for `api` in front of `app`.
async fn api_instance(pki: &Pki, app: &EchoServer) -> Ferry {
    let (dir, app) = (pki.dir_arg(), app.addr_arg());
    Ferry::start(&api_args(&dir, &app, &["-allow", "web", "-default-deny"])).await
}

/// A `web` ferry whose `api` upstream is `instances`.
async fn web_ferry(pki: &Pki, instances: &[SocketAddr]) -> Ferry {
    let dir = pki.dir_arg();
    StandaloneArgs::new("web", &dir)
        .upstream("api", instances)
        .start()
        .await
}

fn kinds(f: &Ferry, side: &'static str) -> (u64, u64) {
    let m = f.metrics();
    (m.handshakes(side, "full"), m.handshakes(side, "resumed"))
}

/// Round robin over two instances: each instance costs one full handshake,
/// and every later connection to it resumes, on both ends. With one ticket
/// cache per service name (rustls' default) the ticket offered would mostly
/// be the other instance's, and these would be full handshakes.
#[tokio::test]
async fn repeat_connections_resume_with_the_instance_that_issued_the_ticket() {
    let pki = Pki::new();
    pki.leaf("web");
    pki.leaf("api");
    let app = EchoServer::start().await;
    let a = api_instance(&pki, &app).await;
    let b = api_instance(&pki, &app).await;
    let web = web_ferry(&pki, &[a.inbound(), b.inbound()]).await;

    for i in 0..8 {
        assert_echo(web.upstream("api"), format!("call {i}").as_bytes()).await;
    }
    assert_eq!(kinds(&web, "client"), (2, 6), "web: (full, resumed)");
    assert_eq!(kinds(&a, "server"), (1, 3), "instance a: (full, resumed)");
    assert_eq!(kinds(&b, "server"), (1, 3), "instance b: (full, resumed)");
    assert_eq!(app.counts.accepted(), 8, "every call reached the app");
}

/// A burst of concurrent new connections resumes too: tickets collected by
/// earlier connections are kept (up to `TICKETS_PER_INSTANCE`), not just
/// the eight rustls keeps by default.
#[tokio::test]
async fn a_burst_of_new_connections_resumes() {
    const BURST: usize = 20;
    let pki = Pki::new();
    pki.leaf("web");
    pki.leaf("api");
    let app = EchoServer::start().await;
    let api = api_instance(&pki, &app).await;
    let web = web_ferry(&pki, &[api.inbound()]).await;
    // Each connection leaves more tickets than it uses.
    for i in 0..BURST {
        assert_echo(web.upstream("api"), format!("warm {i}").as_bytes()).await;
    }
    let (full, resumed) = kinds(&web, "client");
    assert_eq!((full, resumed), (1, BURST as u64 - 1));

    let entry = web.upstream("api");
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..BURST {
        burst.spawn(async move { assert_echo(entry, format!("burst {i}").as_bytes()).await });
    }
    while let Some(done) = within("the burst", burst.join_next()).await {
        done.expect("a burst connection echoed");
    }
    assert_eq!(
        kinds(&web, "client"),
        (1, 2 * BURST as u64 - 1),
        "every connection of the burst resumed"
    );
    assert_eq!(kinds(&api, "server"), kinds(&web, "client"));
}
