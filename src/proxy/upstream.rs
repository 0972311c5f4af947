//! Upstream listeners: our local app in (plain TCP on loopback), a mesh
//! instance of the destination service out (mTLS).
//!
//! Per connection: take up to `attempts` candidates from the balancer; for
//! each, TCP connect and TLS handshake, each bounded, all of it within one
//! overall deadline. The handshake verifies that the server is the
//! destination service (see `tls`). A failure is reported to the balancer
//! (passive ejection) and the next candidate is tried. Nothing is sent to an
//! instance before its identity is proven, so retrying is always safe: the
//! app's first bytes wait in the kernel until a connection is established.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Timeouts;
use crate::identity::tls::Credentials;
use crate::ops::metrics::{Metrics, UpstreamMetrics};
use crate::proxy::balancer::{Balancer, Failure};
use crate::proxy::limits::Limit;
use crate::proxy::net::{self, Listener, Phase};
use crate::proxy::report::{Direction, Outcome, Peer, Report};
use crate::proxy::splice::{splice, Timers};
use crate::snapshot::Receiver;

/// What every connection of one upstream listener shares.
pub(crate) struct Upstream {
    pub name: String,
    pub balancer: Arc<Balancer>,
    pub credentials: Receiver<Credentials>,
    pub attempts: u32,
    pub timeouts: Timeouts,
    /// Idle timeout and maximum lifetime of a connection.
    pub timers: Timers,
    /// `-max-upstream-conns`: held for a connection's whole life.
    pub conn_limit: Limit,
    pub metrics: Arc<Metrics>,
    /// This upstream's labelled series, resolved once.
    pub m: UpstreamMetrics,
}

/// Accepts until `stop` fires; connections run on `tracker` and end early
/// when `kill` fires. TCP and Unix listeners share everything after accept
/// (the connection code is generic over the local stream).
pub(crate) async fn serve(
    listener: Listener,
    ctx: Arc<Upstream>,
    stop: CancellationToken,
    kill: CancellationToken,
    tracker: TaskTracker,
) {
    match listener {
        Listener::Tcp(l) => {
            while let Some((stream, peer)) = net::accept(&l, &stop, &ctx.name).await {
                net::tune_accepted(&stream);
                start(&ctx, stream, peer.into(), &kill, &tracker);
            }
        }
        Listener::Unix(l) => {
            while let Some(stream) = net::accept_unix(&l, &stop, &ctx.name).await {
                start(&ctx, stream, Peer::Unix, &kill, &tracker);
            }
        }
    }
}

/// Takes a connection slot and starts the connection's task.
fn start<S>(
    ctx: &Arc<Upstream>,
    stream: S,
    peer: Peer,
    kill: &CancellationToken,
    tracker: &TaskTracker,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    ctx.m.accepted.inc();
    let Some(permit) = ctx.conn_limit.try_take() else {
        return;
    };
    let ctx = ctx.clone();
    let kill = kill.clone();
    tracker.spawn(async move {
        ctx.m.active.inc();
        let report = handle(&ctx, stream, peer, &kill).await;
        ctx.m.active.dec();
        drop(permit);
        ctx.metrics
            .closed("upstream", &ctx.name, report.outcome.label());
        report.log();
    });
}

async fn handle<S>(ctx: &Upstream, mut local: S, peer: Peer, kill: &CancellationToken) -> Report
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut report = Report::new(Direction::Upstream, peer, &ctx.name, None);
    report.phase = Phase::Pick;
    let deadline = Instant::now() + ctx.timeouts.upstream_deadline;
    let credentials = match ctx.credentials.latest() {
        Some(c) => c,
        None => {
            // Start-up: the app connected before our certificates arrived.
            // Wait for them (bounded in number by -max-upstream-conns, in
            // time by the upstream deadline) rather than refuse.
            let mut rx = ctx.credentials.clone();
            let left = deadline.saturating_duration_since(Instant::now());
            let waited = net::bounded(left, kill, async {
                rx.ready().await.ok_or("the certificates source stopped")
            })
            .await;
            match waited {
                Ok(c) => c,
                Err(e) => {
                    report.outcome = Outcome::Refused;
                    report.detail = format!("no certificates from the control plane: {e}");
                    return report;
                }
            }
        }
    };
    report.source = Some(credentials.identity.id.to_string());
    if !ctx.balancer.is_known() {
        // Discovery has not answered yet (ferry just started, or this
        // upstream was just added): wait for it rather than refuse.
        let left = deadline.saturating_duration_since(Instant::now());
        let waited = net::bounded(left, kill, async {
            ctx.balancer.known().await;
            Ok::<(), std::convert::Infallible>(())
        })
        .await;
        if let Err(e) = waited {
            ctx.m.unavailable.inc();
            report.fail(
                Phase::Pick,
                format!("waiting for the first list of instances: {e}"),
            );
            return report;
        }
    }
    let candidates = ctx.balancer.candidates(ctx.attempts as usize);
    if candidates.is_empty() {
        ctx.m.unavailable.inc();
        report.fail(Phase::Pick, "no healthy instances");
        return report;
    }
    let mut failures = Vec::new();
    for inst in candidates {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            failures.push("overall deadline reached".to_string());
            break;
        }
        let connector =
            match credentials.client_config(&ctx.name, inst.addr, inst.identity.as_ref()) {
                Ok(c) => TlsConnector::from(c),
                Err(e) => {
                    report.fail(Phase::Pick, e);
                    return report;
                }
            };
        report.attempts += 1;
        if report.attempts > 1 {
            ctx.m.retries.inc();
        }
        let attempt = async {
            let tcp = net::bounded(
                ctx.timeouts.upstream_connect.min(left),
                kill,
                net::dial_addr(inst.addr),
            )
            .await
            .map_err(|e| (Phase::ConnectUpstream, e.to_string()))?;
            let left = deadline.saturating_duration_since(Instant::now());
            net::bounded(
                ctx.timeouts.handshake.min(left),
                kill,
                connector.connect(inst.server_name.clone(), tcp),
            )
            .await
            .map_err(|e| (Phase::UpstreamHandshake, net::tls_failure(e)))
        };
        match attempt.await {
            Ok(mut tls) => {
                ctx.balancer.report_success(&inst);
                ctx.metrics
                    .handshake("client", tls.get_ref().1.handshake_kind());
                report.target = Some(inst.addr.to_string());
                report.destination = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| crate::identity::peer_identity(c).ok())
                    .map(|p| p.id.to_string());
                let done = splice(&mut local, &mut tls, ctx.timers, kill).await;
                ctx.m.bytes_out.add(done.a_to_b);
                ctx.m.bytes_in.add(done.b_to_a);
                report.spliced(done, "local app", "upstream");
                return report;
            }
            Err((phase, why)) => {
                if kill.is_cancelled() {
                    report.fail(phase, "proxy shutting down");
                    return report;
                }
                ctx.m.attempt_failed.inc();
                if let Failure::Ejected(n) = ctx.balancer.report_failure(&inst) {
                    ctx.m.ejections.inc();
                    tracing::warn!(upstream = %ctx.name, instance = %inst.addr, consecutive_failures = n, "instance ejected");
                }
                report.phase = phase;
                failures.push(format!("{}: {phase}: {why}", inst.addr));
            }
        }
    }
    ctx.m.unavailable.inc();
    let phase = report.phase;
    report.fail(
        phase,
        format!("no instance reachable ({})", failures.join("; ")),
    );
    report
}
