//! Hostile clients on the public mTLS port: a flood of connections that
//! never speak, client certificate chains that are too deep, too big or
//! built to make path building explode, and TLS messages that claim to be
//! enormous. Each test runs the real binary ([`FerryProcess`]), so the
//! descriptors and memory it measures in `/proc/<pid>` are ferry's alone,
//! and each proves three things: the hostile connection is refused (and
//! counted), the local app never sees it, and a genuine mTLS client is
//! served afterwards by the same, still running, process.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry::identity::dev_ca::Leaf;
use prometheus_parse::Scrape;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::support::*;

/// A refusal by the TLS stack (not by a timeout) must be seen within this long.
const AT_ONCE: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------
// /metrics, read as a Prometheus scraper would.

async fn scrape(admin: SocketAddr) -> Scrape {
    scrape_with(&http(), admin).await
}

async fn scrape_with(client: &reqwest::Client, admin: SocketAddr) -> Scrape {
    let url = format!("http://{admin}/metrics");
    let body = within(&format!("GET {url}"), async {
        let resp = client.get(&url).send().await.expect("GET /metrics");
        assert_eq!(resp.status().as_u16(), 200, "GET {url}");
        resp.text().await.expect("body")
    })
    .await;
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("/metrics parses")
}

/// The sum of every sample of `metric` whose labels include all of `labels`.
fn total(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| sample_value(metric, &x.value))
        .sum()
}

/// Scrapes until ferry has counted `want` failed handshakes in all, and
/// returns that scrape; exactly `want`, so nothing else was refused.
async fn failed_handshakes_reach(fx: &Target, want: f64, what: &str) -> Scrape {
    let deadline = Instant::now() + DEADLINE;
    let after = loop {
        let s = scrape(fx.admin).await;
        if total(&s, HANDSHAKE_FAILED, &[]) >= want {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: ferry never counted {want} failed handshakes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        total(&after, HANDSHAKE_FAILED, &[]),
        want,
        "{what}: one failed handshake each"
    );
    after
}

/// Each value of `label` on `metric` with its (non-zero) sample, for reports.
fn by_label(s: &Scrape, metric: &str, label: &str) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = s
        .samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter_map(|x| {
            let v = match x.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let l = x.labels.get(label)?;
            (v > 0.0).then(|| (l.to_string(), v))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

const REFUSED: &str = "ferry_connections_refused_total";
const EVICTED: &str = "ferry_handshake_evictions_total";
const HANDSHAKE_FAILED: &str = "ferry_inbound_handshake_failures_total";
const ACCEPTED: &str = "ferry_inbound_connections_accepted_total";

// ---------------------------------------------------------------------------
// 1. A flood of silent connections.

/// How a held silent socket ended.
#[derive(Debug, Default)]
struct Endings {
    /// Orderly close by ferry (FIN), with nothing sent.
    eof: usize,
    /// Reset by ferry.
    reset: usize,
    /// One or more TLS alert records, then the close.
    alert_then_close: usize,
    /// Bytes that are not a TLS alert: must never happen.
    data: usize,
    /// Still open at the deadline: must never happen.
    still_open: usize,
}

/// Opens `n` TCP connections to `fx`'s public port that send nothing, at
/// most `BATCH` connecting at once, each connect bounded in time. Returns
/// the sockets that connected and how many connects failed (refused, reset
/// or timed out: a shed connection, which is allowed).
///
/// Paced by ferry's own `accepted` counter: a batch starts only once at
/// most `BATCH` earlier connections can still be waiting in the kernel's
/// accept queue. ferry's listener has a backlog of 128 (mio's default,
/// which tokio's `TcpListener::bind` uses); a client that outruns ferry's
/// accept loop overflows it, the kernel drops SYNs and clients retry after
/// 1 s, 3 s, ... That sheds load before ferry sees it, but would make this
/// test take minutes and measure the kernel, not ferry.
async fn open_silent(fx: &Target, n: usize) -> (Vec<TcpStream>, usize) {
    const BATCH: usize = 48;
    const CONNECT_LIMIT: Duration = Duration::from_secs(3);
    let http = http();
    let accepted = || async { total(&scrape_with(&http, fx.admin).await, ACCEPTED, &[]) as usize };
    let accepted0 = accepted().await;
    let addr = fx.inbound;
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    let mut left = n;
    while left > 0 {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let done = accepted().await - accepted0;
            if held.len() <= done + BATCH {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ferry stopped accepting: {done} of {} connections accepted",
                held.len()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let k = left.min(BATCH);
        let mut set = JoinSet::new();
        for _ in 0..k {
            set.spawn(tokio::time::timeout(
                CONNECT_LIMIT,
                TcpStream::connect(addr),
            ));
        }
        while let Some(r) = set.join_next().await {
            match r.expect("connect task") {
                Ok(Ok(s)) => held.push(s),
                _ => failed += 1,
            }
        }
        left -= k;
    }
    (held, failed)
}

/// Reads every socket in `held` until ferry closes it or `deadline` passes,
/// all at once, and tallies how each ended.
async fn await_close(held: Vec<TcpStream>, deadline: Instant) -> Endings {
    #[derive(Debug)]
    enum End {
        Eof,
        Reset,
        AlertThenClose,
        Data,
        StillOpen,
    }
    let mut set = JoinSet::new();
    for mut s in held {
        set.spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            // Bounded: each read either ends the loop or adds bytes, and
            // the whole loop ends at the deadline.
            loop {
                match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                    Err(_) => return End::StillOpen,
                    Ok(Ok(0)) | Ok(Err(_)) if !got.is_empty() => {
                        return if is_alerts(&got) {
                            End::AlertThenClose
                        } else {
                            End::Data
                        };
                    }
                    Ok(Ok(0)) => return End::Eof,
                    Ok(Err(_)) => return End::Reset,
                    Ok(Ok(n)) => {
                        got.extend_from_slice(&buf[..n]);
                        if got.len() > 64 {
                            return End::Data;
                        }
                    }
                }
            }
        });
    }
    let mut e = Endings::default();
    while let Some(r) = set.join_next().await {
        match r.expect("read task") {
            End::Eof => e.eof += 1,
            End::Reset => e.reset += 1,
            End::AlertThenClose => e.alert_then_close += 1,
            End::Data => e.data += 1,
            End::StillOpen => e.still_open += 1,
        }
    }
    e
}

/// True if `bytes` is a sequence of whole TLS alert records (content type
/// 21, a 0x03xx version, length 2).
fn is_alerts(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes.len().is_multiple_of(7)
        && bytes
            .chunks(7)
            .all(|r| r[0] == 0x15 && r[1] == 0x03 && r[3..5] == [0, 2])
}

/// 10,000 TCP connections that never send a byte (default `-max-conns 1024`
/// and `-max-handshakes 128`, `-handshake-timeout 2s`): past the pending
/// budget each newcomer makes room by closing the oldest silent one, and
/// the last ones still pending are closed at the timeout; a connection
/// established before the flood keeps echoing while they are held, every
/// one of them is closed by ferry within the timeout plus a margin, each is
/// accounted for exactly once as either an eviction
/// (`ferry_handshake_evictions_total`) or a failed handshake, nothing is
/// refused, none reaches the app, ferry's descriptors return to their
/// baseline, and a new mTLS client is served.
///
/// The count is min(10,000, soft RLIMIT_NOFILE - 500): every held socket is
/// a descriptor of this test process (ferry's are its own, as a separate
/// process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_half_open_connections_are_shed_and_established_traffic_continues() {
    let t0 = Instant::now();
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
    const CLOSE_MARGIN: Duration = Duration::from_secs(5);
    let soft = soft_nofile_limit();
    let n = 10_000.min(soft.saturating_sub(500));
    eprintln!("flood: soft RLIMIT_NOFILE {soft}, opening {n} silent connections");
    assert!(
        n >= 1_000,
        "a flood needs descriptors; soft limit is {soft}"
    );

    let mut fx = Target::start(&["-handshake-timeout", "2s"]).await;
    let mut live = mesh_conn(fx.inbound, &fx.web).await;
    echo_once(&mut live, b"before the flood").await;
    let before = scrape(fx.admin).await;
    assert_eq!(total(&before, REFUSED, &[]), 0.0, "nothing refused yet");
    let (rss0, fds0) = fx.proc_usage();

    // The flood. Sample ferry's descriptors meanwhile, to report the peak.
    let peak_fds = Arc::new(AtomicU64::new(fds0 as u64));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, on, pid) = (peak_fds.clone(), sampling.clone(), fx.ferry.pid());
        tokio::spawn(async move {
            let stop_at = Instant::now() + Duration::from_secs(30);
            while on.load(Ordering::Relaxed) && Instant::now() < stop_at {
                peak.fetch_max(proc_usage(pid).1 as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let flood_start = Instant::now();
    let (held, connect_failed) = open_silent(&fx, n).await;
    let flood_done = Instant::now();
    let opened_in = flood_done - flood_start;
    eprintln!(
        "flood: {} connected, {connect_failed} connects failed, in {opened_in:?}",
        held.len()
    );
    assert_eq!(held.len() + connect_failed, n);

    // While the flood is held: the established connection still echoes,
    // promptly, and ferry is alive.
    let echo_t = Instant::now();
    echo_once(&mut live, b"during the flood").await;
    let echo_during = echo_t.elapsed();
    fx.assert_alive("the flood");

    // Every held socket is closed by ferry: evicted to make room, or at the
    // handshake timeout, counted from accept, which was before `flood_done`.
    let deadline = flood_done + HANDSHAKE_TIMEOUT + CLOSE_MARGIN;
    let held_count = held.len();
    let endings = await_close(held, deadline).await;
    let closed_by = flood_done.elapsed();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    eprintln!("flood: endings {endings:?}, all read {closed_by:?} after the flood");
    assert_eq!(
        endings.still_open, 0,
        "ferry left silent connections open past handshake timeout + {CLOSE_MARGIN:?}"
    );
    assert_eq!(
        endings.data, 0,
        "ferry sent a silent client something other than an alert"
    );
    fx.assert_alive("closing the flood");

    // Descriptors: back to the baseline (the listeners, the admin socket,
    // the held connection and its app socket), give or take a few.
    let pid = fx.ferry.pid();
    eventually(
        "ferry's descriptors back to their pre-flood baseline",
        || proc_usage(pid).1 <= fds0 + 4,
    )
    .await;
    let (rss1, fds1) = fx.proc_usage();

    // The established connection survived the whole flood; a new one works;
    // the app saw only these two.
    echo_once(&mut live, b"after the flood").await;
    fx.assert_still_serves("the flood").await;
    assert_eq!(
        fx.app.counts.accepted(),
        2,
        "only the two genuine clients reached the app"
    );
    finish(&mut live).await;

    // Accounting: every connection ferry accepted from the flood was either
    // evicted or failed its handshake, exactly once.
    let want_accepted = (held_count + 2) as f64;
    let scrape_deadline = Instant::now() + DEADLINE;
    let after = loop {
        let s = scrape(fx.admin).await;
        let flood_counted = total(&s, EVICTED, &[]) + total(&s, HANDSHAKE_FAILED, &[]);
        if total(&s, ACCEPTED, &[]) == want_accepted && flood_counted == held_count as f64 {
            break s;
        }
        assert!(
            Instant::now() < scrape_deadline,
            "accounting never matched: accepted {} (want {want_accepted}), evicted {:?}, \
             handshake failures {:?} (want {held_count} together)",
            total(&s, ACCEPTED, &[]),
            by_label(&s, EVICTED, "reason"),
            by_label(&s, HANDSHAKE_FAILED, "reason"),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        total(&after, EVICTED, &[]) > 0.0,
        "the flood was shed by eviction"
    );
    assert_eq!(total(&after, REFUSED, &[]), 0.0, "nothing was refused");
    assert_eq!(
        total(&after, HANDSHAKE_FAILED, &[]),
        total(&after, HANDSHAKE_FAILED, &[("reason", "timeout")]),
        "every admitted silent connection ended at the handshake timeout"
    );
    eprintln!(
        "flood: evicted {:?}, handshake failures {:?}; fds baseline {fds0}, peak {}, after {fds1}; \
         RSS KiB before {rss0}, after {rss1}; echo during the flood took {echo_during:?}; \
         test took {:?}",
        by_label(&after, EVICTED, "reason"),
        by_label(&after, HANDSHAKE_FAILED, "reason"),
        peak_fds.load(Ordering::Relaxed),
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 2. Client certificate chains.

/// The root CA of `pki` as an rcgen issuer, loaded from the very files
/// ferry trusts (`ca.pem`, `ca-key.pem`).
fn root_issuer(pki: &Pki) -> Issuer<'static, KeyPair> {
    let cert = std::fs::read_to_string(pki.path("ca.pem")).expect("ca.pem");
    let key = std::fs::read_to_string(pki.path("ca-key.pem")).expect("ca-key.pem");
    let key = KeyPair::from_pem(&key).expect("CA key");
    Issuer::from_ca_cert_pem(&cert, key).expect("CA issuer")
}

/// CA certificate parameters: subject CN `cn`, no path length limit, valid
/// for a day from a minute ago.
fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(1);
    p.not_after = now + time::Duration::days(1);
    p
}

/// A chain of `depth` intermediates under `root`, each signing the next.
/// Returns their PEMs in the order a peer sends them (the leaf's issuer
/// first) and the issuer for the deepest one.
fn intermediates(
    root: Issuer<'static, KeyPair>,
    depth: usize,
) -> (Vec<String>, Issuer<'static, KeyPair>) {
    let mut parent = root;
    let mut pems = Vec::with_capacity(depth);
    for i in 0..depth {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let params = ca_params(&format!("hostile intermediate {i}"));
        let cert = params.signed_by(&key, &parent).expect("intermediate");
        pems.push(cert.pem());
        parent = Issuer::new(params, key);
    }
    pems.reverse();
    (pems, parent)
}

/// A Consul-shaped `web` leaf (one URI SAN, clientAuth+serverAuth, empty
/// subject) signed by `issuer`, followed by `chain` in its PEM.
fn web_leaf(pki: &Pki, issuer: &Issuer<'_, KeyPair>, chain: &[String]) -> Leaf {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(pki.uri("web").try_into().expect("URI"))];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(1);
    p.not_after = now + time::Duration::hours(1);
    let cert = p.signed_by(&key, issuer).expect("leaf");
    Leaf {
        cert_pem: format!("{}{}", cert.pem(), chain.concat()),
        key_pem: key.serialize_pem(),
    }
}

/// The total DER size of the certificates in `leaf`'s PEM (about what the
/// TLS Certificate message carries, less 3 bytes of length per entry).
fn chain_der_len(leaf: &Leaf) -> usize {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .map(|c| c.expect("cert").len())
        .sum()
}

/// Presents `leaf` to `fx` and asserts it is accepted: echoed by the app.
async fn assert_chain_accepted(fx: &mut Target, name: &str, leaf: &Leaf) {
    let before = fx.app.counts.accepted();
    let r = within(name, mesh_echo(fx.inbound, leaf)).await;
    match r {
        Ok(got) => assert!(got == MSG, "{name}: accepted but echoed {got:?}"),
        Err(e) => panic!("{name}: refused, but should be accepted: {e}"),
    }
    assert_eq!(
        fx.app.counts.accepted(),
        before + 1,
        "{name}: reached the app"
    );
}

/// Presents `leaf` to `fx` and asserts it is refused in the handshake, by
/// the TLS stack (not a timeout), counted once as a failed handshake, and
/// never reaches the app; then a genuine client is still served. Returns
/// how long the refusal took and the `reason` label ferry counted.
async fn assert_chain_refused(fx: &mut Target, name: &str, leaf: &Leaf) -> (Duration, String) {
    let before = scrape(fx.admin).await;
    let app_before = fx.app.counts.accepted();
    let t = Instant::now();
    let r = within(name, mesh_echo(fx.inbound, leaf)).await;
    let took = t.elapsed();
    assert!(
        refused(&r),
        "{name}: ferry did not refuse the client: {r:?}"
    );
    let want = total(&before, HANDSHAKE_FAILED, &[]) + 1.0;
    let after = failed_handshakes_reach(fx, want, name).await;
    let reason = by_label(&after, HANDSHAKE_FAILED, "reason")
        .into_iter()
        .find(|(l, v)| *v > total(&before, HANDSHAKE_FAILED, &[("reason", l.as_str())]))
        .map(|(l, _)| l)
        .expect("a reason that moved");
    assert_ne!(
        reason, "timeout",
        "{name}: refused by the TLS stack, not the timeout"
    );
    assert_eq!(
        fx.app.counts.accepted(),
        app_before,
        "{name}: the app never reached"
    );
    fx.assert_still_serves(name).await;
    (took, reason)
}

/// Client chains that are deep, huge, or built to make path building
/// explode:
///
/// - ferry accepts at most `MAX_INTERMEDIATES` (4) intermediates before
///   any path building starts (webpki alone would allow 6): a valid chain
///   leaf → 4 intermediates → our root is **accepted**, leaf → 5 → root and
///   leaf → 40 → root are refused, labelled `bad_certificate`.
/// - A handshake message may be at most 64 KiB (rustls' cap, well under
///   TLS's 16 MiB): a valid leaf → intermediate → root chain padded with
///   copies of an unrelated certificate past 64 KiB is refused before any
///   certificate is even parsed, although the same chain unpadded is
///   accepted.
/// - 50 self-issued CAs that all name each other, under a leaf issued by
///   that name, would give webpki 50 × 49 × … candidate paths to search
///   (up to 200,000 steps, tens of milliseconds of CPU, spent before the
///   client has proven it holds any key). The intermediate cap refuses it
///   before the search; how long an established connection waits while
///   two arrive at once is reported, not asserted.
///
/// Each refusal is counted as a failed handshake labelled
/// `bad_certificate` (not a timeout, and not `identity`, the label of the
/// SPIFFE checks), never reaches the app, and a genuine client is served
/// afterwards by the same process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_very_long_certificate_chain_is_refused_without_harm() {
    let t0 = Instant::now();
    let mut fx = Target::start(&[]).await;

    // Controls: the hand-built chains are right, so a refusal below is
    // about depth or size alone.
    let (one, i1) = intermediates(root_issuer(&fx.pki), 1);
    let via_one = web_leaf(&fx.pki, &i1, &one);
    assert_chain_accepted(&mut fx, "leaf → 1 intermediate → root", &via_one).await;
    let (four, i4) = intermediates(root_issuer(&fx.pki), 4);
    let via_four = web_leaf(&fx.pki, &i4, &four);
    assert_chain_accepted(&mut fx, "leaf → 4 intermediates → root", &via_four).await;

    let mut report = Vec::new();

    // Too deep.
    for depth in [5, 40] {
        let (chain, issuer) = intermediates(root_issuer(&fx.pki), depth);
        let leaf = web_leaf(&fx.pki, &issuer, &chain);
        let name = format!("leaf → {depth} intermediates → root");
        let (took, reason) = assert_chain_refused(&mut fx, &name, &leaf).await;
        assert_eq!(reason, "bad_certificate", "{name}");
        report.push(format!(
            "{name} ({} bytes): refused in {took:?}, reason={reason}",
            chain_der_len(&leaf)
        ));
    }

    // Too big: the accepted one-intermediate chain, padded past 64 KiB
    // with copies of an unrelated CA certificate.
    let filler = ca_params("filler")
        .self_signed(&KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key"))
        .expect("filler");
    let copies = 70 * 1024 / filler.der().len() + 1;
    let filler = filler.pem();
    let huge = Leaf {
        cert_pem: format!("{}{}", via_one.cert_pem, filler.repeat(copies)),
        key_pem: via_one.key_pem.clone(),
    };
    let size = chain_der_len(&huge);
    assert!(size > 64 * 1024, "the padded chain is {size} bytes");
    let name = format!("valid chain padded with {copies} unrelated certificates");
    let (took, reason) = assert_chain_refused(&mut fx, &name, &huge).await;
    report.push(format!(
        "{name} ({size} bytes): refused in {took:?}, reason={reason}"
    ));

    // Built to explode: 50 self-issued CAs with one subject, different
    // keys; the leaf is issued under that subject.
    let mut decoys = Vec::new();
    let mut signer = None;
    for _ in 0..50 {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let params = ca_params("hostile loop");
        decoys.push(params.self_signed(&key).expect("decoy").pem());
        signer = Some(Issuer::new(params, key));
    }
    let leaf = web_leaf(&fx.pki, &signer.expect("a decoy"), &decoys);
    let name = "50 self-issued CAs naming each other".to_string();
    let (took, reason) = assert_chain_refused(&mut fx, &name, &leaf).await;
    assert_eq!(reason, "bad_certificate", "{name}");
    report.push(format!(
        "{name} ({} bytes): refused in {took:?}, reason={reason}",
        chain_der_len(&leaf)
    ));

    // Verification runs inline on ferry's runtime. With several hostile
    // chains at once, does an established connection keep its echo?
    // Asserted: it does, and every decoy is refused; the wait is reported.
    let mut live = mesh_conn(fx.inbound, &fx.web).await;
    echo_once(&mut live, b"before the storm").await;
    const STORM: usize = 2;
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::channel(STORM);
    let mut storm = JoinSet::new();
    let t = Instant::now();
    for _ in 0..STORM {
        let (addr, leaf, sent) = (fx.inbound, leaf.clone(), sent_tx.clone());
        storm.spawn(async move {
            let tcp = TcpStream::connect(addr).await?;
            // TLS 1.3: the client's handshake ends once its Certificate is
            // on the wire; from then on ferry is verifying it.
            let mut tls = raw_client(Some(&leaf)).connect(any_name(), tcp).await?;
            let _ = sent.send(()).await;
            round_trip(&mut tls, MSG).await
        });
    }
    for _ in 0..STORM {
        within("the storm's chains on the wire", sent_rx.recv())
            .await
            .expect("a storm client handshook");
    }
    let e = Instant::now();
    echo_once(&mut live, b"during the storm").await;
    let stalled = e.elapsed();
    while let Some(r) = within("the storm's refusals", storm.join_next()).await {
        let r = r.expect("storm task");
        assert!(
            refused(&r),
            "a decoy chain in the storm was accepted: {r:?}"
        );
    }
    report.push(format!(
        "{STORM} of those at once: all refused after {:?}; an established connection's echo meanwhile took {stalled:?}",
        t.elapsed()
    ));
    finish(&mut live).await;

    // The accepted chains are still accepted: nothing was cached or broken.
    assert_chain_accepted(&mut fx, "leaf → 4 intermediates → root, again", &via_four).await;
    fx.assert_alive("every chain");
    eprintln!(
        "chains:\n  {}\ntest took {:?}",
        report.join("\n  "),
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 3. Oversized TLS messages.

/// A real ClientHello (TLS 1.3 and 1.2) as rustls sends it: one record.
fn real_client_hello() -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), any_name()).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    assert_eq!(out[0], 0x16, "a handshake record");
    out
}

/// Where a ClientHello `body`'s extensions block starts (at its 2-byte
/// length) and how long it is.
fn extensions(body: &[u8]) -> (usize, usize) {
    // legacy_version, random, session_id, cipher_suites, compression_methods
    let mut at = 2 + 32;
    at += 1 + body[at] as usize;
    at += 2 + u16::from_be_bytes([body[at], body[at + 1]]) as usize;
    at += 1 + body[at] as usize;
    let len = u16::from_be_bytes([body[at], body[at + 1]]) as usize;
    assert_eq!(at + 2 + len, body.len(), "extensions end the ClientHello");
    (at, len)
}

/// The length a ClientHello's handshake header claims, in `records`.
fn hello_len(records: &[u8]) -> usize {
    assert_eq!(records[5], 0x01, "a ClientHello");
    u32::from_be_bytes([0, records[6], records[7], records[8]]) as usize
}

/// `hello` (one record holding one ClientHello) with a padding extension
/// (type 21) of `pad` zero bytes appended, so that the ClientHello body is
/// that much bigger, re-framed as records of at most 16 KiB.
fn padded_client_hello(hello: &[u8], pad: usize) -> Vec<u8> {
    let record_len = u16::from_be_bytes([hello[3], hello[4]]) as usize;
    let msg = &hello[5..5 + record_len];
    assert_eq!(msg[0], 0x01, "a ClientHello");
    let body = &msg[4..];
    let (at, ext_len) = extensions(body);
    let new_ext_len = ext_len + 4 + pad;
    assert!(new_ext_len <= 0xffff, "extensions fit their 16-bit length");

    let mut new_body = body[..at].to_vec();
    new_body.extend_from_slice(&(new_ext_len as u16).to_be_bytes());
    new_body.extend_from_slice(&body[at + 2..]);
    new_body.extend_from_slice(&[0x00, 0x15]);
    new_body.extend_from_slice(&(pad as u16).to_be_bytes());
    new_body.resize(new_body.len() + pad, 0);

    let mut msg = vec![0x01];
    msg.extend_from_slice(&(new_body.len() as u32).to_be_bytes()[1..]);
    msg.extend_from_slice(&new_body);
    records(0x16, &msg)
}

/// `payload` framed as records of content type `typ`, at most 16 KiB each.
fn records(typ: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload.len() / 16384 * 5 + 5);
    for chunk in payload.chunks(16384) {
        out.extend_from_slice(&[typ, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// What one hostile hello did.
#[derive(Debug)]
struct Sent {
    /// Bytes written before the write side failed or we stopped.
    written: usize,
    /// What ferry sent back before closing.
    reply: Vec<u8>,
    /// From connect to ferry's close (EOF or error on read).
    closed_after: Duration,
}

/// Connects to `addr`, writes `first`, then up to `more` further bytes of
/// `filler` records (content type 0x16), stopping at the first write error;
/// then reads until ferry closes the connection, at most DEADLINE.
async fn send_hostile(addr: SocketAddr, first: &[u8], more: usize) -> Sent {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut written = 0;
    let mut ok = s.write_all(first).await.is_ok();
    if ok {
        written += first.len();
    }
    let filler = records(0x16, &[0u8; 16384]);
    while ok && written < first.len() + more {
        // A write that blocks means ferry stopped reading without closing:
        // bounded, and then the read below finds out whether it closes.
        match tokio::time::timeout(AT_ONCE, s.write_all(&filler)).await {
            Ok(Ok(())) => written += filler.len(),
            _ => ok = false,
        }
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = t + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("ferry left a hostile hello open for {DEADLINE:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                reply.extend_from_slice(&buf[..n]);
                assert!(
                    reply.len() <= 64 * 1024,
                    "ferry keeps answering a hostile hello"
                );
            }
        }
    }
    Sent {
        written,
        reply,
        closed_after: t.elapsed(),
    }
}

/// Sends a near-64 KiB (legal) padded ClientHello and reads ferry's first
/// record header: it must be a handshake record (the ServerHello).
async fn big_legal_hello_is_answered(addr: SocketAddr, hello: &[u8]) -> Duration {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(hello).await.expect("write the hello");
    let mut header = [0u8; 5];
    within(
        "ferry's answer to a big ClientHello",
        s.read_exact(&mut header),
    )
    .await
    .expect("a reply");
    assert_eq!(
        header[0], 0x16,
        "a ServerHello record, not an alert: {header:?}"
    );
    t.elapsed()
}

/// Messages that claim or carry more than a TLS peer may send: a record
/// header claiming 65,535 bytes (over TLS's 16 KiB + 2 KiB record cap), a
/// ClientHello header claiming 16 MiB followed by 1 MiB of records, and a
/// real rustls ClientHello padded to just over rustls' 64 KiB
/// handshake-message cap. Each is closed by the TLS stack at once (well
/// inside `-handshake-timeout 5s`), with at most an alert, counted as a
/// failed handshake, and never reaches the app. Sixteen of each at once
/// leave ferry's resident memory within a few MiB of where it was: it
/// never buffers what was claimed. A padded ClientHello just under 64 KiB
/// is legal and is answered with a ServerHello. Afterwards a genuine client
/// is served by the same process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_client_hello_is_refused_without_harm() {
    const CONCURRENT: usize = 16;
    const MORE: usize = 1024 * 1024;
    let t0 = Instant::now();
    let mut fx = Target::start(&["-handshake-timeout", "5s"]).await;
    let addr = fx.inbound;

    let hello = real_client_hello();
    // Just under rustls' cap: the ClientHello body 64 bytes short of 64 KiB.
    let legal = padded_client_hello(&hello, 0xffff - hello_len(&hello) - 4 - 64);
    // Just over it: the extensions block at its 16-bit maximum.
    let over = padded_client_hello(&hello, 0xffff - extensions(&hello[9..]).1 - 4);
    assert!(
        hello_len(&over) > 0xffff,
        "the ClientHello is {} bytes",
        hello_len(&over)
    );
    assert!(
        hello_len(&legal) < 0xffff,
        "the ClientHello is {} bytes",
        hello_len(&legal)
    );

    let record_65535 = [0x16, 0x03, 0x01, 0xff, 0xff];
    let mut claim_16mib = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
    claim_16mib.extend_from_slice(&hello[9..]);
    claim_16mib.resize(5 + 16384, 0);

    // Warm up (first connections allocate per-thread buffers), then measure.
    mesh_echo(addr, &fx.web).await.expect("warm-up echo");
    for first in [&record_65535[..], &claim_16mib, &over] {
        send_hostile(addr, first, 0).await;
    }
    let warm_app = fx.app.counts.accepted();
    let before = scrape(fx.admin).await;
    let failed_before = total(&before, HANDSHAKE_FAILED, &[]);
    let (rss0, _) = fx.proc_usage();

    let peak_rss = Arc::new(AtomicU64::new(rss0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, on, pid) = (peak_rss.clone(), sampling.clone(), fx.ferry.pid());
        tokio::spawn(async move {
            let stop_at = Instant::now() + Duration::from_secs(30);
            while on.load(Ordering::Relaxed) && Instant::now() < stop_at {
                peak.fetch_max(proc_usage(pid).0, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let cases: [(&str, &[u8], usize); 3] = [
        (
            "record header claiming 65,535 bytes, then 1 MiB",
            &record_65535,
            MORE,
        ),
        (
            "ClientHello claiming 16 MiB, then 1 MiB of records",
            &claim_16mib,
            MORE,
        ),
        ("real ClientHello padded past 64 KiB", &over, 0),
    ];
    let mut hostile = 0;
    for (name, first, more) in cases {
        let mut set = JoinSet::new();
        for _ in 0..CONCURRENT {
            let first = first.to_vec();
            set.spawn(async move { send_hostile(addr, &first, more).await });
        }
        let mut results = Vec::new();
        while let Some(r) = set.join_next().await {
            results.push(r.expect("hostile task"));
        }
        hostile += results.len();
        let slowest = results.iter().map(|r| r.closed_after).max().unwrap();
        let most_written = results.iter().map(|r| r.written).max().unwrap();
        eprintln!(
            "{name}: {CONCURRENT} at once, slowest closed after {slowest:?}, at most {most_written} bytes written, replies {:?}",
            results.iter().map(|r| r.reply.len()).collect::<Vec<_>>()
        );
        for r in &results {
            assert!(
                r.closed_after < AT_ONCE,
                "{name}: closed after {:?}, not at once: {r:?}",
                r.closed_after
            );
            assert!(
                r.reply.is_empty() || is_alerts(&r.reply),
                "{name}: ferry answered with something other than an alert: {:?}",
                r.reply
            );
        }
        fx.assert_alive(name);
    }
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let peak = peak_rss.load(Ordering::Relaxed);
    let (rss1, _) = fx.proc_usage();
    eprintln!("RSS KiB: before {rss0}, peak {peak}, after {rss1}");
    assert!(
        peak <= rss0 + 6 * 1024,
        "ferry's RSS rose from {rss0} to {peak} KiB under {hostile} oversized hellos: it buffered what they claimed"
    );

    // Each was one failed handshake; none reached the app.
    let want = failed_before + hostile as f64;
    let after = failed_handshakes_reach(&fx, want, "the oversized hellos").await;
    assert_eq!(
        total(&after, HANDSHAKE_FAILED, &[("reason", "timeout")]),
        total(&before, HANDSHAKE_FAILED, &[("reason", "timeout")]),
        "refused by the TLS stack, none by the timeout"
    );
    eprintln!(
        "handshake failures by reason: {:?}",
        by_label(&after, HANDSHAKE_FAILED, "reason")
    );
    assert_eq!(
        fx.app.counts.accepted(),
        warm_app,
        "no hostile hello reached the app"
    );

    // A big but legal ClientHello is parsed and answered.
    let answered = big_legal_hello_is_answered(addr, &legal).await;
    eprintln!(
        "a {}-byte padded ClientHello was answered with a ServerHello in {answered:?}",
        legal.len()
    );

    fx.assert_still_serves("oversized hellos").await;
    eprintln!("test took {:?}", t0.elapsed());
}
