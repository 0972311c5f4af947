//! Socket plumbing shared by both listeners: per-socket options, dialing, and
//! the one helper that bounds every slow phase of a connection.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
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

/// Where a local listener binds: a TCP address, or a Unix socket file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindAddr {
    Tcp(SocketAddr),
    Unix(UnixBind),
}

/// A Unix socket file to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixBind {
    pub path: PathBuf,
    /// File mode bits to set once bound (`LocalBindSocketMode`); `None`
    /// leaves what the umask gave.
    pub mode: Option<u32>,
}

impl fmt::Display for BindAddr {
    /// `127.0.0.1:9191`, or `unix:/path/to.sock`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindAddr::Tcp(a) => write!(f, "{a}"),
            BindAddr::Unix(u) => write!(f, "unix:{}", u.path.display()),
        }
    }
}

/// A bound local listener of either kind.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixSocket),
}

impl Listener {
    /// Binds `addr` ([`listen`] or [`listen_unix`]).
    pub fn bind(addr: &BindAddr) -> io::Result<Listener> {
        match addr {
            BindAddr::Tcp(a) => listen(*a).map(Listener::Tcp),
            BindAddr::Unix(u) => listen_unix(u).map(Listener::Unix),
        }
    }

    /// What it is bound to (the actual port when 0 was asked for).
    pub fn bound(&self, asked: &BindAddr) -> BindAddr {
        match self {
            Listener::Tcp(l) => l.local_addr().map_or(asked.clone(), BindAddr::Tcp),
            Listener::Unix(_) => asked.clone(),
        }
    }
}

/// A Unix socket listener that owns its file: removed when dropped, but
/// only while the path still names the socket this listener created.
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the file at bind time.
    id: (u64, u64),
}

impl UnixSocket {
    /// The socket file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.file_type().is_socket() && (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds a Unix socket at `bind.path`. A file already there is removed
/// first only if it is a socket nobody accepts on (left by a process that
/// died); anything else there is an error, and is left alone.
pub fn listen_unix(bind: &UnixBind) -> io::Result<UnixSocket> {
    let path = &bind.path;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process accepts on this socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; not removing it",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    let m = std::fs::symlink_metadata(path)?;
    let socket = UnixSocket {
        listener,
        path: path.clone(),
        id: (m.dev(), m.ino()),
    };
    if let Some(mode) = bind.mode {
        // On error `socket` drops and removes the file.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(socket)
}

/// [`accept`] for a Unix socket listener.
pub async fn accept_unix(
    listener: &UnixSocket,
    cancel: &CancellationToken,
    what: &str,
) -> Option<UnixStream> {
    let mut backoff = Duration::from_millis(5);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return None,
            r = listener.listener.accept() => match r {
                Ok((s, _)) => return Some(s),
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

/// Where the local app is dialed: `host:port`, or `unix:/path` for a Unix
/// socket (`Proxy.LocalServiceSocketPath`, `-service-addr unix:PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalApp {
    Tcp(String),
    Unix(PathBuf),
}

impl LocalApp {
    /// Reads the `unix:` prefix; anything else is a TCP dial target.
    pub fn parse(s: &str) -> LocalApp {
        match s.strip_prefix("unix:") {
            Some(path) => LocalApp::Unix(PathBuf::from(path)),
            None => LocalApp::Tcp(s.to_string()),
        }
    }
}

impl fmt::Display for LocalApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalApp::Tcp(a) => f.write_str(a),
            LocalApp::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Dials a Unix socket.
pub async fn dial_unix(path: &Path) -> io::Result<UnixStream> {
    UnixStream::connect(path).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unix_listener_replaces_a_stale_socket_refuses_other_files_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("up.sock");
        // A stale socket: bound, then its listener gone without removing it.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        assert!(path.exists());
        let bind = UnixBind {
            path: path.clone(),
            mode: Some(0o660),
        };
        let l = listen_unix(&bind).expect("replaces the stale socket");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        let e = listen_unix(&bind).err().expect("in use");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(l);
        assert!(!path.exists(), "removed at drop");

        std::fs::write(&path, b"data").expect("plain file");
        let e = listen_unix(&bind).err().expect("not a socket");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).expect("left alone"), b"data");
    }

    #[test]
    fn local_app_targets() {
        assert_eq!(
            LocalApp::parse("127.0.0.1:80"),
            LocalApp::Tcp("127.0.0.1:80".into())
        );
        assert_eq!(
            LocalApp::parse("unix:/run/app.sock"),
            LocalApp::Unix("/run/app.sock".into())
        );
        assert_eq!(LocalApp::parse("unix:/a").to_string(), "unix:/a");
    }

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
