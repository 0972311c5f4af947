//! The `ferry` binary: parse, set up logging, build the validated config
//! (exit 64 on any usage error, before binding anything), run, and map the
//! outcome to an exit code. All the work is in the library.

/// jemalloc with its background thread: freed pages go back to the system
/// about ten seconds after a burst of connections closes. With glibc's
/// malloc, RSS stayed at the burst's peak (over 100 MiB after 9,000 held
/// connections) for the life of the process, and a second burst handled
/// on another worker thread's arena doubled it. It costs about 1.4 MiB of
/// idle RSS (its code and one thread).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::io::IsTerminal;
use std::process::ExitCode;

use ferry::cli::{self, CertsArgs, Command, ProxyArgs};
use ferry::config::agent::ProcessEnv;
use ferry::config::Config;
use ferry::control::agent::WatchPolicy;

/// Bad flags, bad files: the BSD `EX_USAGE` code, as linkerd's proxy uses.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "envoy") {
        return envoy(argv.split_off(2));
    }
    let cli = match cli::parse(argv) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS // --help, --version
            };
        }
    };
    match cli.command {
        Some(Command::Certs(args)) => certs(args),
        Some(Command::Demo(args)) => ferry::demo::run(&args),
        None => proxy(cli.proxy),
    }
}

fn init_logs(level: tracing::level_filters::LevelFilter, json: bool) {
    let logs = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr);
    if json {
        // One JSON object per line, the event's fields at the top level
        // next to "timestamp", "level", "target" and "message".
        logs.json().flatten_event(true).with_ansi(false).init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// `ferry envoy ARGS...`: Envoy's command line, configured over xDS.
#[cfg(feature = "xds")]
fn envoy(args: Vec<std::ffi::OsString>) -> ExitCode {
    let envoy = match cli::envoy::EnvoyArgs::parse_from_args(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let Some(level) = envoy.level() else {
        eprintln!(
            "ferry envoy: -l {:?}: expected trace, debug, info, warn, warning, error, critical or off",
            envoy.log_level
        );
        return ExitCode::from(EXIT_USAGE);
    };
    let ferry_args =
        match cli::parse(std::iter::once("ferry".to_string()).chain(envoy.ferry_args.clone())) {
            Ok(c) => c.proxy,
            Err(e) => {
                eprintln!("ferry envoy: ferry flags after --: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
    init_logs(level, ferry_args.log_json);
    for w in envoy.ignored() {
        tracing::warn!("{w}");
    }
    let Some(path) = &envoy.config_path else {
        eprintln!("ferry envoy: -c/--config-path is required (the bootstrap file)");
        return ExitCode::from(EXIT_USAGE);
    };
    let boot = match ferry::control::xds::bootstrap::Bootstrap::load(path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("ferry envoy: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = match Config::for_control_plane(&ferry_args, boot.service()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry envoy: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut builder = match envoy.concurrency {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) if n > 1 => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        _ => runtime_builder(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let drain = ferry_args.drain_timeout.0;
    runtime.block_on(async move {
        let started = tokio::select! {
            r = ferry::app::xds::start(boot, config, Default::default()) => r,
            _ = ferry::ops::signal::shutdown() => {
                tracing::info!("stopped before serving");
                return ExitCode::SUCCESS;
            }
        };
        match started {
            Ok(running) => serve_until_signal(running, drain).await,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

#[cfg(not(feature = "xds"))]
fn envoy(_: Vec<std::ffi::OsString>) -> ExitCode {
    eprintln!("ferry envoy: this ferry was built without the `xds` feature");
    ExitCode::from(EXIT_USAGE)
}

/// Runs until a signal, then drains for up to `drain` (a second signal
/// exits at once).
async fn serve_until_signal(running: ferry::Running, drain: std::time::Duration) -> ExitCode {
    ferry::ops::signal::shutdown().await;
    tracing::info!(drain_timeout = ?drain, "draining: no new connections; open ones may finish");
    tokio::select! {
        clean = running.shutdown(drain) => {
            if clean {
                tracing::info!("drained cleanly");
            } else {
                tracing::warn!("drain timeout reached; closed the remaining connections");
            }
            ExitCode::SUCCESS
        }
        _ = ferry::ops::signal::shutdown() => {
            tracing::warn!("second signal: exiting now");
            ExitCode::SUCCESS
        }
    }
}

fn proxy(args: ProxyArgs) -> ExitCode {
    let Some(level) = cli::log_level(&args.log_level) else {
        eprintln!(
            "ferry: -log-level {:?}: expected trace, debug, info, warn or error (any case; Consul's ERR works too)",
            args.log_level
        );
        return ExitCode::from(EXIT_USAGE);
    };
    init_logs(level, args.log_json);
    for w in ignored_flags(&args) {
        tracing::warn!("{w}");
    }

    let (config, warnings) = match Config::from_args(&args, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    for w in warnings {
        tracing::warn!("{w}");
    }
    let runtime = match runtime_builder().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let drain = args.drain_timeout.0;
    runtime.block_on(async move {
        // Starting may wait for the agent; a signal meanwhile just ends it.
        let started = tokio::select! {
            r = ferry::start(config, WatchPolicy::default()) => r,
            _ = ferry::ops::signal::shutdown() => {
                tracing::info!("stopped before serving");
                return ExitCode::SUCCESS;
            }
        };
        match started {
            Ok(running) => serve_until_signal(running, drain).await,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Flags Consul's proxy has that are accepted for compatibility but do
/// nothing here, each with the reason, for a startup warning.
fn ignored_flags(args: &ProxyArgs) -> Vec<&'static str> {
    let mut ignored = Vec::new();
    let pprof = args.pprof_addr.as_deref().is_some_and(|a| !a.is_empty());
    if pprof && args.admin_addr.is_some() {
        ignored.push("-pprof-addr is ignored: -admin-addr is set (ferry has no Go pprof; -pprof-addr alone serves the admin endpoints)");
    }
    if args.agent.stale {
        ignored.push("-stale is ignored, as in Consul: it is declared for this command but never applied to the proxy's queries");
    }
    ignored
}

fn certs(args: CertsArgs) -> ExitCode {
    match ferry::identity::dev_ca::ensure_dir(
        &args.dir,
        args.trust_domain.as_deref(),
        &args.dc,
        args.ttl.0,
        &args.services,
    ) {
        Ok(done) => {
            let verb = if done.created_ca {
                "created"
            } else {
                "reusing"
            };
            println!(
                "{verb} CA {} (trust domain {})",
                args.dir.join("ca.pem").display(),
                done.trust_domain
            );
            for (svc, path) in args.services.iter().zip(&done.leaves) {
                println!(
                    "wrote {} and its key: spiffe://{}/ns/default/dc/{}/svc/{svc}, valid {}",
                    path.display(),
                    done.trust_domain,
                    args.dc,
                    args.ttl
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry certs: {e}");
            if e.is_usage() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// One thread when ferry may use one CPU (the usual sidecar budget, or a
/// `taskset`/cgroup limit): a current-thread runtime runs every task where
/// it was woken, with no hand-off between the accepting thread and a worker.
/// With more CPUs, a worker per CPU (`TOKIO_WORKER_THREADS` caps it).
fn runtime_builder() -> tokio::runtime::Builder {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus == 1 && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
}
