//! Throughput of ferry's splice path through TLS, against a plain baseline.
//!
//! Everything runs in memory on one current-thread runtime. A `web` client
//! dials `api` over an in-memory pipe with ferry's own mTLS configs (one dev
//! CA, SPIFFE checks on both sides), and [`ferry::proxy::splice::splice`] joins the
//! TLS server stream to a plain pipe that stands for the local app, as the
//! inbound listener does. One iteration moves one write of N bytes end to end
//! and reads all N out of the other end:
//!
//! - `splice_tls_peer_to_app`: the peer encrypts, splice reads (decrypts) and
//!   copies to the plain pipe, the app reads.
//! - `splice_tls_app_to_peer`: the app writes plain, splice copies into TLS
//!   (encrypts), the peer reads and decrypts.
//! - `splice_plain`: the same splice with plain pipes on both legs, so the
//!   cost of TLS shows as the ratio between the two.
//!
//! The connection is set up (and checked to carry the bytes intact) once per
//! path and size, then reused by every iteration.
//!
//! Run: `cargo bench --bench splice` (about a minute).
//! `cargo test --benches` runs each case once as a smoke test.

mod common;

use std::hint::black_box;
use std::io;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use ferry::proxy::splice::{splice, Spliced, Timers};
use tokio::io::{duplex, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Small write: an interactive request or reply; per-write overhead (task
/// wake-ups, one short TLS record each way) dominates.
const SMALL: usize = 1024;
/// One full TLS record of plaintext (a quarter of the splice buffer,
/// `ferry::proxy::splice::BUF_SIZE`).
const RECORD: usize = 16 * 1024;
/// Bulk write: 64 records per iteration, so per-byte costs (AEAD, copies)
/// dominate.
const BULK: usize = 1024 * 1024;
/// The write sizes measured, with the label each is reported under.
const SIZES: [(usize, &str); 3] = [(SMALL, "1KiB"), (RECORD, "16KiB"), (BULK, "1MiB")];

/// Capacity of each in-memory pipe in bytes, in the range of a default TCP
/// socket buffer; a writer that fills it waits for the reader, as on a socket.
const PIPE_CAPACITY: usize = 64 * 1024;

/// Warm-up per case.
const WARM_UP: Duration = Duration::from_millis(1000);
/// Measurement per case: 9 cases of warm-up, measurement and analysis keep
/// the whole run (once built) under a minute.
const MEASUREMENT: Duration = Duration::from_millis(3000);
/// Samples per case (criterion's minimum is 10; 30 keeps the 1 MiB TLS case
/// inside the measurement time on a slow, shared machine).
const SAMPLES: usize = 30;

/// One spliced connection: the end the peer holds, the end the app holds,
/// and the splice task between them.
struct Conn<P> {
    peer: P,
    app: DuplexStream,
    cancel: CancellationToken,
    task: JoinHandle<Spliced>,
}

impl<P> Conn<P> {
    /// Stops the splice and waits for it, so the next case starts clean.
    fn finish(self, rt: &Runtime) {
        self.cancel.cancel();
        rt.block_on(self.task).expect("splice task panicked");
    }
}

/// Starts `splice(a, b)` on the runtime, as a proxy connection task would.
fn start_splice<A, B>(rt: &Runtime, mut a: A, mut b: B) -> (CancellationToken, JoinHandle<Spliced>)
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let task = rt.spawn(async move { splice(&mut a, &mut b, Timers::default(), &token).await });
    (cancel, task)
}

/// peer ==TLS==> [ferry splice] --plain--> app, with ferry's configs.
fn tls_path(
    rt: &Runtime,
    mesh: &common::Mesh,
) -> Conn<tokio_rustls::client::TlsStream<DuplexStream>> {
    let (peer, server) = rt
        .block_on(common::connect(mesh, mesh.client.clone(), PIPE_CAPACITY))
        .expect("mTLS handshake between web and api");
    let (proxy_side, app) = duplex(PIPE_CAPACITY);
    let (cancel, task) = start_splice(rt, server, proxy_side);
    Conn {
        peer,
        app,
        cancel,
        task,
    }
}

/// peer --plain--> [ferry splice] --plain--> app.
fn plain_path(rt: &Runtime) -> Conn<DuplexStream> {
    let (peer, proxy_peer_side) = duplex(PIPE_CAPACITY);
    let (proxy_app_side, app) = duplex(PIPE_CAPACITY);
    let (cancel, task) = start_splice(rt, proxy_peer_side, proxy_app_side);
    Conn {
        peer,
        app,
        cancel,
        task,
    }
}

/// Writes all of `data` into `w` (and flushes, so a TLS writer emits its last
/// record) while reading exactly `data.len()` bytes out of `r` into `sink`.
async fn transfer<W, R>(w: &mut W, r: &mut R, data: &[u8], sink: &mut [u8]) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let write = async {
        w.write_all(data).await?;
        w.flush().await
    };
    tokio::try_join!(write, r.read_exact(sink))?;
    Ok(())
}

/// Bytes that are not all alike, so a mix-up would show in the setup check.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Which way the bench pushes bytes through a spliced connection.
#[derive(Clone, Copy)]
enum Way {
    PeerToApp,
    AppToPeer,
}

/// Measures one path at every size; `make` sets up a fresh connection per size.
fn bench_path<P, F>(c: &mut Criterion, rt: &Runtime, name: &str, way: Way, mut make: F)
where
    P: AsyncRead + AsyncWrite + Unpin,
    F: FnMut() -> Conn<P>,
{
    let mut group = c.benchmark_group(name);
    for (size, label) in SIZES {
        let mut conn = make();
        let Conn { peer, app, .. } = &mut conn;
        group.throughput(Throughput::Bytes(size as u64));
        match way {
            Way::PeerToApp => measure(&mut group, label, rt, peer, app, size),
            Way::AppToPeer => measure(&mut group, label, rt, app, peer, size),
        }
        conn.finish(rt);
    }
    group.finish();
}

/// One case: `size` bytes written into `w` and read out of `r` per iteration.
fn measure<W, R>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    label: &str,
    rt: &Runtime,
    w: &mut W,
    r: &mut R,
    size: usize,
) where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let data = payload(size);
    let mut sink = vec![0u8; size];
    // Setup check (not measured): the bytes come out intact.
    rt.block_on(transfer(w, r, &data, &mut sink))
        .expect("setup transfer");
    assert!(sink == data, "{label}: bytes changed on the way");
    group.bench_function(BenchmarkId::from_parameter(label), |b| {
        b.iter(|| {
            rt.block_on(transfer(w, r, black_box(&data), &mut sink))
                .expect("transfer");
        })
    });
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let mesh = common::mesh();

    bench_path(c, &rt, "splice_tls_peer_to_app", Way::PeerToApp, || {
        tls_path(&rt, &mesh)
    });
    bench_path(c, &rt, "splice_tls_app_to_peer", Way::AppToPeer, || {
        tls_path(&rt, &mesh)
    });
    bench_path(c, &rt, "splice_plain", Way::PeerToApp, || plain_path(&rt));
}

criterion_group! {
    name = splice_benches;
    config = Criterion::default()
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
        .sample_size(SAMPLES);
    targets = benches
}
criterion_main!(splice_benches);
