//! Setup shared by the benches: a two-service mesh from one development CA,
//! and an in-memory mTLS connection between them using ferry's own configs.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use ferry::identity::dev_ca::{DevCa, Leaf};
use ferry::identity::tls::{Credentials, PemBundle};
use ferry::identity::SpiffeId;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{duplex, DuplexStream};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

/// Trust domain of the bench CA (any `<uuid>.consul` works).
const TRUST_DOMAIN: &str = "0f0e0d0c-1111-4222-8333-444455556666.consul";
/// Datacenter both services live in.
const DATACENTER: &str = "dc1";
/// The service that dials (the TLS client, an upstream listener's side).
const CLIENT_SERVICE: &str = "web";
/// The service being dialed (the TLS server, an inbound listener's side).
const SERVER_SERVICE: &str = "api";
/// Leaf lifetime: comfortably longer than any bench run.
const LEAF_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// `web` dialing `api`: ferry's client config for that upstream, ferry's
/// server config for `api`, and the SNI ferry would send.
pub struct Mesh {
    /// `web`'s config for dialing `api`; verifies the server is `api`.
    pub client: Arc<ClientConfig>,
    /// `api`'s config for accepting; verifies the client's chain and SPIFFE ID.
    pub server: Arc<ServerConfig>,
    /// Consul's SNI for `api`, as ferry's upstream listener sends it.
    pub server_name: ServerName<'static>,
}

fn bundle(ca: &DevCa, leaf: &Leaf, service: &str) -> PemBundle {
    PemBundle {
        roots: ca.cert_pem().to_string(),
        chain: leaf.cert_pem.clone(),
        key: leaf.key_pem.clone(),
        origin: [
            "bench ca".to_string(),
            format!("bench {service} leaf"),
            format!("bench {service} key"),
        ],
    }
}

/// Builds the mesh: one CA, a leaf each for `web` and `api`, and ferry's
/// credentials for both.
pub fn mesh() -> Mesh {
    let ca = DevCa::generate(TRUST_DOMAIN).expect("generate the bench CA");
    let web_leaf = ca
        .leaf(CLIENT_SERVICE, DATACENTER, LEAF_TTL)
        .expect("issue the web leaf");
    let api_leaf = ca
        .leaf(SERVER_SERVICE, DATACENTER, LEAF_TTL)
        .expect("issue the api leaf");
    let web = Credentials::new(&bundle(&ca, &web_leaf, CLIENT_SERVICE), CLIENT_SERVICE)
        .expect("web credentials");
    let api = Credentials::new(&bundle(&ca, &api_leaf, SERVER_SERVICE), SERVER_SERVICE)
        .expect("api credentials");
    let sni = SpiffeId::service(TRUST_DOMAIN, DATACENTER, SERVER_SERVICE).sni();
    Mesh {
        client: web
            .client_config(SERVER_SERVICE, ([127, 0, 0, 1], 21000).into(), None)
            .expect("a client config for api"),
        server: api.server_config(),
        server_name: ServerName::try_from(sni).expect("Consul's SNI is a DNS name"),
    }
}

/// The two ends of one in-memory mTLS connection.
pub type TlsPair = (
    client::TlsStream<DuplexStream>,
    server::TlsStream<DuplexStream>,
);

/// Handshakes `client` against the mesh's server over a fresh in-memory pipe
/// of `capacity` bytes, driving both sides in this task.
pub async fn connect(
    mesh: &Mesh,
    client: Arc<ClientConfig>,
    capacity: usize,
) -> io::Result<TlsPair> {
    let (c, s) = duplex(capacity);
    let connector = TlsConnector::from(client);
    let acceptor = TlsAcceptor::from(mesh.server.clone());
    tokio::try_join!(
        connector.connect(mesh.server_name.clone(), c),
        acceptor.accept(s)
    )
}
