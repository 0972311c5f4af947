//! `ferry demo`: a whole service mesh on one machine, in a few seconds.
//!
//! It runs what a user would run by hand — the same binary, the same flags —
//! and checks the result:
//! 1. dev certificates for `web`, `api` and `billing` (`ferry certs`);
//! 2. a small `api` app on loopback (plain TCP, upper-cases what it gets);
//! 3. api's sidecar: `-listen` mTLS, intentions allow `web`, deny the rest;
//! 4. web's and billing's sidecars, each with an `-upstream api`;
//! 5. web → api through the mesh (allowed) and billing → api (denied).
//!
//! Each ferry is a child process; the demo learns its bound address from its
//! "listener ready" log line (port 0 everywhere, so nothing collides), and
//! kills only the children it started.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStderr, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::cli::DemoArgs;

const WAIT: Duration = Duration::from_secs(15);

/// Runs the demo; exit code 0 only if every check held.
pub fn run(args: &DemoArgs) -> ExitCode {
    match demo(&args.dir) {
        Ok(()) => {
            println!("\ndemo finished: every check passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ndemo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A child ferry whose stderr lines arrive on a channel.
struct Sidecar {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Sidecar {
    fn start(exe: &Path, args: &[String]) -> Result<Sidecar, String> {
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", exe.display()))?;
        let stderr: ChildStderr = child.stderr.take().ok_or("no stderr pipe")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Sidecar { child, lines })
    }

    /// Waits for a log line containing `needle` and returns it.
    fn wait_for(&self, needle: &str) -> Result<String, String> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => continue,
                Err(_) => return Err(format!("no log line containing {needle:?} within {WAIT:?}")),
            }
        }
    }

    /// The address in the `listen=` field of the "listener ready" line.
    fn ready_addr(&self) -> Result<SocketAddr, String> {
        let line = self.wait_for("listener ready")?;
        field(&line, "listen")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("no listen= address in {line:?}"))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    Some(rest.split(['"', ' ']).next().unwrap_or(rest))
}

fn demo(dir: &Path) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating the ferry binary: {e}"))?;
    println!("ferry demo: a local service mesh on 127.0.0.1, no Consul needed\n");

    let services: Vec<String> = ["web", "api", "billing"].map(String::from).to_vec();
    let issued = crate::identity::dev_ca::ensure_dir(
        dir,
        None,
        "dc1",
        Duration::from_secs(72 * 3600),
        &services,
    )
    .map_err(|e| e.to_string())?;
    println!(
        "  certificates     {}/ (dev CA, trust domain {}): web, api, billing",
        dir.display(),
        issued.trust_domain
    );

    let (app_addr, app_conns) = start_app()?;
    println!("  api app          {app_addr}  plain TCP; only its sidecar talks to it");

    let certs = dir.display().to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let api = Sidecar::start(
        &exe,
        &s(&[
            "-service",
            "api",
            "-listen",
            "127.0.0.1:0",
            "-service-addr",
            &app_addr.to_string(),
            "-certs",
            &certs,
            "-allow",
            "web",
            "-default-deny",
        ]),
    )?;
    let api_addr = api.ready_addr()?;
    println!("  api sidecar      {api_addr}  mTLS in; intentions: allow web, deny everyone else");

    let outbound = |me: &str| -> Result<(Sidecar, SocketAddr), String> {
        let car = Sidecar::start(
            &exe,
            &s(&[
                "-service",
                me,
                "-upstream",
                "api:127.0.0.1:0",
                "-upstream-addr",
                &format!("api={api_addr}"),
                "-certs",
                &certs,
            ]),
        )?;
        let addr = car.ready_addr()?;
        Ok((car, addr))
    };
    let (_web, web_addr) = outbound("web")?;
    println!("  web sidecar      {web_addr}  upstream api: plain in from web, mTLS out");
    let (_billing, billing_addr) = outbound("billing")?;
    println!("  billing sidecar  {billing_addr}  upstream api: plain in from billing, mTLS out\n");

    let reply = exchange(web_addr, b"hello from web")?;
    if reply != "HELLO FROM WEB" {
        return Err(format!(
            "web -> api: expected the app's answer, got {reply:?}"
        ));
    }
    println!("  web -> api       allowed: sent \"hello from web\", the api app answered {reply:?} over mTLS");

    let denied = exchange(billing_addr, b"hello from billing")?;
    if !denied.is_empty() {
        return Err(format!("billing -> api: expected a denial, got {denied:?}"));
    }
    let line = api.wait_for("connection denied")?;
    println!(
        "  billing -> api   denied: api's sidecar closed the connection before the app saw it"
    );
    println!(
        "                   api sidecar logged: source={} detail=\"{}\"",
        field(&line, "source").unwrap_or("?"),
        line.split("detail=")
            .nth(1)
            .map(|d| d.split(" connection").next().unwrap_or(d).trim_matches('"'))
            .unwrap_or("?"),
    );

    let seen = app_conns.load(Ordering::SeqCst);
    if seen != 1 {
        return Err(format!(
            "the api app saw {seen} connections; expected exactly 1 (web's)"
        ));
    }
    println!("\n  the api app accepted exactly 1 connection (web's); billing never reached it");
    Ok(())
}

/// The demo's `api` app: reads until the client half-closes, answers with
/// the text upper-cased, closes. Counts the connections it accepts.
fn start_app() -> Result<(SocketAddr, Arc<AtomicUsize>), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("api app: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut text = String::new();
            if conn.read_to_string(&mut text).is_ok() {
                let _ = conn.write_all(text.to_uppercase().as_bytes());
            }
        }
    });
    Ok((addr, count))
}

/// Sends `msg` through a sidecar, half-closes, and returns the whole reply
/// (empty if the connection was closed without one).
fn exchange(addr: SocketAddr, msg: &[u8]) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    s.write_all(msg).map_err(|e| e.to_string())?;
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    match s.read_to_string(&mut reply) {
        Ok(_) => Ok(reply),
        // A refused peer may see a reset rather than a FIN; either way, no reply.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(String::new()),
        Err(e) => Err(format!("reading from {addr}: {e}")),
    }
}
