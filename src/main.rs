//! The `ferry` binary: parse, set up logging, build the validated config
//! (exit 64 on any usage error, before binding anything), run, and map the
//! outcome to an exit code. All the work is in the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use ferry::cli::{self, CertsArgs, Command, ProxyArgs};
use ferry::config::Config;
use tracing::level_filters::LevelFilter;

/// Bad flags, bad files: the BSD `EX_USAGE` code, as linkerd's proxy uses.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match cli::parse(std::env::args_os()) {
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

fn proxy(args: ProxyArgs) -> ExitCode {
    let level = match args.log_level.to_ascii_lowercase().parse::<LevelFilter>() {
        Ok(l) => l,
        Err(_) => {
            eprintln!(
                "ferry: -log-level {:?}: expected trace, debug, info, warn or error",
                args.log_level
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let (config, warnings) = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    for w in warnings {
        tracing::warn!("{w}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let drain = args.drain_timeout.0;
    runtime.block_on(async move {
        let running = match ferry::start(config).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        ferry::signal::shutdown().await;
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
            _ = ferry::signal::shutdown() => {
                tracing::warn!("second signal: exiting now");
                ExitCode::SUCCESS
            }
        }
    })
}

fn certs(args: CertsArgs) -> ExitCode {
    match ferry::certs::ensure_dir(
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
