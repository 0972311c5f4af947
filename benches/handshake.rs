//! The cost of setting up one mesh connection, in-process.
//!
//! - `handshake/full`: one full TLS 1.3 mTLS handshake between `web` (client)
//!   and `api` (server) over an in-memory pipe, with ferry's configs from one
//!   dev CA: the server's verifier checks the client's chain and SPIFFE ID,
//!   the client's verifier checks the server's chain and that it is `api`.
//!   The client's config is ferry's with resumption switched off, so every
//!   iteration is a full handshake.
//! - `handshake/resumed`: the same with ferry's client config as is, which
//!   resumes from the session tickets of the previous connection. Certificates
//!   are not exchanged or verified again on resumption. Every iteration checks
//!   that it really resumed.
//!
//!   Both handshake cases end when the server's first byte reaches the
//!   client: that is when a TLS 1.3 client reads the session tickets the
//!   server sends after the handshake, so both cases do the same work apart
//!   from the handshake itself.
//! - `peer_identity`: reading the SPIFFE identity out of the client
//!   certificate the server received (x509 parse + SPIFFE ID parse), as the
//!   inbound listener does after every handshake.
//! - `balancer_candidates`: `Balancer::candidates(3)` over 3 healthy
//!   instances, from one thread.
//!
//! Run: `cargo bench --bench handshake` (well under a minute).
//! `cargo test --benches` runs each case once as a smoke test.

mod common;

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ferry::identity::peer_identity;
use ferry::proxy::balancer::{Balancer, EjectionPolicy};
use rustls::client::Resumption;
use rustls::{ClientConfig, HandshakeKind, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

/// Capacity of the in-memory pipe: larger than a whole handshake flight, so
/// neither side ever waits for buffer space.
const PIPE_CAPACITY: usize = 64 * 1024;
/// The byte the server sends once the handshake is done.
const FIRST_BYTE: u8 = b'!';

/// Number of instances behind the balancer (a small, typical upstream).
const INSTANCES: u16 = 3;
/// Candidates asked for per connection (the upstream listener's retry budget).
const MAX_CANDIDATES: usize = 3;
/// Ferry's default ejection policy (`-eject-after 3 -eject-for 10s`).
const EJECTION: EjectionPolicy = EjectionPolicy {
    after_failures: 3,
    duration: Duration::from_secs(10),
};

/// Warm-up per case.
const WARM_UP: Duration = Duration::from_millis(1000);
/// Measurement per case: 4 cases keep the whole run well under a minute.
const MEASUREMENT: Duration = Duration::from_millis(4000);
/// Samples per case (criterion's default is 100; 50 fits a sub-millisecond
/// handshake into the measurement time on a slow, shared machine).
const SAMPLES: usize = 50;

/// One connection: handshake, then the server's first byte reaches the
/// client. Returns the two ends for the caller to inspect.
async fn connection(mesh: &common::Mesh, client: Arc<ClientConfig>) -> common::TlsPair {
    let (mut c, mut s) = common::connect(mesh, client, PIPE_CAPACITY)
        .await
        .expect("mTLS handshake between web and api");
    s.write_all(&[FIRST_BYTE]).await.expect("server writes");
    s.flush().await.expect("server flushes");
    let mut got = [0u8; 1];
    c.read_exact(&mut got).await.expect("client reads");
    assert_eq!(got, [FIRST_BYTE], "first byte arrives intact");
    (c, s)
}

/// How the client side of a connection was set up.
fn kind(pair: &common::TlsPair) -> Option<HandshakeKind> {
    pair.0.get_ref().1.handshake_kind()
}

/// Setup check (not measured): TLS 1.3, both identities verified and as
/// expected, and the handshake kind the case claims to measure.
fn check(pair: &common::TlsPair, want: HandshakeKind) {
    let (client, server) = (pair.0.get_ref().1, pair.1.get_ref().1);
    assert_eq!(client.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(client.handshake_kind(), Some(want), "client side");
    assert_eq!(server.handshake_kind(), Some(want), "server side");
    let service = |certs: Option<&[rustls::pki_types::CertificateDer<'_>]>| {
        let leaf = certs.and_then(|c| c.first()).expect("peer certificate");
        peer_identity(leaf).expect("peer identity").id.service
    };
    assert_eq!(service(client.peer_certificates()), "api");
    assert_eq!(service(server.peer_certificates()), "web");
}

fn handshakes(c: &mut Criterion, rt: &Runtime, mesh: &common::Mesh) {
    let mut group = c.benchmark_group("handshake");

    let mut no_resumption = (*mesh.client).clone();
    no_resumption.resumption = Resumption::disabled();
    let full = Arc::new(no_resumption);
    check(
        &rt.block_on(connection(mesh, full.clone())),
        HandshakeKind::Full,
    );
    group.bench_function("full", |b| {
        b.iter(|| {
            let pair = rt.block_on(connection(mesh, full.clone()));
            assert_eq!(kind(&pair), Some(HandshakeKind::Full));
            pair
        })
    });

    // Ferry's client config as is: the first connection is full and leaves
    // session tickets; every later one resumes from them.
    let ferry = mesh.client.clone();
    check(
        &rt.block_on(connection(mesh, ferry.clone())),
        HandshakeKind::Full,
    );
    check(
        &rt.block_on(connection(mesh, ferry.clone())),
        HandshakeKind::Resumed,
    );
    group.bench_function("resumed", |b| {
        b.iter(|| {
            let pair = rt.block_on(connection(mesh, ferry.clone()));
            assert_eq!(kind(&pair), Some(HandshakeKind::Resumed));
            pair
        })
    });
    group.finish();
}

fn identity(c: &mut Criterion, rt: &Runtime, mesh: &common::Mesh) {
    let (_, server) = rt.block_on(connection(mesh, mesh.client.clone()));
    let leaf = server
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("the client presented a certificate")
        .clone();
    c.bench_function("peer_identity", |b| {
        b.iter(|| peer_identity(black_box(leaf.as_ref())).expect("web's identity"))
    });
}

fn balancer(c: &mut Criterion, mesh: &common::Mesh) {
    let balancer = Balancer::new(EJECTION);
    balancer.set_instances(
        (1..=INSTANCES)
            .map(|i| {
                let addr = SocketAddr::from(([10, 0, 0, i as u8], 21000 + i));
                (addr, mesh.server_name.clone())
            })
            .collect(),
    );
    assert_eq!(
        balancer.candidates(MAX_CANDIDATES).len(),
        INSTANCES as usize
    );
    c.bench_function("balancer_candidates", |b| {
        b.iter(|| balancer.candidates(black_box(MAX_CANDIDATES)))
    });

    // Contended: other threads pick and report on the same balancer, as
    // the connections of a busy multi-threaded ferry do. They stop when
    // this measurement ends.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..CONTENDERS {
            scope.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for inst in balancer.candidates(MAX_CANDIDATES) {
                        balancer.report_success(&inst);
                    }
                }
            });
        }
        // Set on the way out, even if the measurement panics.
        let _stop = StopOnDrop(&stop);
        c.bench_function("balancer_candidates_contended", |b| {
            b.iter(|| balancer.candidates(black_box(MAX_CANDIDATES)))
        });
    });
}

struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Threads picking from the balancer alongside the measured one.
const CONTENDERS: usize = 3;

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let mesh = common::mesh();
    handshakes(c, &rt, &mesh);
    identity(c, &rt, &mesh);
    balancer(c, &mesh);
}

criterion_group! {
    name = handshake_benches;
    config = Criterion::default()
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
        .sample_size(SAMPLES);
    targets = benches
}
criterion_main!(handshake_benches);
