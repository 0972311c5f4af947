//! The signals that stop the proxy.

/// Completes on the first SIGINT or SIGTERM.
/// - SIGTERM: how Nomad (and most supervisors) ask a task to stop.
/// - SIGINT: Ctrl-C while running ferry by hand; also Nomad's default
///   `kill_signal` for sidecar tasks.
pub async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
    }
}
