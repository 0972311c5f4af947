//! The soak (`make soak`, ignored by the normal test run): two ferry
//! processes in Consul mode against the fake agent carry `SOAK_SHORT`
//! (200,000) short connections with intention flips and certificate
//! rotations going on, then hold `SOAK_HELD` connections open at once.
//! Halfway through, a mixed junk flood (2,320 connections spread over 199
//! addresses) hits api's public port: at least 9 in 10 honest mTLS clients
//! must still be served within 2 s, and the short connections go on.
//! No good connection may fail; RSS must stay flat across the short
//! connections (the leak check); after the held ones close, descriptors
//! must be back at their baseline, and RSS back near it.
//!
//! `SOAK_HELD` defaults to 9,000: each proxied connection costs each ferry
//! two sockets, and this machine's hard limit is 20,000 descriptors per
//! process. Where the limit allows, run it with `SOAK_HELD=10000`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::admission::{honest, Flood};
use crate::support::fake_agent::{AgentOpts, FakeAgent, Instance, Intention};
use crate::support::*;

fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One short exchange through the mesh; true if the echo came back whole.
async fn exchange(addr: std::net::SocketAddr, n: u64) -> bool {
    let msg = format!("soak {n:012}");
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(msg.as_bytes()).await.is_err() || s.shutdown().await.is_err() {
        return false;
    }
    let mut got = Vec::new();
    matches!(
        tokio::time::timeout(DEADLINE, s.read_to_end(&mut got)).await,
        Ok(Ok(_))
    ) && got == msg.as_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the soak takes minutes; run it with make soak"]
async fn soak() {
    let short = env_count("SOAK_SHORT", 200_000);
    let held = env_count("SOAK_HELD", 9_000);
    let pki = Pki::new();
    let agent = FakeAgent::start(AgentOpts::for_pki(&pki)).await;
    let app = EchoServer::start().await;
    let (url, app_addr) = (agent.url(), app.addr_arg());
    // Warn level keeps 200,000 access-log lines out of the collected
    // stderr, so the ports are chosen here (free, then released) instead
    // of read from the ready lines.
    let (api_addr, entry) = (dead_addr().await, dead_addr().await);
    let (api_listen, web_upstream) = (api_addr.to_string(), format!("api:{entry}"));
    let api = FerryProcess::start(&[
        "-service",
        "api",
        "-listen",
        &api_listen,
        "-service-addr",
        &app_addr,
        "-http-addr",
        &url,
        "-max-conns",
        "20000",
        "-max-handshakes",
        "1024",
        "-log-level",
        "warn",
    ]);
    let web = FerryProcess::start(&[
        "-service",
        "web",
        "-upstream",
        &web_upstream,
        "-http-addr",
        &url,
        "-max-upstream-conns",
        "20000",
        "-log-level",
        "warn",
    ]);
    agent.set_instances("api", vec![Instance::sidecar(api_addr)]);
    within("the mesh to carry a first exchange", async {
        while !exchange(entry, 0).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Baseline after a warm-up.
    for n in 0..1000 {
        assert!(exchange(entry, n).await, "warm-up {n}");
    }
    let base = [proc_usage(api.pid()), proc_usage(web.pid())];
    eprintln!(
        "baseline (RSS KiB, fds): api {:?}, web {:?}",
        base[0], base[1]
    );

    // Short connections, 64 at a time, with intention flips and rotations.
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Semaphore::new(64));
    let started = Instant::now();
    let mut peak = [0u64; 2];
    let mut tasks = Vec::new();
    let mut flood = None;
    for n in 0..short {
        if n == short / 2 {
            // Halfway: a mixed junk flood spread over 199 addresses hits
            // api's public port for a few seconds, while honest mTLS
            // clients connect to it directly and the short connections
            // carry on.
            let honest_web = pki.leaf("web");
            flood = Some(tokio::spawn(async move {
                let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let junk = tokio::spawn(Flood::measured(2, 200).open(api_addr, opened.clone()));
                let deadline = Instant::now() + DEADLINE;
                while opened.load(Ordering::Relaxed) < 500 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let during = honest(api_addr, &honest_web, 20, Duration::from_millis(50)).await;
                let junk = junk.await.expect("flood");
                let held = junk.len();
                drop(junk);
                (held, during)
            }));
        }
        if n % 20_000 == 10_000 {
            agent.set_leaf("api", &pki.leaf("api"));
            agent.set_leaf("web", &pki.leaf("web"));
        }
        if n % 5_000 == 0 {
            let flip = if (n / 5_000) % 2 == 0 {
                Intention::deny("billing", "api")
            } else {
                Intention::allow("billing", "api")
            };
            agent.add_intention(flip);
            let now = [proc_usage(api.pid()).0, proc_usage(web.pid()).0];
            peak = [peak[0].max(now[0]), peak[1].max(now[1])];
        }
        let permit = gate.clone().acquire_owned().await.expect("gate");
        let (ok, failed) = (ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            if exchange(entry, n).await {
                ok.fetch_add(1, Ordering::Relaxed);
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        }));
        if tasks.len() >= 10_000 {
            for t in tasks.drain(..) {
                t.await.expect("task");
            }
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    let secs = started.elapsed().as_secs_f64();
    if let Some(f) = flood {
        let (held, during) = f.await.expect("flood task");
        eprintln!(
            "flood: {held} junk connections held; honest mTLS {}/{} within 2s, p99 {:?}; failures {:?}",
            during.times.len(),
            during.tried,
            during.p99(),
            during.failures
        );
        assert!(
            during.times.len() * 10 >= during.tried * 9,
            "honest peers locked out during the flood: {:?}",
            during.failures
        );
    }
    eprintln!(
        "short: {} ok, {} failed in {secs:.1}s ({:.0}/s); peak RSS KiB api {} web {}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        short as f64 / secs,
        peak[0],
        peak[1]
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no good connection may fail"
    );
    // The leak check: hundreds of thousands of connections come and go, and
    // memory stays flat (a leak of even 1 KiB each would add 200 MB).
    for (name, top, start) in [("api", peak[0], base[0].0), ("web", peak[1], base[1].0)] {
        assert!(
            top <= start + 32 * 1024,
            "{name}: RSS rose from {start} to {top} KiB over the short connections: a leak"
        );
    }

    // Held connections, twice: open them all, prove each works, close
    // them, and wait until both ferries are back to their baseline
    // descriptors (plus at most the 8 idle agent connections ferry pools)
    // and near their baseline RSS: jemalloc's background thread hands
    // freed pages back after its decay time (10 s). The second round
    // proves the first left nothing behind.
    let mut after_round = Vec::new();
    for round in 1..=2 {
        let mut streams = Vec::with_capacity(held as usize);
        for n in 0..held {
            let mut s = TcpStream::connect(entry)
                .await
                .unwrap_or_else(|e| panic!("round {round}, held {n}: {e}"));
            s.write_all(b"held").await.expect("write");
            let mut buf = [0u8; 4];
            within("held echo", s.read_exact(&mut buf))
                .await
                .expect("echo");
            streams.push(s);
        }
        let at_peak = [proc_usage(api.pid()), proc_usage(web.pid())];
        let per_conn = |i: usize| (at_peak[i].0.saturating_sub(base[i].0)) as f64 / held as f64;
        eprintln!(
            "round {round}: {held} held (RSS KiB, fds): api {:?}, web {:?}; RSS per held connection over baseline: api {:.1} KiB, web {:.1} KiB",
            at_peak[0], at_peak[1], per_conn(0), per_conn(1)
        );
        drop(streams);
        let fds_back = |i: usize, pid: u32| proc_usage(pid).1 <= base[i].1 + 8;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(fds_back(0, api.pid()) && fds_back(1, web.pid())) {
            assert!(
                Instant::now() < deadline,
                "round {round}: descriptors not back to baseline {base:?}: api {:?}, web {:?}",
                proc_usage(api.pid()),
                proc_usage(web.pid())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let closed_at = Instant::now();
        // Near baseline: at least 90 % of what the held connections took
        // is given back (the rest is allocator caches and metadata).
        let limit = |i: usize| base[i].0 + (at_peak[i].0.saturating_sub(base[i].0)) / 10;
        let rss_back = |i: usize, pid: u32| proc_usage(pid).0 <= limit(i);
        let deadline = closed_at + Duration::from_secs(45);
        while !(rss_back(0, api.pid()) && rss_back(1, web.pid())) {
            assert!(
                Instant::now() < deadline,
                "round {round}: RSS not back near baseline {base:?} (limits {} and {} KiB): api {:?}, web {:?}",
                limit(0),
                limit(1),
                proc_usage(api.pid()),
                proc_usage(web.pid())
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let rss = [proc_usage(api.pid()).0, proc_usage(web.pid()).0];
        eprintln!(
            "round {round} closed: RSS KiB api {} web {}, back near baseline after {:.1}s",
            rss[0],
            rss[1],
            closed_at.elapsed().as_secs_f64()
        );
        after_round.push(rss);
    }
    eprintln!("RSS KiB after each round, (api, web): {after_round:?}");
    let end = [proc_usage(api.pid()), proc_usage(web.pid())];
    eprintln!("after (RSS KiB, fds): api {:?}, web {:?}", end[0], end[1]);
}
