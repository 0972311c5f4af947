//! Connection limits: `-max-conns`, `-max-handshakes`, `-max-upstream-conns`
//! refuse past their cap at once (never queue), count each refusal in
//! `ferry_connections_refused_total{listener,limit}`, log once per burst,
//! and free their permit when a connection ends; `-max-lifetime` closes a
//! busy connection after its lifetime.
//!
//! "Closed at once" is checked against [`AT_ONCE`], well under the handshake
//! timeout, so a connection that merely timed out can't pass for a refusal.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::*;

/// A refusal must be seen within this long.
const AT_ONCE: Duration = Duration::from_secs(2);

/// Asserts that `attempt` (an echo try) ends with nothing echoed, by error
/// or EOF, within [`AT_ONCE`].
async fn assert_refused_at_once(
    what: &str,
    attempt: impl std::future::Future<Output = io::Result<Vec<u8>>>,
) {
    let t0 = Instant::now();
    let r = tokio::time::timeout(AT_ONCE, attempt)
        .await
        .unwrap_or_else(|_| panic!("{what}: still open after {AT_ONCE:?}"));
    match &r {
        Ok(got) => assert!(got.is_empty(), "{what}: echoed {got:?}"),
        Err(e) => assert_ne!(e.kind(), io::ErrorKind::TimedOut, "{what}: {e}"),
    }
    assert!(t0.elapsed() < AT_ONCE, "{what}: took {:?}", t0.elapsed());
}

/// Reads from an already connected socket that sends nothing, until EOF.
async fn silent_read_on(mut s: TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    Ok(buf)
}

/// A raw TCP client that connects, sends nothing and reads.
async fn silent_read(addr: SocketAddr) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf).await?;
    buf.truncate(n);
    Ok(buf)
}

/// `-max-conns 2`: with two established mesh connections held, a third is
/// closed at once and counted once under {inbound, max_conns}; the two held
/// connections keep echoing, and once one closes its permit is free again.
#[tokio::test]
async fn max_conns_refuses_the_third_and_frees_on_close() {
    let pki = Pki::new();
    pki.leaf("api");
    let web = pki.leaf("web");
    let app = EchoServer::start().await;
    let (dir, app_addr) = (pki.dir_arg(), app.addr_arg());
    let ferry = Ferry::start(&api_args(&dir, &app_addr, &["-max-conns", "2"])).await;
    let addr = ferry.inbound();

    let mut a = mesh_conn(addr, &web).await;
    echo_once(&mut a, b"a").await;
    let mut b = mesh_conn(addr, &web).await;
    echo_once(&mut b, b"b").await;

    assert_refused_at_once("third connection", mesh_echo(addr, &web)).await;
    let refused = ferry.metrics().refusals("inbound", "max_conns");
    assert_eq!(refused.get(), 1);
    assert_eq!(
        app.counts.accepted(),
        2,
        "the refused peer never reached the app"
    );

    echo_once(&mut a, b"a again").await;
    echo_once(&mut b, b"b again").await;

    finish(&mut a).await;
    eventually("inbound_active drops to 1", || {
        ferry.metrics().inbound_active.get() == 1
    })
    .await;
    let got = mesh_echo(addr, &web)
        .await
        .expect("echo after a permit freed");
    assert_eq!(got, MSG);
    assert_eq!(refused.get(), 1, "nothing else refused");
    echo_once(&mut b, b"b still").await;
}

/// `-max-handshakes 2`: two TCP clients that never send a ClientHello hold
/// the pending budget; a third connection is not refused: the oldest silent
/// one is closed at once to make room (not after the 5 s handshake timeout)
/// and counted as an eviction; a connection established before the stall
/// keeps echoing; a mesh client that arrives while the budget is full is
/// served, and nothing is refused.
#[tokio::test]
async fn max_handshakes_makes_room_by_closing_stalled_handshakes() {
    let pki = Pki::new();
    pki.leaf("api");
    let web = pki.leaf("web");
    let app = EchoServer::start().await;
    let (dir, app_addr) = (pki.dir_arg(), app.addr_arg());
    let flags = ["-max-handshakes", "2", "-handshake-timeout", "5s"];
    let ferry = Ferry::start(&api_args(&dir, &app_addr, &flags)).await;
    let addr = ferry.inbound();
    let m = ferry.metrics();

    let mut live = mesh_conn(addr, &web).await;
    echo_once(&mut live, b"before the stall").await;

    let stalled1 = TcpStream::connect(addr).await.expect("connect");
    let stalled2 = TcpStream::connect(addr).await.expect("connect");
    eventually("ferry accepted both stalled sockets", || {
        m.inbound_accepted.get() == 3
    })
    .await;

    // The budget is full: the third evicts the oldest silent one at once.
    let third = TcpStream::connect(addr).await.expect("connect");
    assert_refused_at_once("the oldest stalled handshake", silent_read_on(stalled1)).await;
    assert_eq!(m.evictions("inbound", "budget").get(), 1);
    echo_once(&mut live, b"during the stall").await;

    // A mesh client arriving while the budget is full is served: the
    // silent ones give way to it.
    let mut fresh = mesh_conn(addr, &web).await;
    echo_once(&mut fresh, b"served while full").await;
    assert!(m.evictions("inbound", "budget").get() >= 2);
    assert_eq!(
        m.refusals("inbound", "max_handshakes").get(),
        0,
        "nothing refused"
    );
    echo_once(&mut live, b"still live").await;
    drop((stalled2, third));
}

/// `-max-upstream-conns 1`: with one local connection held through the
/// `api` upstream, a second is closed at once with no reply and counted
/// under {api, max_upstream_conns}; after the first closes, a new one works.
#[tokio::test]
async fn max_upstream_conns_refuses_the_second_local_connection() {
    let pki = Pki::new();
    pki.leaf("web");
    let api = TlsEchoServer::start(&pki, &pki.leaf("api")).await;
    let dir = pki.dir_arg();
    let ferry = StandaloneArgs::new("web", &dir)
        .upstream("api", &[api.addr])
        .extra(&["-max-upstream-conns", "1"])
        .start()
        .await;
    let entry = ferry.upstream("api");

    let mut held = TcpStream::connect(entry).await.expect("connect");
    echo_once(&mut held, b"held").await;

    assert_refused_at_once("second local connection", plain_echo(entry)).await;
    let refused = ferry.metrics().refusals("api", "max_upstream_conns");
    assert_eq!(refused.get(), 1);
    assert_eq!(
        api.counts.accepted(),
        1,
        "the refused one was never dialled"
    );
    echo_once(&mut held, b"held still").await;

    finish(&mut held).await;
    eventually("upstream api has no active connection", || {
        ferry.metrics().upstream_active.get() == 0
    })
    .await;
    assert_echo(entry, MSG).await;
    assert_eq!(refused.get(), 1);
}

/// `-max-lifetime 300ms` (real binary): a connection that echoes without a
/// pause is still closed by ferry, not before ~250 ms and well within the
/// deadline, and its log line says "maximum lifetime reached".
#[tokio::test]
async fn max_lifetime_closes_a_busy_connection_and_logs_why() {
    let pki = Pki::new();
    pki.leaf("api");
    let web = pki.leaf("web");
    let app = EchoServer::start().await;
    let (dir, app_addr) = (pki.dir_arg(), app.addr_arg());
    let ferry = FerryProcess::start(&api_args(&dir, &app_addr, &["-max-lifetime", "300ms"]));
    let addr = ferry.listen_addr("inbound listener ready").await;

    let t0 = Instant::now();
    let mut conn = mesh_conn(addr, &web).await;
    let echoes = within("ferry closes the busy connection", async {
        let mut n = 0u32;
        let mut buf = [0u8; 4];
        loop {
            if conn.write_all(b"tick").await.is_err() {
                return n;
            }
            match conn.read_exact(&mut buf).await {
                Ok(_) => n += 1,
                Err(_) => return n,
            }
        }
    })
    .await;
    let took = t0.elapsed();
    assert!(echoes > 0, "the connection echoed before it was closed");
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");

    let line = ferry.line("maximum lifetime reached").await;
    assert!(line.contains("connection closed"), "{line}");
    assert!(line.contains("direction=\"inbound\""), "{line}");
}

/// Log once per burst (real binary, `-max-conns 1`): with one connection
/// held, 20 refused connections produce exactly one "limit reached" line,
/// carrying refused=1 (the first of the burst).
#[tokio::test]
async fn a_burst_of_refusals_is_logged_once() {
    let pki = Pki::new();
    pki.leaf("api");
    let web = pki.leaf("web");
    let app = EchoServer::start().await;
    let (dir, app_addr) = (pki.dir_arg(), app.addr_arg());
    let mut ferry = FerryProcess::start(&api_args(&dir, &app_addr, &["-max-conns", "1"]));
    let addr = ferry.listen_addr("inbound listener ready").await;

    let mut held = mesh_conn(addr, &web).await;
    echo_once(&mut held, b"held").await;
    for i in 0..20 {
        assert_refused_at_once(&format!("refused #{i}"), silent_read(addr)).await;
    }
    echo_once(&mut held, b"held still").await;
    ferry.line("limit reached").await;

    let lines = ferry.stop();
    let limit: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("limit reached"))
        .collect();
    assert_eq!(limit.len(), 1, "one line per burst:\n{limit:#?}");
    let line = limit[0];
    assert!(line.split_whitespace().any(|f| f == "refused=1"), "{line}");
    assert!(line.contains("listener=inbound"), "{line}");
    assert!(line.contains("-max-conns"), "{line}");
}
