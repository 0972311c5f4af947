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

use std::process::ExitCode;

use ferry::cli::{self, CertsArgs, Command, ProxyArgs, EXIT_USAGE};
use ferry::config::agent::ProcessEnv;
use ferry::config::Config;
use ferry::control::agent::WatchPolicy;

fn main() -> ExitCode {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "envoy") {
        return envoy(argv.split_off(2));
    }
    let cli = match cli::parse(argv) {
        Ok(cli) => cli,
        Err(e) => return cli::exit_for(&e),
    };
    match cli.command {
        Some(Command::Certs(args)) => certs(args),
        Some(Command::Demo(args)) => ferry::demo::run(&args),
        None => proxy(cli.proxy),
    }
}

/// `ferry envoy ARGS...` becomes `ferry-envoy ARGS...` in this same
/// process (exec: the PID Nomad signals stays the same). xDS mode is its
/// own binary so that flag mode maps none of gRPC's and the Envoy API's
/// code: on this kernel a binary's text is mostly resident whether it runs
/// or not, and xDS would add about 2 MiB to every flag-mode sidecar.
fn envoy(args: Vec<std::ffi::OsString>) -> ExitCode {
    use std::os::unix::process::CommandExt;
    // Beside this binary first (a release directory, an image), else PATH.
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(ENVOY_BIN)))
        .filter(|p| p.is_file());
    let program = beside.unwrap_or_else(|| ENVOY_BIN.into());
    let err = std::process::Command::new(&program)
        .arg0(ENVOY_BIN)
        .args(args)
        .exec();
    eprintln!(
        "ferry envoy: cannot run {}: {err}; xDS mode is the {ENVOY_BIN} binary, built beside ferry by `cargo build --release` (feature `xds`, on by default)",
        program.display()
    );
    // The shell's codes: 127 not found, 126 found but not runnable.
    ExitCode::from(if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

/// The xDS-mode binary `ferry envoy` runs.
const ENVOY_BIN: &str = "ferry-envoy";

fn proxy(args: ProxyArgs) -> ExitCode {
    let Some(level) = cli::log_level(&args.log_level) else {
        eprintln!(
            "ferry: -log-level {:?}: expected trace, debug, info, warn or error (any case; Consul's ERR works too)",
            args.log_level
        );
        return ExitCode::from(EXIT_USAGE);
    };
    ferry::ops::logs::init(level, args.log_json);
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
    ferry::app::run::serve(
        ferry::app::run::runtime_builder(),
        ferry::start(config, WatchPolicy::default()),
        args.drain_timeout.0,
    )
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
