//! The gRPC side: a channel to the agent (unix socket or TCP) and one Delta
//! ADS stream on it, as a pair of "send a request" / "next response".

use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use super::bootstrap::AgentAddr;

/// Largest response accepted: Consul sends every cluster and listener of a
/// type in one message, certificates inline, so tonic's 4 MiB default is
/// raised, and capped.
pub const MAX_MESSAGE: usize = 32 << 20;

/// Requests queued towards the server before the sender waits.
const QUEUE: usize = 64;

/// Why a stream ended or could not start.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot reach the agent's xDS server: {0}")]
    Connect(String),
    #[error("xDS stream: {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("xDS stream closed by the server")]
    Closed,
    #[error("x-consul-token is not valid gRPC metadata")]
    BadToken,
}

impl From<tonic::Status> for StreamError {
    fn from(s: tonic::Status) -> StreamError {
        StreamError::Status {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// A channel to the agent, over TLS when `ca` is given (chain verified to
/// it, no name checked, ALPN h2, no SNI: as Envoy does for `local_agent`).
pub async fn channel(
    addr: &AgentAddr,
    ca: Option<&str>,
    connect_timeout: Duration,
) -> Result<Channel, StreamError> {
    let tls = match ca {
        Some(pem) => Some(tokio_rustls::TlsConnector::from(
            crate::identity::chain_only::chain_only_client_config(
                pem,
                "the agent's CA (bootstrap)",
            )
            .map_err(|e| StreamError::Connect(e.to_string()))?,
        )),
        None => None,
    };
    // The URI is only used for the :authority header.
    let endpoint = Endpoint::from_static("http://localhost")
        .connect_timeout(connect_timeout)
        // Consul's gRPC server refuses pings more often than every 15 s.
        .http2_keep_alive_interval(Duration::from_secs(60))
        .keep_alive_while_idle(false);
    let addr = addr.clone();
    let r = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let (addr, tls) = (addr.clone(), tls.clone());
            async move {
                let io: Box<dyn Io> = match &addr {
                    AgentAddr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
                    AgentAddr::Tcp(sa) => {
                        let s = tokio::net::TcpStream::connect(sa).await?;
                        let _ = s.set_nodelay(true);
                        Box::new(s)
                    }
                };
                let io: Box<dyn Io> = match tls {
                    // An IP server name: rustls then sends no SNI.
                    Some(tls) => {
                        let name = rustls::pki_types::ServerName::IpAddress(
                            std::net::IpAddr::from([127, 0, 0, 1]).into(),
                        );
                        Box::new(tls.connect(name, io).await?)
                    }
                    None => io,
                };
                Ok::<_, std::io::Error>(TokioIo::new(io))
            }
        }))
        .await;
    r.map_err(|e| StreamError::Connect(format!("{e}: {}", source_chain(&e))))
}

/// A byte stream to the agent.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

/// One open Delta ADS stream.
pub struct Stream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::codec::Streaming<DeltaDiscoveryResponse>,
}

impl Stream {
    /// Opens the stream, sending `first` requests ahead of any response
    /// (Consul reads the node from the first one).
    pub async fn open(
        channel: Channel,
        token: &str,
        first: Vec<DeltaDiscoveryRequest>,
    ) -> Result<Stream, StreamError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        for r in first {
            tx.try_send(r).map_err(|_| StreamError::Closed)?;
        }
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if !token.is_empty() {
            let v = token.parse().map_err(|_| StreamError::BadToken)?;
            request.metadata_mut().insert("x-consul-token", v);
        }
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        let rx = client
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        Ok(Stream { tx, rx })
    }

    /// Queues a request.
    pub async fn send(&self, r: DeltaDiscoveryRequest) -> Result<(), StreamError> {
        self.tx.send(r).await.map_err(|_| StreamError::Closed)
    }

    /// The next response.
    pub async fn next(&mut self) -> Result<DeltaDiscoveryResponse, StreamError> {
        match self.rx.message().await? {
            Some(m) => Ok(m),
            None => Err(StreamError::Closed),
        }
    }
}
