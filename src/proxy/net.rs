//! Socket plumbing shared by both listeners: per-socket options, dialing, and
//! the one helper that bounds every slow phase of a connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The steps a connection goes through; logs and errors name the one that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// TLS handshake with a downstream mesh client (inbound).
    Handshake,
    /// Deciding whether the peer's identity may connect (inbound).
    Authorize,
    /// TCP connect to the local application (inbound).
    ConnectLocal,
    /// Choosing an upstream instance (upstream).
    Pick,
    /// TCP connect to an upstream instance.
    ConnectUpstream,
    /// TLS handshake with an upstream instance.
    UpstreamHandshake,
    /// Moving bytes.
    Splice,
}

impl Phase {
    /// A short lower-case name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Handshake => "handshake",
            Phase::Authorize => "authorize",
            Phase::ConnectLocal => "connect_local",
            Phase::Pick => "pick",
            Phase::ConnectUpstream => "connect_upstream",
            Phase::UpstreamHandshake => "upstream_handshake",
            Phase::Splice => "splice",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a bounded phase did not produce its value.
#[derive(Debug, thiserror::Error)]
pub enum PhaseError<E> {
    /// The phase ran past its deadline.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// The proxy is shutting down.
    #[error("proxy shutting down")]
    Cancelled,
    /// The phase itself failed.
    #[error(transparent)]
    Failed(E),
}

/// Runs `fut` for at most `limit`, giving up early if `cancel` fires.
pub async fn bounded<T, E>(
    limit: Duration,
    cancel: &CancellationToken,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, PhaseError<E>> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(PhaseError::Cancelled),
        r = tokio::time::timeout(limit, fut) => match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(PhaseError::Failed(e)),
            Err(_) => Err(PhaseError::TimedOut(limit)),
        },
    }
}

/// Describes a failed TLS handshake: the rustls error when there is one
/// (bad certificate, unknown CA, protocol violation), otherwise the I/O cause.
pub fn tls_failure(e: PhaseError<io::Error>) -> String {
    match e {
        PhaseError::Failed(err) => {
            match err
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
            {
                Some(tls) => format!("TLS: {tls}"),
                None if err.kind() == io::ErrorKind::UnexpectedEof => {
                    "peer closed the connection during the handshake".into()
                }
                None => format!("TLS: {err}"),
            }
        }
        other => other.to_string(),
    }
}

/// A short, bounded label for a failed TLS handshake, for metrics.
pub fn tls_failure_reason(e: &PhaseError<io::Error>) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    let PhaseError::Failed(err) = e else {
        return match e {
            PhaseError::TimedOut(_) => "timeout",
            _ => "shutdown",
        };
    };
    match err
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
    {
        Some(E::NoCertificatesPresented) => "no_certificate",
        Some(E::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        )) => "expired",
        Some(E::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => "untrusted",
        Some(E::InvalidCertificate(C::Other(o))) if crate::identity::tls::is_identity_error(o) => {
            "identity"
        }
        Some(E::InvalidCertificate(_)) => "bad_certificate",
        Some(
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. },
        ) => "protocol",
        Some(E::AlertReceived(_)) => "alert",
        Some(_) => "tls",
        None if err.kind() == io::ErrorKind::UnexpectedEof => "eof",
        None => "io",
    }
}

/// Sets the options every proxied socket gets: no Nagle delay (we forward
/// whatever arrives at once; batching is the endpoints' business) and TCP
/// keepalive, so a peer that vanished without a FIN is noticed eventually.
pub fn tune(stream: &TcpStream) {
    tune_socket(&socket2::SockRef::from(stream));
}

fn tune_socket(sock: &socket2::SockRef<'_>) {
    let _ = sock.set_tcp_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(15));
    let _ = sock.set_tcp_keepalive(&ka);
}

/// [`tune`] for a socket from [`listen`]'s listener. Linux copies these
/// options from the listener to every accepted socket, which saves four
/// syscalls per connection; elsewhere they are set again.
pub fn tune_accepted(stream: &TcpStream) {
    if !cfg!(target_os = "linux") {
        tune(stream);
    }
}

/// Accept queue length of every listener. Tokio's default is 128, which a
/// burst of connects overflows: the kernel then drops SYNs and clients see
/// one- or three-second retransmit delays before ferry ever sees them. The
/// kernel caps this at `net.core.somaxconn` (4096 on current Linux).
pub const BACKLOG: i32 = 4096;

/// Binds a listener with [`BACKLOG`] and address reuse (so a restarted
/// ferry can bind while old connections sit in TIME_WAIT).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    // Inherited by accepted sockets (see `tune_accepted`).
    tune_socket(&socket2::SockRef::from(&sock));
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    TcpListener::from_std(sock.into())
}

/// Dials `addr` (an IP:port or host:port) and tunes the socket.
pub async fn dial(addr: &str) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    tune(&s);
    Ok(s)
}

/// Dials a resolved address and tunes the socket.
pub async fn dial_addr(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    tune(&s);
    Ok(s)
}

/// Accepts the next connection, riding out transient accept errors (out of
/// file descriptors, aborted handshakes) with a short backoff so one bad
/// moment never ends the listener. Returns `None` when `cancel` fires.
pub async fn accept(
    listener: &TcpListener,
    cancel: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    let mut backoff = Duration::from_millis(5);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(pair) => return Some(pair),
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted sockets get no-delay and keepalive, whether copied from the
    /// listener (Linux) or set again.
    #[tokio::test]
    async fn accepted_sockets_are_tuned() {
        let listener = listen(([127, 0, 0, 1], 0).into()).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        tune_accepted(&accepted);
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().expect("nodelay"), "TCP_NODELAY");
        assert!(sock.keepalive().expect("keepalive"), "SO_KEEPALIVE");
        assert_eq!(
            sock.tcp_keepalive_time().expect("idle"),
            Duration::from_secs(60)
        );
    }
}
