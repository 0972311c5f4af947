//! Test harness: a dev PKI on disk, ferry started in-process from real
//! command-line flags, plain and mTLS echo servers with counters, raw mesh
//! clients with any certificate, and `eventually` for conditions with a
//! deadline. Every socket is on 127.0.0.1, port 0.

#![allow(dead_code)] // not every test module uses every helper

#[cfg(feature = "xds")]
pub mod ads;
pub mod envoy;
pub mod fake_agent;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::identity::dev_ca::{DevCa, Leaf, LeafSpec};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How long any single wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Logs to the test's captured output when RUST_LOG-style debugging is wanted.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_test_writer()
        .try_init();
}

/// An empty environment: tests never read the process environment.
pub const NO_ENV: [(&str, &str); 0] = [];

/// Agent watch timing for tests: the fake agent answers blocking queries as
/// soon as something changes, so only the rate limit and backoff are cut.
pub fn fast_watch() -> ferry::control::agent::WatchPolicy {
    ferry::control::agent::WatchPolicy {
        wait: Duration::from_secs(30),
        min_interval: Duration::from_millis(20),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        heartbeat: Duration::from_millis(100),
    }
}

/// A dev CA and a directory laid out as `-certs` expects.
pub struct Pki {
    pub ca: DevCa,
    dir: tempfile::TempDir,
}

impl Pki {
    /// A new CA with a random trust domain; `ca.pem` is written.
    pub fn new() -> Pki {
        Pki::with_trust_domain(&ferry::identity::dev_ca::random_trust_domain())
    }

    /// A new CA for `trust_domain`.
    pub fn with_trust_domain(trust_domain: &str) -> Pki {
        let ca = DevCa::generate(trust_domain).expect("generate CA");
        let dir = tempfile::tempdir().expect("tempdir");
        ca.write(dir.path()).expect("write CA");
        Pki { ca, dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn dir_arg(&self) -> String {
        self.dir.path().display().to_string()
    }

    pub fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    /// Issues a Consul-shaped leaf for `service` in dc1 and writes it to the dir.
    pub fn leaf(&self, service: &str) -> Leaf {
        let leaf = self
            .ca
            .leaf(service, "dc1", Duration::from_secs(3600))
            .expect("leaf");
        ferry::identity::dev_ca::write_leaf(self.dir(), service, &leaf).expect("write leaf");
        leaf
    }

    /// Issues a leaf exactly as `spec` says (not written to the dir).
    pub fn issue(&self, spec: &LeafSpec) -> Leaf {
        self.ca.issue(spec).expect("issue")
    }

    /// The SPIFFE URI for `service` in dc1.
    pub fn uri(&self, service: &str) -> String {
        self.ca.spiffe_uri("dc1", service)
    }

    /// A path inside the dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A running ferry, started in-process from command-line flags.
pub struct Ferry {
    pub running: ferry::Running,
}

impl Ferry {
    /// Parses `args` exactly as the binary would and starts the proxy.
    /// Panics with the error text if the flags are refused.
    pub async fn start(args: &[&str]) -> Ferry {
        let argv = std::iter::once("ferry").chain(args.iter().copied());
        let cli = ferry::cli::parse(argv).unwrap_or_else(|e| panic!("flags {args:?}: {e}"));
        let (config, _warnings) = ferry::Config::from_args(&cli.proxy, &NO_ENV)
            .unwrap_or_else(|e| panic!("config {args:?}: {e}"));
        let running = ferry::start(config, fast_watch())
            .await
            .expect("start ferry");
        Ferry { running }
    }

    pub fn inbound(&self) -> SocketAddr {
        self.running.inbound.expect("ferry has an inbound listener")
    }

    pub fn upstream(&self, name: &str) -> SocketAddr {
        self.running
            .upstream(name)
            .expect("ferry has that upstream")
    }

    pub fn metrics(&self) -> &ferry::ops::metrics::Metrics {
        &self.running.metrics
    }
}

/// Counters kept by a test server.
#[derive(Default, Debug)]
pub struct Counts {
    pub accepted: AtomicUsize,
    pub closed: AtomicUsize,
}

impl Counts {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A plain TCP echo server (the "local app"): copies what it reads back
/// until EOF, then shuts down its write side.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl EchoServer {
    pub async fn start() -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        EchoServer::on(listener)
    }

    /// Serves on an already-bound listener (to restart on a known port).
    pub fn on(listener: TcpListener) -> EchoServer {
        let addr = listener.local_addr().expect("addr");
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.accepted.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    echo(&mut s).await;
                    c.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        EchoServer { addr, counts, task }
    }

    pub fn addr_arg(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}

/// An mTLS echo server presenting `leaf` and requiring a client certificate
/// from `pki`'s CA: an upstream instance without a ferry in front of it.
pub struct TlsEchoServer {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl TlsEchoServer {
    pub async fn start(pki: &Pki, leaf: &Leaf) -> TlsEchoServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tls echo");
        TlsEchoServer::on(pki, leaf, listener)
    }

    /// Serves on an already-bound listener (to bring an instance back on its port).
    pub fn on(pki: &Pki, leaf: &Leaf, listener: TcpListener) -> TlsEchoServer {
        let addr = listener.local_addr().expect("addr");
        let config = server_config(pki, leaf);
        let acceptor = TlsAcceptor::from(config);
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                c.accepted.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let c = c.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(s).await {
                        echo(&mut tls).await;
                    }
                    c.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        TlsEchoServer { addr, counts, task }
    }
}

impl Drop for TlsEchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certs")
}

fn key(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("key")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS server config presenting `leaf`, requiring client certs from `pki`.
pub fn server_config(pki: &Pki, leaf: &Leaf) -> Arc<ServerConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(pki.ca.cert_pem()) {
        roots.add(c).expect("root");
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .expect("verifier");
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&leaf.cert_pem), key(&leaf.key_pem))
        .expect("server cert");
    Arc::new(config)
}

/// A mesh client that presents `client` (or no certificate) and accepts any
/// server certificate: for testing what ferry's *inbound* side refuses.
pub fn raw_client(client: Option<&Leaf>) -> TlsConnector {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer));
    let config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(certs(&leaf.cert_pem), key(&leaf.key_pem))
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

/// The server name raw clients send.
pub fn any_name() -> ServerName<'static> {
    ServerName::try_from("ferry.test").expect("name")
}

#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Sends `msg`, half-closes, and returns everything read back until EOF.
/// An error or reset counts as "nothing came back" only if `Err` is returned.
pub async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(DEADLINE, async {
        s.write_all(msg).await?;
        s.shutdown().await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await?;
        Ok(got)
    })
    .await
    .unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "round trip timed out",
        ))
    })
}

/// Connects to a plain listener (an upstream of ferry) and checks that
/// `msg` comes back intact through the mesh.
pub async fn assert_echo(addr: SocketAddr, msg: &[u8]) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let got = round_trip(&mut s, msg).await.expect("round trip");
    assert_eq!(got.len(), msg.len(), "echoed length through {addr}");
    assert!(got == msg, "echoed bytes differ through {addr}");
}

/// Waits until `check` returns true, polling every 10 ms, or panics after
/// DEADLINE with `what`.
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut check: F) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {DEADLINE:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `fut` for at most DEADLINE.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?}: {what}"))
}

/// An address where nothing listens (connections are refused): bound, then released.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

/// A mesh pair: `server_svc`'s ferry fronting an echo app, and
/// `client_svc`'s ferry with an upstream to it. Extra inbound flags go in
/// `inbound_extra` (e.g. intentions).
pub struct Mesh {
    pub pki: Pki,
    pub app: EchoServer,
    pub server: Ferry,
    pub client: Ferry,
}

impl Mesh {
    pub async fn start(client_svc: &str, server_svc: &str, inbound_extra: &[&str]) -> Mesh {
        let pki = Pki::new();
        pki.leaf(client_svc);
        pki.leaf(server_svc);
        let app = EchoServer::start().await;
        let dir = pki.dir_arg();
        let app_addr = app.addr_arg();
        let mut args = vec![
            "-service",
            server_svc,
            "-listen",
            "127.0.0.1:0",
            "-service-addr",
            &app_addr,
            "-certs",
            &dir,
        ];
        args.extend_from_slice(inbound_extra);
        let server = Ferry::start(&args).await;
        let up = format!("{server_svc}:127.0.0.1:0");
        let inst = format!("{server_svc}={}", server.inbound());
        let client = Ferry::start(&[
            "-service",
            client_svc,
            "-upstream",
            &up,
            "-upstream-addr",
            &inst,
            "-certs",
            &dir,
        ])
        .await;
        Mesh {
            pki,
            app,
            server,
            client,
        }
    }

    /// The client-side ferry's local listener for the server service.
    pub fn entry(&self, server_svc: &str) -> SocketAddr {
        self.client.upstream(server_svc)
    }
}

/// The real binary, its stderr collected line by line; killed on drop.
pub struct FerryProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl FerryProcess {
    /// Runs ferry with `args` and an empty environment. `FERRY_BIN` names
    /// another build to run instead (to measure a scenario against an older
    /// ferry, e.g. the flood tests before and after a change).
    pub fn start(args: &[&str]) -> FerryProcess {
        let bin =
            std::env::var_os("FERRY_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_ferry").into());
        let mut child = Command::new(bin)
            .args(args)
            .env_clear()
            // Allocator tuning (MALLOC_*) passes through, for the soak.
            .envs(std::env::vars().filter(|(k, _)| k.starts_with("MALLOC_")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        FerryProcess {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// The first line containing `needle`, waiting for it (async, so the
    /// in-process agent keeps answering meanwhile).
    pub async fn line(&self, needle: &str) -> String {
        let find = || {
            let lines = self.lines.lock().unwrap();
            lines.iter().find(|l| l.contains(needle)).cloned()
        };
        eventually(&format!("a log line containing {needle:?}"), || {
            find().is_some()
        })
        .await;
        find().unwrap()
    }

    /// The `listen=` address of the first line containing `needle`.
    pub async fn listen_addr(&self, needle: &str) -> SocketAddr {
        let l = self.line(needle).await;
        let start = l.find(" listen=").expect("listen= field") + " listen=".len();
        l[start..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .expect("address")
    }

    /// Kills the process and returns everything it wrote to stderr.
    pub fn stop(&mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for FerryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl FerryProcess {
    /// The child's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends signal `name` (`TERM`, `INT`, ...) to this child, by its PID.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {}", self.pid());
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits (async, polling every 10 ms) up to `limit` for the process to
    /// exit; panics if it is still running then.
    pub async fn exit_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("ferry (pid {}) still running after {limit:?}", self.pid());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// How many connections `m` has counted closed for `direction` (`inbound` or
/// `upstream`), `service` and `outcome` (`done`, `denied`, `failed`).
pub fn closed_count(
    m: &ferry::ops::metrics::Metrics,
    direction: &'static str,
    service: &str,
    outcome: &'static str,
) -> u64 {
    m.closed
        .get_or_create(&ferry::ops::metrics::ClosedLabel {
            direction,
            service: service.to_string(),
            outcome,
        })
        .get()
}

/// Makes closing `s` send a TCP reset instead of a FIN (SO_LINGER 0), so
/// dropping it afterwards is an abrupt failure, not an orderly close.
pub fn reset_on_close(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
}

/// A mesh client connection (TLS over TCP) to a ferry's public listener.
pub type MeshConn = tokio_rustls::client::TlsStream<TcpStream>;

/// A completed mesh handshake to `addr` presenting `leaf`.
pub async fn mesh_conn(addr: SocketAddr, leaf: &Leaf) -> MeshConn {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    within("handshake", raw_client(Some(leaf)).connect(any_name(), tcp))
        .await
        .expect("handshake")
}

/// Writes `msg` and reads the same bytes back, leaving the connection open.
pub async fn echo_once<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut buf = vec![0u8; msg.len()];
    within("echo", s.read_exact(&mut buf))
        .await
        .expect("read echo");
    assert_eq!(buf, msg);
}

/// Half-closes and reads to EOF, expecting nothing more: an orderly end of
/// a held connection.
pub async fn finish<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    s.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    within("EOF after half-close", s.read_to_end(&mut rest))
        .await
        .expect("read to EOF");
    assert!(rest.is_empty(), "nothing more: {rest:?}");
}

/// Resident memory (KiB) and open descriptors of process `pid`, from /proc.
pub fn proc_usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

/// The number in a scraped Prometheus sample (counter, gauge or untyped).
pub fn sample_value(metric: &str, value: &prometheus_parse::Value) -> f64 {
    match value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{metric}: unexpected value {other:?}"),
    }
}

/// Flags for a standalone `api` ferry with certificates in `dir`, listening
/// on a free port in front of the app at `app`, plus `extra`.
pub fn api_args<'a>(dir: &'a str, app: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "-service",
        "api",
        "-listen",
        "127.0.0.1:0",
        "-service-addr",
        app,
        "-certs",
        dir,
    ];
    args.extend_from_slice(extra);
    args
}
