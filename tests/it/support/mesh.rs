//! The mesh as a test sees it: a pair of ferries in front of an app, and
//! mTLS connections to a ferry's public listener.

use std::net::SocketAddr;

use ferry::identity::dev_ca::Leaf;
use tokio::net::TcpStream;

use super::{any_name, raw_client, within, EchoServer, Ferry, Pki};

/// A mesh pair: `server_svc`'s ferry fronting an echo app, and
/// `client_svc`'s ferry with an upstream to it. Extra inbound flags go in
/// `inbound_extra` (e.g. intentions).
pub struct Mesh {
    pub pki: Pki,
    pub app: EchoServer,
    pub server: Ferry,
    pub client: Ferry,
}

impl Mesh {
    pub async fn start(client_svc: &str, server_svc: &str, inbound_extra: &[&str]) -> Mesh {
        let pki = Pki::new();
        pki.leaf(client_svc);
        pki.leaf(server_svc);
        let app = EchoServer::start().await;
        let dir = pki.dir_arg();
        let app_addr = app.addr_arg();
        let mut args = vec![
            "-service",
            server_svc,
            "-listen",
            "127.0.0.1:0",
            "-service-addr",
            &app_addr,
            "-certs",
            &dir,
        ];
        args.extend_from_slice(inbound_extra);
        let server = Ferry::start(&args).await;
        let up = format!("{server_svc}:127.0.0.1:0");
        let inst = format!("{server_svc}={}", server.inbound());
        let client = Ferry::start(&[
            "-service",
            client_svc,
            "-upstream",
            &up,
            "-upstream-addr",
            &inst,
            "-certs",
            &dir,
        ])
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
