//! ferry under test: started in-process from real command-line flags
//! ([`Ferry`]), or as the real binary with its stderr collected
//! ([`FerryProcess`]), and the flags of a standalone ferry, spelled once
//! ([`StandaloneArgs`], [`api_args`]).

use std::fmt::Display;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::eventually;

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

/// The real binary, its stderr collected line by line; killed on drop.
pub struct FerryProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl FerryProcess {
    /// Runs ferry with `args` and an empty environment.
    pub fn start(args: &[&str]) -> FerryProcess {
        // `FERRY_BIN` names another build to run instead, to measure a
        // scenario against an older ferry (e.g. the flood tests before and
        // after a change).
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

/// Where a listener binds when the test does not care: a free port.
const FREE_PORT: &str = "127.0.0.1:0";

/// The flags of a standalone ferry (certificates from a `-certs` directory,
/// no agent): `-service`, a public listener in front of the local app,
/// upstreams with their instances, `-certs`, then anything extra. The one
/// place these flags are spelled; [`api_args`] is its shorthand for the
/// common `api` inbound.
///
/// ```ignore
/// let web = StandaloneArgs::new("web", &pki.dir_arg())
///     .upstream("api", &[api.inbound()])
///     .start()
///     .await;
/// ```
#[derive(Clone, Debug)]
pub struct StandaloneArgs {
    service: String,
    certs: String,
    /// `-listen` and `-service-addr`.
    inbound: Option<(String, String)>,
    /// `-upstream` (`NAME:ADDR:PORT`) and `-upstream-addr` (`NAME=A,B`).
    upstreams: Vec<(String, String)>,
    extra: Vec<String>,
}

impl StandaloneArgs {
    /// A ferry for `service` with its certificates in `certs_dir`, nothing
    /// to listen on yet.
    pub fn new(service: &str, certs_dir: &str) -> StandaloneArgs {
        StandaloneArgs {
            service: service.into(),
            certs: certs_dir.into(),
            inbound: None,
            upstreams: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// A public mTLS listener on a free port in front of the local app at
    /// `app`.
    pub fn listen(self, app: impl Display) -> StandaloneArgs {
        self.listen_on(FREE_PORT, app)
    }

    /// A public mTLS listener on `listen` in front of the local app at `app`.
    pub fn listen_on(mut self, listen: impl Display, app: impl Display) -> StandaloneArgs {
        self.inbound = Some((listen.to_string(), app.to_string()));
        self
    }

    /// A local listener on a free port for upstream `name`, whose instances
    /// are `instances`.
    pub fn upstream(self, name: &str, instances: &[impl Display]) -> StandaloneArgs {
        self.upstream_on(name, FREE_PORT, instances)
    }

    /// A local listener on `listen` for upstream `name`, whose instances are
    /// `instances`.
    pub fn upstream_on(
        mut self,
        name: &str,
        listen: impl Display,
        instances: &[impl Display],
    ) -> StandaloneArgs {
        let list: Vec<String> = instances.iter().map(|a| a.to_string()).collect();
        self.upstreams.push((
            format!("{name}:{listen}"),
            format!("{name}={}", list.join(",")),
        ));
        self
    }

    /// More flags, after all of the above.
    pub fn extra(mut self, flags: &[&str]) -> StandaloneArgs {
        self.extra.extend(flags.iter().map(|f| f.to_string()));
        self
    }

    /// The command line, without the program name.
    pub fn args(&self) -> Vec<&str> {
        flags(
            &self.service,
            self.inbound.as_ref().map(|(l, a)| (l.as_str(), a.as_str())),
            self.upstreams.iter().map(|(u, i)| (u.as_str(), i.as_str())),
            &self.certs,
            self.extra.iter().map(String::as_str),
        )
    }

    /// The command line as owned strings (for tables of cases).
    pub fn to_vec(&self) -> Vec<String> {
        self.args().into_iter().map(String::from).collect()
    }

    /// Starts this ferry in-process ([`Ferry::start`]).
    pub async fn start(&self) -> Ferry {
        Ferry::start(&self.args()).await
    }

    /// Runs the real binary with these flags ([`FerryProcess::start`]).
    pub fn start_process(&self) -> FerryProcess {
        FerryProcess::start(&self.args())
    }
}

/// Flags for a standalone `api` ferry with certificates in `dir`, listening
/// on a free port in front of the app at `app`, plus `extra`: the flags of
/// `StandaloneArgs::new("api", dir).listen(app).extra(extra)`, borrowed.
pub fn api_args<'a>(dir: &'a str, app: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let inbound = Some((FREE_PORT, app));
    flags(
        "api",
        inbound,
        std::iter::empty(),
        dir,
        extra.iter().copied(),
    )
}

/// The one spelling of a standalone ferry's flags, in the order
/// [`StandaloneArgs`] documents.
fn flags<'a>(
    service: &'a str,
    inbound: Option<(&'a str, &'a str)>,
    upstreams: impl IntoIterator<Item = (&'a str, &'a str)>,
    certs: &'a str,
    extra: impl IntoIterator<Item = &'a str>,
) -> Vec<&'a str> {
    let mut args = vec!["-service", service];
    if let Some((listen, app)) = inbound {
        args.extend(["-listen", listen, "-service-addr", app]);
    }
    for (upstream, instances) in upstreams {
        args.extend(["-upstream", upstream, "-upstream-addr", instances]);
    }
    args.extend(["-certs", certs]);
    args.extend(extra);
    args
}
