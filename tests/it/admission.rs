//! Admission under a flood: honest peers keep being served while junk
//! connections (half-open, stalled ClientHellos, random bytes, plain HTTP)
//! are held open, from one address or spread over many; an upstream flood
//! from the local app does not starve the inbound side; and an app that
//! connects before the certificates arrive is served, not refused.
//!
//! Floods run against the real binary (its own process, default limits),
//! so the test's own clients never share ferry's runtime. Every loop is
//! bounded in count and time; all traffic is on 127.0.0.0/8.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry::identity::dev_ca::Leaf;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::support::fake_agent::{AgentOpts, FakeAgent, Instance};
use crate::support::*;

/// What an honest connection must manage during a flood.
const HONEST_LIMIT: Duration = Duration::from_secs(2);
/// How soon after the junk closes fds and memory must be back.
const RECOVERY: Duration = Duration::from_secs(15);
const MSG: &[u8] = b"an honest request";

/// The junk of one flood, all held open until the flood is dropped.
#[derive(Clone, Copy)]
pub struct Flood {
    /// TCP connections that send nothing.
    pub silent: usize,
    /// Connections that send the start of a ClientHello and stall.
    pub partial: usize,
    /// Connections that send random bytes.
    pub random: usize,
    /// Connections that send a plain HTTP request.
    pub http: usize,
    /// Source addresses: 127.0.0.`first` ..= 127.0.0.`last`, round robin.
    pub first: u8,
    pub last: u8,
}

impl Flood {
    /// The flood measured on main before admission control: 2,000
    /// half-open, 200 stalled ClientHellos, 100 of random bytes and 20 of
    /// plain HTTP, scaled down when the descriptor limit is low.
    pub fn measured(first: u8, last: u8) -> Flood {
        let room = soft_nofile_limit().saturating_sub(600);
        let silent = 2000.min(room.saturating_sub(320));
        Flood {
            silent,
            partial: 200,
            random: 100,
            http: 20,
            first,
            last,
        }
    }

    fn total(&self) -> usize {
        self.silent + self.partial + self.random + self.http
    }

    /// Opens every junk connection to `addr` (at most 64 connecting at
    /// once, each connect bounded), counting opened ones in `opened`.
    /// Returns the sockets, which stay open until dropped.
    pub async fn open(self, addr: SocketAddr, opened: Arc<AtomicUsize>) -> Vec<TcpStream> {
        const AT_ONCE: usize = 64;
        const CONNECT_LIMIT: Duration = Duration::from_secs(3);
        let kinds: Vec<u8> = std::iter::repeat_n(0u8, self.silent)
            .chain(std::iter::repeat_n(1, self.partial))
            .chain(std::iter::repeat_n(2, self.random))
            .chain(std::iter::repeat_n(3, self.http))
            .collect();
        let span = (self.last - self.first) as usize + 1;
        let mut held = Vec::with_capacity(kinds.len());
        for (batch_no, batch) in kinds.chunks(AT_ONCE).enumerate() {
            let mut set = JoinSet::new();
            for (i, kind) in batch.iter().copied().enumerate() {
                let n = batch_no * AT_ONCE + i;
                let src = Ipv4Addr::new(127, 0, 0, self.first + (n % span) as u8);
                set.spawn(tokio::time::timeout(
                    CONNECT_LIMIT,
                    junk(addr, src, kind, n),
                ));
            }
            while let Some(r) = set.join_next().await {
                if let Ok(Ok(Ok(s))) = r {
                    opened.fetch_add(1, Ordering::Relaxed);
                    held.push(s);
                }
            }
        }
        held
    }
}

/// One junk connection of `kind` from `src`.
async fn junk(addr: SocketAddr, src: Ipv4Addr, kind: u8, n: usize) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    let mut s = sock.connect(addr).await?;
    match kind {
        // A TLS record announcing a 512-byte ClientHello, cut after 50.
        1 => {
            let mut hello = vec![
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ];
            hello.resize(50, 0x42);
            s.write_all(&hello).await?;
        }
        2 => {
            let mut x = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let bytes: Vec<u8> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            s.write_all(&bytes).await?;
        }
        3 => s.write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n").await?,
        _ => {}
    }
    Ok(s)
}

/// How the honest connections made during a flood fared.
#[derive(Debug)]
pub struct Honest {
    /// Handshake-and-echo times of the ones that succeeded within the limit.
    pub times: Vec<Duration>,
    /// How many were tried.
    pub tried: usize,
    /// Why the others failed.
    pub failures: Vec<String>,
}

impl Honest {
    /// The 99th percentile of the successful times (the slowest, for a few).
    pub fn p99(&self) -> Duration {
        let mut t = self.times.clone();
        t.sort();
        t.get(((t.len() * 99).div_ceil(100)).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    }
}

/// `n` honest mTLS connections to `addr` from 127.0.0.1, one every
/// `every`, each a handshake and one echo within [`HONEST_LIMIT`].
pub async fn honest(addr: SocketAddr, web: &Leaf, n: usize, every: Duration) -> Honest {
    let mut out = Honest {
        times: Vec::new(),
        tried: n,
        failures: Vec::new(),
    };
    for _ in 0..n {
        let t0 = Instant::now();
        let attempt = async {
            let tcp = TcpStream::connect(addr).await?;
            let mut tls = raw_client(Some(web)).connect(any_name(), tcp).await?;
            round_trip(&mut tls, MSG).await
        };
        match tokio::time::timeout(HONEST_LIMIT, attempt).await {
            Ok(Ok(got)) if got == MSG => out.times.push(t0.elapsed()),
            Ok(Ok(got)) => out.failures.push(format!("echoed {got:?}")),
            Ok(Err(e)) => out.failures.push(e.to_string()),
            Err(_) => out
                .failures
                .push(format!("not done within {HONEST_LIMIT:?}")),
        }
        tokio::time::sleep(every).await;
    }
    out
}

/// Holds a flood open against a default-limits ferry while honest clients
/// connect and an established connection echoes; then closes the junk and
/// checks that descriptors and memory come back.
async fn flood_scenario(name: &str, flood: Flood) {
    let mut fx = Target::start(&[]).await;
    let mut live = mesh_conn(fx.inbound, &fx.web).await;
    echo_once(&mut live, b"before the flood").await;
    let pid = fx.ferry.pid();
    let (rss0, fds0) = proc_usage(pid);

    let opened = Arc::new(AtomicUsize::new(0));
    let opening = tokio::spawn(flood.open(fx.inbound, opened.clone()));
    // The honest clients start once a quarter of the junk is in.
    let quarter = flood.total() / 4;
    let deadline = Instant::now() + DEADLINE;
    while opened.load(Ordering::Relaxed) < quarter {
        assert!(
            Instant::now() < deadline,
            "{name}: the flood never got going"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let honest = honest(fx.inbound, &fx.web, 10, Duration::from_millis(100)).await;
    echo_once(&mut live, b"during the flood").await;
    let junk = within("the whole flood opens", opening)
        .await
        .expect("flood task");
    echo_once(&mut live, b"with the flood held").await;
    fx.assert_alive(&format!("{name}, held"));
    let (rss_peak, fds_peak) = proc_usage(pid);
    eprintln!(
        "{name}: {} junk connections held; honest {}/{} within {HONEST_LIMIT:?}, p99 {:?}, \
         failures {:?}; ferry RSS {rss0} -> {rss_peak} KiB, fds {fds0} -> {fds_peak}",
        junk.len(),
        honest.times.len(),
        honest.tried,
        honest.p99(),
        honest.failures
    );
    assert!(
        honest.times.len() >= 9,
        "{name}: only {}/{} honest connections completed: {:?}",
        honest.times.len(),
        honest.tried,
        honest.failures
    );

    drop(junk);
    let closed_at = Instant::now();
    let back = loop {
        let (rss, fds) = proc_usage(pid);
        if fds <= fds0 + 4 && rss <= rss0 + rss0 / 2 + 4096 {
            break (rss, fds);
        }
        assert!(
            closed_at.elapsed() < RECOVERY,
            "{name}: not back near the baseline {RECOVERY:?} after the junk closed: \
             RSS {rss} KiB (baseline {rss0}), fds {fds} (baseline {fds0})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "{name}: back to RSS {} KiB, fds {} in {:?}",
        back.0,
        back.1,
        closed_at.elapsed()
    );
    echo_once(&mut live, b"after the flood").await;
    fx.assert_alive(&format!("{name}, closed"));
    assert_eq!(
        fx.app.counts.accepted(),
        1 + honest.times.len(),
        "{name}: only honest clients reached the app"
    );
    finish(&mut live).await;
}

/// One attacking address (127.0.0.2) holding 2,320 junk connections: at
/// least 9 of 10 honest mTLS connections made during the flood complete
/// within 2 s, the established connection echoes throughout, ferry's fds
/// and RSS return near their baseline within 15 s of the junk closing, and
/// ferry never exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_peers_are_served_during_a_single_source_flood() {
    flood_scenario("single-source flood", Flood::measured(2, 2)).await;
}

/// The same flood spread over 127.0.0.2 ... 127.0.0.200, where no
/// per-address share can single the attacker out and the eviction of the
/// least promising handshakes must do the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_peers_are_served_during_a_spread_flood() {
    flood_scenario("spread flood", Flood::measured(2, 200)).await;
}

/// The local app opens 1,500 connections to an upstream whose instance
/// accepts and never answers (each holds a slot until its deadline):
/// `-max-upstream-conns` (default 1024) bounds them, and honest inbound
/// peers are still served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_flood_from_the_app_does_not_starve_the_inbound_side() {
    let pki = Pki::new();
    pki.leaf("api");
    let web = pki.leaf("web");
    let app = EchoServer::start().await;
    let blackhole = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hole = blackhole.local_addr().unwrap();
    // Accepts and holds every connection, saying nothing, until dropped.
    let holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = blackhole.accept().await {
            held.push(s);
        }
    });
    let (dir, app_addr) = (pki.dir_arg(), app.addr_arg());
    let inst = format!("db={hole}");
    let mut ferry = FerryProcess::start(&api_args(
        &dir,
        &app_addr,
        &["-upstream", "db:127.0.0.1:0", "-upstream-addr", &inst],
    ));
    let inbound = ferry.listen_addr("inbound listener ready").await;
    let upstream = ferry.listen_addr("upstream listener ready").await;

    let n = 1500.min(soft_nofile_limit().saturating_sub(600));
    let mut set = JoinSet::new();
    for _ in 0..n {
        set.spawn(tokio::time::timeout(
            Duration::from_secs(3),
            TcpStream::connect(upstream),
        ));
    }
    let mut app_side = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(Ok(Ok(s))) = r {
            app_side.push(s);
        }
    }
    let honest = honest(inbound, &web, 10, Duration::from_millis(50)).await;
    eprintln!(
        "upstream flood: {} local connections; honest inbound {}/{}, p99 {:?}, failures {:?}",
        app_side.len(),
        honest.times.len(),
        honest.tried,
        honest.p99(),
        honest.failures
    );
    assert!(ferry.try_exit().is_none(), "ferry is alive");
    assert!(
        honest.times.len() >= 9,
        "inbound starved: {:?}",
        honest.failures
    );
    drop(app_side);
    holding.abort();
}

/// The agent delays the leaf by 2 s: an app connection made to the
/// upstream listener at once, before the certificates, waits and then
/// carries its bytes intact; `/ready` says 503 until then.
#[tokio::test]
async fn an_app_that_connects_before_the_certificates_is_served() {
    const LEAF_API: &str = "/v1/agent/connect/ca/leaf/web";
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let api = TlsEchoServer::start(&pki, &pki.leaf("api")).await;
    agent.set_instances("api", vec![Instance::sidecar(api.addr)]);
    agent.stall(LEAF_API, true);
    let url = agent.url();
    let ferry = FerryProcess::start(&[
        "-http-addr",
        &url,
        "-service",
        "web",
        "-upstream",
        "api:127.0.0.1:0",
        "-admin-addr",
        "127.0.0.1:0",
    ]);
    let upstream = ferry.listen_addr("upstream listener ready").await;
    let admin = ferry.listen_addr("admin listener ready").await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    agent.wait_for_call("GET", LEAF_API, DEADLINE).await;

    // The app connects and writes at once, before ferry has a leaf.
    let t0 = Instant::now();
    let mut app = TcpStream::connect(upstream)
        .await
        .expect("listening before the certificates");
    let payload: Vec<u8> = (0..64_000u32).map(|i| (i % 251) as u8).collect();
    app.write_all(&payload).await.expect("write early");
    let ready = reqwest::get(format!("http://{admin}/ready"))
        .await
        .expect("GET /ready");
    assert_eq!(
        ready.status().as_u16(),
        503,
        "not ready before the certificates"
    );

    // The agent answers 2 s late.
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent.stall(LEAF_API, false);
    let mut echoed = vec![0u8; payload.len()];
    within("the early bytes come back", async {
        use tokio::io::AsyncReadExt;
        app.read_exact(&mut echoed).await
    })
    .await
    .expect("echo");
    assert!(echoed == payload, "bytes intact through the wait");
    assert!(t0.elapsed() >= Duration::from_secs(2), "it really waited");
    ferry.line("certificates ready").await;
    let ready = reqwest::get(format!("http://{admin}/ready"))
        .await
        .expect("GET /ready");
    assert_eq!(ready.status().as_u16(), 200, "ready once serving");
}
