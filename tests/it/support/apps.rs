//! Local apps and upstream instances without a ferry: plain (TCP or Unix
//! socket) and mTLS echo servers that count the connections they accept
//! and close.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ferry::identity::dev_ca::Leaf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::{server_config, Pki};

/// Counters kept by a test server.
#[derive(Default, Debug)]
pub struct Counts {
    pub accepted: AtomicUsize,
    pub closed: AtomicUsize,
}

impl Counts {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A plain TCP echo server (the "local app"): copies what it reads back
/// until EOF, then shuts down its write side.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl EchoServer {
    pub async fn start() -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        EchoServer::on(listener)
    }

    /// Serves on an already-bound listener (to restart on a known port).
    pub fn on(listener: TcpListener) -> EchoServer {
        let addr = listener.local_addr().expect("addr");
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.accepted.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    echo(&mut s).await;
                    c.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        EchoServer { addr, counts, task }
    }

    pub fn addr_arg(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An echo app on a Unix socket at `path` (the local app of a service
/// registered with a socket path); counts connections.
pub fn unix_echo(path: &std::path::Path) -> (JoinHandle<()>, Arc<Counts>) {
    let listener = tokio::net::UnixListener::bind(path).expect("bind app socket");
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            c.accepted.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                echo(&mut s).await;
                c.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (task, counts)
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}

/// An mTLS echo server presenting `leaf` and requiring a client certificate
/// from `pki`'s CA: an upstream instance without a ferry in front of it.
pub struct TlsEchoServer {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    /// The SNI of every completed handshake, in order.
    pub snis: Arc<Mutex<Vec<Option<String>>>>,
    /// The serial of the client's leaf in every completed handshake, in order.
    pub client_serials: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl TlsEchoServer {
    pub async fn start(pki: &Pki, leaf: &Leaf) -> TlsEchoServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tls echo");
        TlsEchoServer::on(pki, leaf, listener)
    }

    /// Serves on an already-bound listener (to bring an instance back on its port).
    pub fn on(pki: &Pki, leaf: &Leaf, listener: TcpListener) -> TlsEchoServer {
        let addr = listener.local_addr().expect("addr");
        let config = server_config(pki, leaf);
        let acceptor = TlsAcceptor::from(config);
        let counts = Arc::new(Counts::default());
        let snis = Arc::new(Mutex::new(Vec::new()));
        let client_serials = Arc::new(Mutex::new(Vec::new()));
        let (c, seen, serials) = (counts.clone(), snis.clone(), client_serials.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                c.accepted.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let (c, seen, serials) = (c.clone(), seen.clone(), serials.clone());
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(s).await {
                        let sni = tls.get_ref().1.server_name().map(str::to_string);
                        let serial = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| ferry::identity::peer_identity(c).ok())
                            .map(|p| p.serial)
                            .unwrap_or_default();
                        // The serial first: a reader that sees the SNI sees it too.
                        serials.lock().unwrap().push(serial);
                        seen.lock().unwrap().push(sni);
                        echo(&mut tls).await;
                    }
                    c.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        TlsEchoServer {
            addr,
            counts,
            snis,
            client_serials,
            task,
        }
    }

    /// How many handshakes completed.
    pub fn handshakes(&self) -> usize {
        self.snis.lock().unwrap().len()
    }

    /// The SNI the first handshake sent.
    pub fn first_sni(&self) -> Option<String> {
        self.snis.lock().unwrap().first().cloned().flatten()
    }
}

impl Drop for TlsEchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
