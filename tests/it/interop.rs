//! ferry against another TLS stack, the OpenSSL command line, standing in
//! for Envoy-style mesh peers:
//! - `openssl s_client` with a mesh leaf dials ferry's inbound listener,
//!   forced to TLS 1.2 and to TLS 1.3; without a client certificate it is
//!   refused.
//! - ferry's upstream dials `openssl s_server`, which requires a client
//!   certificate from the mesh CA and checks the SNI ferry sends; a server
//!   with the wrong identity is refused.
//!
//! The `openssl` binary must be on PATH: without it these tests fail, they
//! do not skip.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::support::*;

// ---------------------------------------------------------------------------
// openssl child processes

/// Runs `openssl version` once; panics with a clear message when the binary
/// is missing, so a CI image without OpenSSL fails loudly instead of passing.
fn openssl_version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        let out = Command::new("openssl")
            .arg("version")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "the interop tests need the `openssl` command-line tool on PATH \
                     (e.g. `apt-get install openssl`), but it could not be run: {e}"
                )
            });
        assert!(
            out.status.success(),
            "`openssl version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
}

/// Everything a child wrote to one of its pipes so far, and whether the pipe
/// has reached end of file.
#[derive(Default)]
struct Captured {
    text: Mutex<String>,
    eof: AtomicBool,
}

impl Captured {
    /// Copies `pipe` into a new `Captured` on a thread of its own (the pipe
    /// must be drained even while the test is busy elsewhere).
    fn drain(mut pipe: impl Read + Send + 'static) -> Arc<Captured> {
        let cap = Arc::new(Captured::default());
        let c = cap.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => c
                        .text
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
            c.eof.store(true, Ordering::SeqCst);
        });
        cap
    }

    fn get(&self) -> String {
        self.text.lock().unwrap().clone()
    }
}

/// One `openssl` process started by a test. Dropping it kills that process
/// (by its own handle, nothing else) if it is still running.
struct OpenSsl {
    what: String,
    child: Child,
    stdout: Arc<Captured>,
    stderr: Arc<Captured>,
}

impl OpenSsl {
    /// Starts `openssl <args>`, writes `input` to its stdin and then closes it
    /// (`None`: stdin is /dev/null).
    fn spawn(what: &str, args: &[String], input: Option<&[u8]>) -> OpenSsl {
        let version = openssl_version();
        let mut child = Command::new("openssl")
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot start openssl ({version}): {e}"));
        if let Some(bytes) = input {
            let mut stdin = child.stdin.take().expect("stdin is piped");
            // A few bytes: the pipe buffer takes them even before openssl reads.
            stdin.write_all(bytes).expect("write to openssl's stdin");
            // Dropping it closes stdin; with -ign_eof s_client keeps going.
        }
        let stdout = Captured::drain(child.stdout.take().expect("stdout is piped"));
        let stderr = Captured::drain(child.stderr.take().expect("stderr is piped"));
        OpenSsl {
            what: what.to_string(),
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        self.stdout.get()
    }

    fn stderr(&self) -> String {
        self.stderr.get()
    }

    /// Both outputs, for failure messages.
    fn dump(&self) -> String {
        format!(
            "{} ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            openssl_version(),
            self.stdout(),
            self.stderr()
        )
    }

    /// The exit status if the process has ended.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on openssl")
    }

    /// Waits (at most DEADLINE) for the process to exit and for both of its
    /// outputs to be read to the end.
    async fn finish(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.exited() {
                if self.stdout.eof.load(Ordering::SeqCst) && self.stderr.eof.load(Ordering::SeqCst)
                {
                    return status;
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out after {DEADLINE:?} waiting for {}", self.dump());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for OpenSsl {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1 for a process that cannot be told to use port 0
/// and report back. Small race: another process may take the port between
/// this listener closing and openssl binding it; [`s_server`] retries then.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    l.local_addr().expect("probe addr").port()
}

fn file(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// Starts `openssl s_server` in `-rev` mode (it answers each line with the
/// line reversed) on a free 127.0.0.1 port, requiring a client certificate
/// that chains to the Pki's CA. `extra` picks the certificate(s) and any
/// server-name checks. Returns once s_server prints `ACCEPT`.
async fn s_server(pki: &Pki, extra: &[String]) -> (OpenSsl, u16) {
    let mut last = String::new();
    for _attempt in 0..3 {
        let port = free_port();
        let mut args: Vec<String> = [
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-rev",
            "-Verify",
            "1",
            "-verify_return_error",
            "-CAfile",
            &file(pki.dir(), "ca.pem"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend_from_slice(extra);
        let mut server = OpenSsl::spawn("openssl s_server", &args, None);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if server.stdout().lines().any(|l| l.trim() == "ACCEPT") {
                return (server, port);
            }
            if server.exited().is_some() {
                server.finish().await;
                break;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "s_server did not print ACCEPT within {DEADLINE:?}: {}",
                    server.dump()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // It exited before accepting: most likely the port was taken in the
        // race described at free_port. Anything else is a real failure.
        let err = server.stderr();
        assert!(
            err.contains("Address already in use") || err.contains("unable to bind"),
            "s_server exited before accepting: {}",
            server.dump()
        );
        last = server.dump();
    }
    panic!("s_server could not bind a port in 3 attempts; last: {last}");
}

/// Owned strings from literals, for argument lists.
fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The certificate flags for s_server presenting `svc`'s leaf (`-cert/-key`)
/// or as its second context (`-cert2/-key2`).
fn server_cert(pki: &Pki, svc: &str, second: bool) -> Vec<String> {
    let (c, k) = if second {
        ("-cert2", "-key2")
    } else {
        ("-cert", "-key")
    };
    vec![
        c.into(),
        file(pki.dir(), &format!("{svc}.pem")),
        k.into(),
        file(pki.dir(), &format!("{svc}-key.pem")),
    ]
}

/// The SNI a Consul/Envoy client sends to reach `svc` in dc1, default
/// partition and namespace: `<svc>.default.dc1.internal.<trust-domain>`.
fn consul_sni(pki: &Pki, svc: &str) -> String {
    format!("{svc}.default.dc1.internal.{}", pki.trust_domain())
}

/// The value of s_server's `Hostname in TLS extension: "..."` line, if any.
fn sni_seen(server_stdout: &str) -> Option<String> {
    server_stdout.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Hostname in TLS extension: \"")
            .and_then(|rest| rest.strip_suffix('"'))
            .map(str::to_string)
    })
}

// ---------------------------------------------------------------------------
// the local app behind ferry's inbound listener

/// A local app that reads one newline-terminated request, answers
/// `pong: <request>` and closes: the reply is complete and the close is what
/// tells s_client (run with `-ign_eof`) that the exchange is over.
struct LineApp {
    addr: std::net::SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl LineApp {
    async fn start() -> LineApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("app addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let r = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    let mut s = BufReader::new(s);
                    let mut line = String::new();
                    let read = tokio::time::timeout(DEADLINE, s.read_line(&mut line)).await;
                    if !matches!(read, Ok(Ok(n)) if n > 0) {
                        return;
                    }
                    r.lock().unwrap().push(line.clone());
                    let mut s = s.into_inner();
                    let _ = s.write_all(format!("pong: {line}").as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        LineApp {
            addr,
            requests,
            task,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for LineApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// ferry for `api` with an inbound listener in front of a [`LineApp`].
async fn inbound_api(pki: &Pki, app: &LineApp) -> Ferry {
    let dir = pki.dir_arg();
    let app_addr = app.addr.to_string();
    Ferry::start(&api_args(&dir, &app_addr, &[])).await
}

/// `openssl s_client` to ferry's inbound listener at `addr`, as an Envoy
/// sidecar would dial it (the Consul SNI for api, the mesh CA as trust
/// anchor, the server chain verified), forced to `version` (`-tls1_2` /
/// `-tls1_3`), presenting `client`'s leaf if given. `-brief` prints the
/// handshake summary to stderr and only application data to stdout;
/// `-ign_eof` keeps s_client reading after its stdin ends, until ferry
/// closes the connection.
fn s_client(pki: &Pki, addr: std::net::SocketAddr, version: &str, client: Option<&str>) -> OpenSsl {
    let mut args = strings(&[
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        &consul_sni(pki, "api"),
        "-CAfile",
        &file(pki.dir(), "ca.pem"),
        "-verify_return_error",
        version,
        "-brief",
        "-ign_eof",
    ]);
    if let Some(svc) = client {
        args.extend(strings(&[
            "-cert",
            &file(pki.dir(), &format!("{svc}.pem")),
            "-key",
            &file(pki.dir(), &format!("{svc}-key.pem")),
        ]));
    }
    OpenSsl::spawn(
        &format!("openssl s_client {version}"),
        &args,
        Some(b"ping\n"),
    )
}

// ---------------------------------------------------------------------------
// s_client -> ferry inbound

/// An OpenSSL client with a mesh leaf, forced to `version`, gets through
/// ferry's inbound listener to the app and back; `expect` is what s_client
/// must report as the negotiated protocol.
async fn s_client_round_trip(version: &str, expect: &str) {
    let pki = Pki::new();
    pki.leaf("api");
    pki.leaf("web");
    let app = LineApp::start().await;
    let ferry = inbound_api(&pki, &app).await;

    let mut client = s_client(&pki, ferry.inbound(), version, Some("web"));
    let status = client.finish().await;
    assert!(status.success(), "s_client failed: {}", client.dump());
    let err = client.stderr();
    assert!(
        err.lines()
            .any(|l| l.trim() == format!("Protocol version: {expect}")),
        "s_client did not negotiate {expect}: {}",
        client.dump()
    );
    assert!(
        err.lines().any(|l| l.trim() == "Verification: OK"),
        "s_client did not verify ferry's certificate against ca.pem: {}",
        client.dump()
    );
    assert_eq!(
        client.stdout(),
        "pong: ping\n",
        "reply through ferry: {}",
        client.dump()
    );
    assert_eq!(app.requests(), ["ping\n"], "the app got the request");

    eventually("ferry to finish the connection", || {
        ferry.metrics().inbound_active.get() == 0
    })
    .await;
    let m = ferry.metrics();
    assert_eq!(m.authz_allowed.get(), 1);
    assert_eq!(m.inbound_handshake_failed.get(), 0);
    assert_eq!(m.inbound_bytes_in.get(), b"ping\n".len() as u64);
    assert_eq!(m.inbound_bytes_out.get(), b"pong: ping\n".len() as u64);
}

/// OpenSSL as a TLS 1.2 mesh client (what Envoy sidecars speak by default):
/// the mutual handshake completes at 1.2, the request reaches the app, the
/// reply comes back, and ferry's close ends s_client cleanly.
#[tokio::test]
async fn openssl_client_tls12_round_trips_through_inbound() {
    s_client_round_trip("-tls1_2", "TLSv1.2").await;
}

/// The same with OpenSSL forced to TLS 1.3.
#[tokio::test]
async fn openssl_client_tls13_round_trips_through_inbound() {
    s_client_round_trip("-tls1_3", "TLSv1.3").await;
}

/// An OpenSSL client that presents no certificate is refused during the
/// handshake at both TLS versions: it receives no data, the app is never
/// dialed, and ferry counts a failed inbound handshake.
#[tokio::test]
async fn openssl_client_without_certificate_is_refused() {
    let pki = Pki::new();
    pki.leaf("api");
    let app = LineApp::start().await;
    let ferry = inbound_api(&pki, &app).await;

    for (n, version) in [(1, "-tls1_2"), (2, "-tls1_3")] {
        let mut client = s_client(&pki, ferry.inbound(), version, None);
        let status = client.finish().await;
        assert!(
            !status.success(),
            "s_client without a certificate succeeded: {}",
            client.dump()
        );
        assert_eq!(client.stdout(), "", "no data came back: {}", client.dump());
        assert!(
            client.stderr().contains("alert certificate required"),
            "s_client should report ferry's certificate_required alert: {}",
            client.dump()
        );
        eventually("ferry to count the failed handshake", || {
            ferry.metrics().inbound_handshake_failed.get() == n
        })
        .await;
    }
    assert!(app.requests().is_empty(), "the app saw a request");
    assert_eq!(ferry.metrics().authz_allowed.get(), 0);
    assert_eq!(ferry.metrics().inbound_bytes_in.get(), 0);
}

// ---------------------------------------------------------------------------
// ferry upstream -> s_server

/// ferry for `web` with an upstream listener for `api` whose only instance
/// is 127.0.0.1:`port`. One attempt per connection, so a refusal is a
/// single handshake.
async fn upstream_web(pki: &Pki, port: u16) -> Ferry {
    let dir = pki.dir_arg();
    StandaloneArgs::new("web", &dir)
        .upstream("api", &[loopback(port)])
        .extra(&["-upstream-attempts", "1"])
        .start()
        .await
}

/// Sends one line through ferry's upstream listener, half-closes, and
/// returns everything read back until EOF (Err: reset or timeout).
async fn through_upstream(ferry: &Ferry, line: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(ferry.upstream("api"))
        .await
        .expect("connect to ferry's upstream listener");
    round_trip(&mut s, line).await
}

/// ferry dialing an OpenSSL server forced to `version`: s_server presents
/// billing's leaf by default and api's only after the client sent exactly
/// the Consul SNI for api (`-servername ... -servername_fatal` with
/// `-cert2/-key2`), so the handshake succeeding at all proves the SNI; the
/// logged server name proves its exact value. s_server also requires and
/// verifies ferry's client certificate against the mesh CA.
async fn s_server_round_trip(version: &str, expect: &str) {
    let pki = Pki::new();
    pki.leaf("web");
    pki.leaf("api");
    pki.leaf("billing");
    let sni = consul_sni(&pki, "api");
    let mut extra = server_cert(&pki, "billing", false);
    extra.extend(server_cert(&pki, "api", true));
    extra.extend(strings(&[
        "-servername",
        &sni,
        "-servername_fatal",
        version,
        "-naccept",
        "1",
    ]));
    let (mut server, port) = s_server(&pki, &extra).await;
    let ferry = upstream_web(&pki, port).await;

    let got = through_upstream(&ferry, b"hello openssl\n")
        .await
        .unwrap_or_else(|e| panic!("round trip failed ({e}): {}", server.dump()));
    assert_eq!(
        String::from_utf8_lossy(&got),
        "lssnepo olleh\n",
        "s_server's reversed line through ferry: {}",
        server.dump()
    );

    // -naccept 1: s_server exits after this connection, which flushes its
    // (pipe-buffered) stdout, where the server-name lines go.
    let status = server.finish().await;
    assert!(status.success(), "s_server: {}", server.dump());
    assert!(
        server
            .stderr()
            .lines()
            .any(|l| l.trim() == "Verification: OK"),
        "s_server verified ferry's client certificate: {}",
        server.dump()
    );
    let out = server.stdout();
    assert_eq!(
        sni_seen(&out).as_deref(),
        Some(sni.as_str()),
        "the SNI ferry sent: {}",
        server.dump()
    );
    assert!(
        out.contains("Switching server context."),
        "s_server switched to api's certificate on the SNI: {}",
        server.dump()
    );
    assert!(
        server
            .stderr()
            .lines()
            .any(|l| l.trim() == format!("Protocol version: {expect}")),
        "negotiated {expect}: {}",
        server.dump()
    );
    let m = ferry.metrics();
    assert_eq!(m.upstream_attempt_failed.get(), 0);
    assert_eq!(m.upstream_unavailable.get(), 0);
    eventually("ferry to count the bytes", || {
        m.upstream_bytes_in.get() == 14 && m.upstream_active.get() == 0
    })
    .await;
    assert_eq!(m.upstream_bytes_out.get(), 14);
}

/// ferry's upstream to an OpenSSL server over TLS 1.2: mutual TLS both
/// ways, the Consul SNI for the destination, bytes both ways.
#[tokio::test]
async fn upstream_to_openssl_server_tls12_sends_consul_sni() {
    s_server_round_trip("-tls1_2", "TLSv1.2").await;
}

/// The same over TLS 1.3.
#[tokio::test]
async fn upstream_to_openssl_server_tls13_sends_consul_sni() {
    s_server_round_trip("-tls1_3", "TLSv1.3").await;
}

/// The SNI check above is real: the same s_server expecting a different
/// server name (and presenting api's leaf either way, so the certificate
/// is not the reason) aborts the handshake, ferry gives up on the instance
/// and the local client gets no data.
#[tokio::test]
async fn openssl_server_expecting_another_sni_refuses_ferry() {
    let pki = Pki::new();
    pki.leaf("web");
    pki.leaf("api");
    let mut extra = server_cert(&pki, "api", false);
    extra.extend(server_cert(&pki, "api", true));
    let wrong = consul_sni(&pki, "payments");
    extra.extend(strings(&[
        "-servername",
        &wrong,
        "-servername_fatal",
        "-naccept",
        "1",
    ]));
    let (mut server, port) = s_server(&pki, &extra).await;
    let ferry = upstream_web(&pki, port).await;

    let got = through_upstream(&ferry, b"hello openssl\n").await;
    assert!(
        got.as_ref().map_or(true, |b| b.is_empty()),
        "no data may come back when the handshake fails: {got:?}"
    );
    eventually("ferry to count the failed attempt", || {
        ferry.metrics().upstream_unavailable.get() == 1
    })
    .await;
    assert_eq!(ferry.metrics().upstream_attempt_failed.get(), 1);
    assert_eq!(ferry.metrics().upstream_bytes_in.get(), 0);
    // s_server saw ferry's (correct) name and refused it as a mismatch;
    // -naccept 1 makes it exit, flushing its stdout.
    server.finish().await;
    assert_eq!(
        sni_seen(&server.stdout()).as_deref(),
        Some(consul_sni(&pki, "api").as_str()),
        "{}",
        server.dump()
    );
    assert!(
        !server.stdout().contains("Switching server context."),
        "{}",
        server.dump()
    );
    let err = server.stderr();
    assert!(
        err.contains("CONNECTION FAILURE") && err.contains("final_server_name:callback failed"),
        "s_server's server-name callback is what ended the handshake: {}",
        server.dump()
    );
}

/// ferry verifies who the upstream is: an OpenSSL server presenting a valid
/// mesh leaf for the wrong service (billing, not api) is refused during the
/// handshake, before any byte of the app's data is sent, and the app's
/// connection is closed with nothing read.
#[tokio::test]
async fn openssl_server_with_wrong_service_leaf_is_refused() {
    let pki = Pki::new();
    pki.leaf("web");
    pki.leaf("billing");
    let (server, port) = s_server(&pki, &server_cert(&pki, "billing", false)).await;
    let ferry = upstream_web(&pki, port).await;

    let got = through_upstream(&ferry, b"secret for api only\n").await;
    assert!(
        got.as_ref().map_or(true, |b| b.is_empty()),
        "no data may come back from the wrong service: {got:?}"
    );
    eventually("ferry to give up on the instance", || {
        ferry.metrics().upstream_unavailable.get() == 1
    })
    .await;
    let m = ferry.metrics();
    assert_eq!(m.upstream_attempt_failed.get(), 1);
    assert_eq!(m.upstream_bytes_out.get(), 0, "nothing sent to billing");
    assert_eq!(m.upstream_bytes_in.get(), 0);
    // OpenSSL reports the alert ferry sent when it rejected the certificate
    // (rustls sends certificate_unknown for an identity it will not accept).
    eventually("s_server to report ferry's certificate alert", || {
        let err = server.stderr();
        err.contains("CONNECTION FAILURE") && err.contains("alert certificate")
    })
    .await;
}
