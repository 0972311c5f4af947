//! The `ferry-envoy` binary, which `ferry envoy ARGS...` runs: Envoy's
//! command line as Nomad passes it, configured over Consul's Delta ADS
//! (exit 64 on any usage error, before binding anything). Its own binary so
//! that flag mode carries none of gRPC's code; see `ferry`'s `envoy`.

/// The same allocator as `ferry`, for the same reason (see src/main.rs):
/// RSS returns to the baseline after a burst of connections.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::ffi::OsString;
use std::process::ExitCode;

use ferry::cli::{self, envoy::EnvoyArgs, EXIT_USAGE};
use ferry::config::Config;
use ferry::control::xds::bootstrap::Bootstrap;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let envoy = match EnvoyArgs::parse_from_args(args) {
        Ok(a) => a,
        Err(e) => return cli::exit_for(&e),
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
    ferry::ops::logs::init(level, ferry_args.log_json);
    for w in envoy.ignored() {
        tracing::warn!("{w}");
    }
    let Some(path) = &envoy.config_path else {
        eprintln!("ferry envoy: -c/--config-path is required (the bootstrap file)");
        return ExitCode::from(EXIT_USAGE);
    };
    let boot = match Bootstrap::load(path) {
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
    // Envoy's --concurrency is its worker count; without it, as `ferry`.
    let builder = match envoy.concurrency {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) if n > 1 => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        _ => ferry::app::run::runtime_builder(),
    };
    ferry::app::run::serve(
        builder,
        ferry::app::xds::start(boot, config, Default::default()),
        ferry_args.drain_timeout.0,
    )
}
