//! Bytes on sockets: round trips and echoes with a deadline, orderly ends,
//! resets, loopback addresses and ones where nothing listens, Unix socket
//! files and their mode, and the HTTP client for the admin listener and the
//! fake agent.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{within, DEADLINE};

/// Sends `msg`, half-closes, and returns everything read back until EOF.
/// An error or reset counts as "nothing came back" only if `Err` is returned.
pub async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(DEADLINE, async {
        s.write_all(msg).await?;
        s.shutdown().await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await?;
        Ok(got)
    })
    .await
    .unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "round trip timed out",
        ))
    })
}

/// Connects to a plain listener (an upstream of ferry) and checks that
/// `msg` comes back intact through the mesh.
pub async fn assert_echo(addr: SocketAddr, msg: &[u8]) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let got = round_trip(&mut s, msg).await.expect("round trip");
    assert_eq!(got.len(), msg.len(), "echoed length through {addr}");
    assert!(got == msg, "echoed bytes differ through {addr}");
}

/// Connects to a Unix socket ferry listens on (an upstream's socket file)
/// and checks that `msg` comes back intact.
pub async fn echo_unix(path: &std::path::Path, msg: &[u8]) {
    let mut s = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect socket");
    let got = round_trip(&mut s, msg).await.expect("round trip");
    assert_eq!(got, msg, "echo through {}", path.display());
}

/// Whether `path` is a socket file (not following a symlink).
pub fn is_socket(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// The permission bits of the file at `path`.
pub fn socket_mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("meta").permissions().mode() & 0o777
}

/// An address where nothing listens (connections are refused): bound, then released.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

/// An address on 127.0.0.1 where nothing listens, for a listener a test
/// must name before anything binds it (an xDS listener's address is part
/// of the resource). Unlike [`dead_addr`] the port is below the kernel's
/// ephemeral range (`ip_local_port_range`), from which both `bind(…:0)`
/// and outgoing connections take theirs, so between this call and the
/// bind no other socket of the host is given the port by the kernel,
/// however many connections parallel tests open. Each port is checked free
/// and handed out once per process.
pub fn spare_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static RANGE: OnceLock<(u32, u32)> = OnceLock::new();
    let &(base, span) = RANGE.get_or_init(|| {
        let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
            .filter(|low| *low >= 4096)
            .unwrap_or(32768);
        let span = low / 2;
        // Another test process walks from elsewhere.
        let start = (std::process::id() * 7919) % span;
        NEXT.store(start, Ordering::Relaxed);
        (low - span, span)
    });
    for _ in 0..span {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let addr = loopback(port as u16);
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// Makes closing `s` send a TCP reset instead of a FIN (SO_LINGER 0), so
/// dropping it afterwards is an abrupt failure, not an orderly close.
pub fn reset_on_close(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
}

/// Writes `msg` and reads the same bytes back, leaving the connection open.
pub async fn echo_once<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut buf = vec![0u8; msg.len()];
    within("echo", s.read_exact(&mut buf))
        .await
        .expect("read echo");
    assert_eq!(buf, msg);
}

/// Half-closes and reads to EOF, expecting nothing more: an orderly end of
/// a held connection.
pub async fn finish<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    s.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    within("EOF after half-close", s.read_to_end(&mut rest))
        .await
        .expect("read to EOF");
    assert!(rest.is_empty(), "nothing more: {rest:?}");
}

/// 127.0.0.1:`port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// An HTTP client for the admin listener and the fake agent, both on
/// 127.0.0.1: no proxy from the environment. reqwest is built without a
/// bundled rustls provider and builds a TLS config even for plain http, so
/// the ring provider is installed first.
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client")
}
