//! The mesh as a test sees it: a pair of ferries in front of an app, and
//! mTLS connections to a ferry's public listener.

use std::io;
use std::net::SocketAddr;

use ferry::identity::dev_ca::Leaf;
use tokio::net::TcpStream;

use super::{any_name, raw_client, round_trip, within, EchoServer, Ferry, Pki, StandaloneArgs};

/// What [`mesh_echo`] and [`plain_echo`] send, and expect back.
pub const MSG: &[u8] = b"ping through the mesh";

/// What a ferry can front as its local app: an address, or a server that
/// has one.
pub trait LocalApp {
    /// Where the app listens.
    fn app_addr(&self) -> SocketAddr;
}

impl LocalApp for SocketAddr {
    fn app_addr(&self) -> SocketAddr {
        *self
    }
}

impl LocalApp for EchoServer {
    fn app_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A mesh pair: `server_svc`'s ferry fronting the app (an [`EchoServer`]
/// unless the test brings its own), and `client_svc`'s ferry with an
/// upstream to it, both standalone with leaves from one new [`Pki`].
pub struct Mesh<A = EchoServer> {
    pub pki: Pki,
    /// The app, kept for as long as the mesh (a server stays up).
    pub app: A,
    pub server: Ferry,
    pub client: Ferry,
}

impl Mesh {
    /// A mesh pair in front of a new [`EchoServer`]: [`Mesh::start`] for
    /// the usual app.
    pub async fn echo(client_svc: &str, server_svc: &str, inbound_extra: &[&str]) -> Mesh {
        let app = EchoServer::start().await;
        Mesh::start(client_svc, server_svc, app, inbound_extra).await
    }
}

impl<A: LocalApp> Mesh<A> {
    /// Issues leaves for both services, starts `server_svc`'s ferry on a
    /// free port in front of `app` with `inbound_extra` flags added (e.g.
    /// intentions), then `client_svc`'s ferry whose upstream `server_svc`
    /// is that listener.
    pub async fn start(
        client_svc: &str,
        server_svc: &str,
        app: A,
        inbound_extra: &[&str],
    ) -> Mesh<A> {
        let pki = Pki::new();
        pki.leaf(client_svc);
        pki.leaf(server_svc);
        let dir = pki.dir_arg();
        let server = StandaloneArgs::new(server_svc, &dir)
            .listen(app.app_addr())
            .extra(inbound_extra)
            .start()
            .await;
        let client = StandaloneArgs::new(client_svc, &dir)
            .upstream(server_svc, &[server.inbound()])
            .start()
            .await;
        Mesh {
            pki,
            app,
            server,
            client,
        }
    }

    /// The client-side ferry's local listener for the server service.
    pub fn entry(&self, server_svc: &str) -> SocketAddr {
        self.client.upstream(server_svc)
    }
}

/// A mesh client connection (TLS over TCP) to a ferry's public listener.
pub type MeshConn = tokio_rustls::client::TlsStream<TcpStream>;

/// A completed mesh handshake to `addr` presenting `leaf`.
pub async fn mesh_conn(addr: SocketAddr, leaf: &Leaf) -> MeshConn {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    within("handshake", raw_client(Some(leaf)).connect(any_name(), tcp))
        .await
        .expect("handshake")
}

/// One echo as a mesh client, where any step may be refused: connects to
/// ferry's public listener at `addr`, handshakes presenting `leaf` (a
/// `&Leaf`, or `None` for no client certificate), sends [`MSG`],
/// half-closes and returns what came back until EOF. Connect and handshake
/// errors are returned, not panicked on, so that [`refused`] can judge the
/// whole attempt; the round trip is bounded by DEADLINE (a hang comes back
/// as `TimedOut`). Where the handshake itself must succeed, use
/// [`mesh_conn`] and [`round_trip`].
pub async fn mesh_echo<'a>(
    addr: SocketAddr,
    leaf: impl Into<Option<&'a Leaf>>,
) -> io::Result<Vec<u8>> {
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = raw_client(leaf.into()).connect(any_name(), tcp).await?;
    round_trip(&mut tls, MSG).await
}

/// One echo as a local client of the plain listener at `addr` (a ferry's
/// upstream listener): sends [`MSG`], half-closes and returns what came
/// back until EOF; a refused connect is returned as the error.
pub async fn plain_echo(addr: SocketAddr) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    round_trip(&mut s, MSG).await
}

/// True if an echo attempt ([`mesh_echo`], [`plain_echo`]) was refused: the
/// connection failed or closed with nothing echoed, rather than answering
/// or being left hanging (our own timeout is not a refusal). With TLS 1.3
/// the client's side of the handshake completes before the server has
/// checked the client's certificate, so a refusal often shows only on the
/// first read.
pub fn refused(r: &io::Result<Vec<u8>>) -> bool {
    match r {
        Ok(got) => got.is_empty(),
        Err(e) => e.kind() != io::ErrorKind::TimedOut,
    }
}
