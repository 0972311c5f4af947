//! The public mTLS listener: mesh peers in, our local app out.
//!
//! Per connection, in this order, each step bounded: TLS handshake (client
//! certificate required, chain and mesh identity checked by the verifier in
//! `tls`) → read the peer's identity → intentions → only then dial the local
//! app → splice. Unlike Consul's built-in proxy, which dials the app first
//! and handshakes lazily, a peer that is not allowed never causes a
//! connection to the app.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use rustls::server::Acceptor;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::admission::{Admission, Eviction, Pending, Progress};
use super::limits::Limit;
use super::live::LiveConns;
use super::net::{self, Phase, PhaseError};
use super::report::{Direction, Outcome, Report};
use super::splice::{splice, Timers};
use super::Timeouts;
use crate::authz::Authorizer;
use crate::identity::peer_identity;
use crate::identity::tls::Credentials;
use crate::ops::metrics::{Metrics, ReasonLabel};
use crate::snapshot::Receiver;

/// What every inbound connection shares.
pub(crate) struct Inbound {
    pub service: String,
    /// The local app: TCP, or a Unix socket.
    pub service_addr: net::LocalApp,
    pub authz: Authorizer,
    /// Latest credentials; each connection takes the current one at accept.
    pub credentials: Receiver<Credentials>,
    pub timeouts: Timeouts,
    /// Idle timeout and maximum lifetime of a connection.
    pub timers: Timers,
    /// `-max-conns`: the budget of established connections, taken when the
    /// handshake is done and held for the connection's life.
    pub conn_limit: Limit,
    /// `-max-handshakes`: the budget of pending handshakes, which makes
    /// room by closing the least promising one.
    pub admission: Arc<Admission>,
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
        // Decided here, before a task exists: with every established slot
        // taken, a newcomer costs an accept and a close, nothing more.
        if ctx.conn_limit.is_full() {
            ctx.conn_limit.refuse();
            continue;
        }
        if ctx.admission.is_full() {
            // Let the connections accepted in this burst read their
            // ClientHellos first, so the choice of whom to close sees how
            // far each has come (an unpolled honest one looks silent).
            tokio::task::yield_now().await;
        }
        let pending = ctx.admission.admit(peer.ip());
        let ctx = ctx.clone();
        let kill = kill.clone();
        tracker.spawn(async move {
            ctx.metrics.inbound_active.inc();
            let report = handle(&ctx, stream, peer, &kill, pending).await;
            ctx.metrics.inbound_active.dec();
            ctx.metrics
                .closed("inbound", &ctx.service, report.outcome.label());
            report.log();
        });
    }
}

/// Why the handshake phase ended without a connection.
enum Unfinished {
    /// The TLS handshake failed, timed out, or the proxy is shutting down.
    Tls(PhaseError<io::Error>),
    /// Closed to make room for other pending handshakes.
    Evicted(Eviction),
    /// No certificates arrived within the handshake deadline.
    NoCredentials(Duration),
}

/// The handshake phase, under one deadline and given up early on eviction
/// or shutdown: wait for the peer's first bytes, read its ClientHello, wait
/// for our certificates if none have arrived yet (start-up), then finish the
/// handshake. Each step is recorded as progress for the admission control.
async fn handshake(
    ctx: &Inbound,
    stream: TcpStream,
    pending: &Pending,
    kill: &CancellationToken,
) -> Result<(TlsStream<TcpStream>, Arc<Credentials>), Unfinished> {
    let waiting_for_credentials = AtomicBool::new(false);
    let work = async {
        stream.readable().await?;
        pending.advance(Progress::Partial);
        let start = LazyConfigAcceptor::new(Acceptor::default(), stream).await?;
        pending.advance(Progress::Hello);
        let credentials = match ctx.credentials.latest() {
            Some(c) => c,
            None => {
                waiting_for_credentials.store(true, Ordering::Relaxed);
                let mut rx = ctx.credentials.clone();
                rx.ready().await.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::Interrupted, "certificates source stopped")
                })?
            }
        };
        waiting_for_credentials.store(false, Ordering::Relaxed);
        let tls = start.into_stream(credentials.server_config()).await?;
        Ok::<_, io::Error>((tls, credentials))
    };
    tokio::select! {
        biased;
        why = pending.evicted() => Err(Unfinished::Evicted(why)),
        r = net::bounded(ctx.timeouts.handshake, kill, work) => match r {
            Ok(done) => Ok(done),
            Err(PhaseError::TimedOut(d)) if waiting_for_credentials.load(Ordering::Relaxed) => {
                Err(Unfinished::NoCredentials(d))
            }
            Err(e) => Err(Unfinished::Tls(e)),
        },
    }
}

async fn handle(
    ctx: &Inbound,
    stream: TcpStream,
    peer: SocketAddr,
    kill: &CancellationToken,
    pending: Pending,
) -> Report {
    let me = ctx.credentials.latest().map(|c| c.identity.id.to_string());
    let mut report = Report::new(Direction::Inbound, peer, &ctx.service, me);
    net::tune_accepted(&stream);
    let (mut tls, credentials) = match handshake(ctx, stream, &pending, kill).await {
        Ok(done) => done,
        Err(Unfinished::Tls(e)) => {
            let reason = net::tls_failure_reason(&e);
            ctx.metrics
                .inbound_handshake_failed
                .inc(&ReasonLabel { reason });
            report.fail(Phase::Handshake, net::tls_failure(e));
            return report;
        }
        Err(Unfinished::Evicted(why)) => {
            report.outcome = Outcome::Evicted;
            report.detail = why.describe().to_string();
            return report;
        }
        Err(Unfinished::NoCredentials(waited)) => {
            report.outcome = Outcome::Refused;
            report.detail = format!("no certificates from the control plane within {waited:?}");
            return report;
        }
    };
    drop(pending);
    if report.destination.is_none() {
        // Certificates arrived while this handshake waited for them.
        report.destination = Some(credentials.identity.id.to_string());
    }
    ctx.metrics
        .handshake("server", tls.get_ref().1.handshake_kind());
    // The established budget: a slot may have gone to a racing handshake
    // since accept.
    let Some(_conn_permit) = ctx.conn_limit.try_take() else {
        report.outcome = Outcome::Refused;
        report.detail = "-max-conns reached".into();
        let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
        return report;
    };

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

    report.target = Some(ctx.service_addr.to_string());
    match &ctx.service_addr {
        net::LocalApp::Tcp(addr) => {
            let app = net::bounded(ctx.timeouts.local_connect, kill, net::dial(addr)).await;
            carry(ctx, tls, app, identity, report, kill).await
        }
        net::LocalApp::Unix(path) => {
            let app = net::bounded(ctx.timeouts.local_connect, kill, net::dial_unix(path)).await;
            carry(ctx, tls, app, identity, report, kill).await
        }
    }
}

/// The allowed connection's last part: the dialed local app (or why it
/// could not be dialed), then bytes both ways until done or revoked.
async fn carry<S>(
    ctx: &Inbound,
    mut tls: TlsStream<TcpStream>,
    app: Result<S, PhaseError<io::Error>>,
    identity: crate::identity::PeerIdentity,
    mut report: Report,
    kill: &CancellationToken,
) -> Report
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut app = match app {
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
