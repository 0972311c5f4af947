//! The process around a proxy, shared by both binaries (`ferry` and
//! `ferry-envoy`): the async runtime, starting while a signal may still
//! stop the wait, and the drain on the first signal.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use super::{Running, StartError};

/// One thread when ferry may use one CPU (the usual sidecar budget, or a
/// `taskset`/cgroup limit): a current-thread runtime runs every task where
/// it was woken, with no hand-off between the accepting thread and a worker.
/// With more CPUs, a worker per CPU (`TOKIO_WORKER_THREADS` caps it).
pub fn runtime_builder() -> tokio::runtime::Builder {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus == 1 && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
}

/// Builds the runtime from `builder`, starts the proxy with `start`, serves
/// until a signal, then drains for up to `drain`. Starting may wait for the
/// control plane; a signal meanwhile just ends it.
pub fn serve<F>(mut builder: tokio::runtime::Builder, start: F, drain: Duration) -> ExitCode
where
    F: Future<Output = Result<Running, StartError>>,
{
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let started = tokio::select! {
            r = start => r,
            _ = crate::ops::signal::shutdown() => {
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

/// Runs until a signal, then drains for up to `drain` (a second signal
/// exits at once).
async fn serve_until_signal(running: Running, drain: Duration) -> ExitCode {
    crate::ops::signal::shutdown().await;
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
        _ = crate::ops::signal::shutdown() => {
            tracing::warn!("second signal: exiting now");
            ExitCode::SUCCESS
        }
    }
}
