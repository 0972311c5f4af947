//! The public mTLS listener: mesh peers in, our local app out.
//!
//! Per connection, in this order, each step bounded: TLS handshake (client
//! certificate required, chain and mesh identity checked by the verifier in
//! `tls`) → read the peer's identity → intentions → only then dial the local
//! app → splice. Unlike Consul's built-in proxy, which dials the app first
//! and handshakes lazily, a peer that is not allowed never causes a
//! connection to the app.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Timeouts;
use crate::authz::Authorizer;
use crate::identity::peer_identity;
use crate::identity::tls::Credentials;
use crate::ops::metrics::{Metrics, ReasonLabel};
use crate::proxy::limits::Limit;
use crate::proxy::live::LiveConns;
use crate::proxy::net::{self, Phase};
use crate::proxy::report::{Direction, Outcome, Report};
use crate::proxy::splice::{splice, Timers};
use crate::snapshot::Receiver;

/// What every inbound connection shares.
pub(crate) struct Inbound {
    pub service: String,
    pub service_addr: String,
    pub authz: Authorizer,
    /// Latest credentials; each connection takes the current one at accept.
    pub credentials: Receiver<Credentials>,
    pub timeouts: Timeouts,
    /// Idle timeout and maximum lifetime of a connection.
    pub timers: Timers,
    /// `-max-conns`: held for a connection's whole life.
    pub conn_limit: Limit,
    /// `-max-handshakes`: held until the handshake is done.
    pub handshake_limit: Limit,
    pub metrics: Arc<Metrics>,
    /// Live connections, when decisions can change under them (agent mode).
    pub live: Option<Arc<LiveConns>>,
}

/// Accepts until `stop` fires; each connection runs on `tracker` and ends
/// early when `kill` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    ctx: Arc<Inbound>,
    stop: CancellationToken,
    kill: CancellationToken,
    tracker: TaskTracker,
) {
    while let Some((stream, peer)) = net::accept(&listener, &stop, "inbound").await {
        ctx.metrics.inbound_accepted.inc();
        // Limits are taken here, before a task exists: a refused connection
        // costs an accept and a close, nothing more.
        let Some(conn_permit) = ctx.conn_limit.try_take() else {
            continue;
        };
        let Some(handshake_permit) = ctx.handshake_limit.try_take() else {
            continue;
        };
        let ctx = ctx.clone();
        let kill = kill.clone();
        tracker.spawn(async move {
            ctx.metrics.inbound_active.inc();
            let report = handle(&ctx, stream, peer, &kill, handshake_permit).await;
            ctx.metrics.inbound_active.dec();
            drop(conn_permit);
            ctx.metrics
                .closed("inbound", &ctx.service, report.outcome.label());
            report.log();
        });
    }
}

async fn handle(
    ctx: &Inbound,
    stream: TcpStream,
    peer: SocketAddr,
    kill: &CancellationToken,
    handshake_permit: OwnedSemaphorePermit,
) -> Report {
    let credentials = ctx.credentials.latest();
    let mut report = Report::new(
        Direction::Inbound,
        peer,
        &ctx.service,
        credentials.as_ref().map(|c| c.identity.id.to_string()),
    );
    let Some(credentials) = credentials else {
        report.fail(Phase::Handshake, "no certificates yet");
        return report;
    };
    net::tune_accepted(&stream);
    let acceptor = TlsAcceptor::from(credentials.server_config());
    let mut tls = match net::bounded(ctx.timeouts.handshake, kill, acceptor.accept(stream)).await {
        Ok(tls) => tls,
        Err(e) => {
            let reason = net::tls_failure_reason(&e);
            ctx.metrics
                .inbound_handshake_failed
                .inc(&ReasonLabel { reason });
            report.fail(Phase::Handshake, net::tls_failure(e));
            return report;
        }
    };
    drop(handshake_permit);
    ctx.metrics
        .handshake("server", tls.get_ref().1.handshake_kind());

    report.phase = Phase::Authorize;
    let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        // The verifier makes a certificate mandatory; this is belt and braces.
        report.fail(Phase::Authorize, "no client certificate");
        return report;
    };
    let identity = match peer_identity(cert) {
        Ok(id) => id,
        Err(e) => {
            report.fail(Phase::Authorize, e);
            return report;
        }
    };
    report.source = Some(identity.id.to_string());
    let decision = match ctx.authz.decide(&identity).await {
        Ok(d) => d,
        Err(e) => {
            ctx.metrics.authz_error.inc();
            report.fail(Phase::Authorize, e);
            let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
            return report;
        }
    };
    if !decision.allowed {
        ctx.metrics.authz_denied.inc();
        report.outcome = Outcome::Denied;
        report.detail = decision.reason;
        // close_notify then FIN, so the peer sees an orderly close, not a reset.
        let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
        return report;
    }
    ctx.metrics.authz_allowed.inc();

    report.target = Some(ctx.service_addr.clone());
    let mut app = match net::bounded(
        ctx.timeouts.local_connect,
        kill,
        net::dial(&ctx.service_addr),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            ctx.metrics.local_connect_failed.inc();
            report.fail(
                Phase::ConnectLocal,
                format!("local app {}: {e}", ctx.service_addr),
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
            return report;
        }
    };

    let live = ctx
        .live
        .as_ref()
        .map(|l| l.register(identity, kill.child_token()));
    let cancel = live.as_ref().map_or(kill, |l| &l.close);
    let done = splice(&mut tls, &mut app, ctx.timers, cancel).await;
    ctx.metrics.inbound_bytes_in.inc_by(done.a_to_b);
    ctx.metrics.inbound_bytes_out.inc_by(done.b_to_a);
    report.spliced(done, "peer", "local app");
    if let Some(why) = live.as_ref().and_then(|l| l.revoked()) {
        report.revoked(why);
    }
    report
}
