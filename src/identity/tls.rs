//! TLS credentials and the two verifiers that make a TLS connection a mesh
//! connection.
//!
//! A Consul leaf identifies a service by a SPIFFE URI SAN, not by a DNS name,
//! so the stock rustls hostname checks do not apply in either direction:
//! - as a server we require a client certificate that chains to the roots
//!   (rustls' WebPKI client verifier: chain, validity, clientAuth EKU) and
//!   then insist it names one service in our trust domain;
//! - as a client we verify the chain (serverAuth EKU) with rustls' public
//!   building block `verify_server_cert_signed_by_trust_anchor`, skip the
//!   hostname step, and require the URI SAN to name the upstream we meant to
//!   reach. This mirrors Consul's Go library (`connect/tls.go`) and linkerd's
//!   `meshtls` verifier, except that we also pin the trust domain, as Envoy
//!   does: a certificate from another mesh never passes on its path alone.
//!
//! [`Credentials`] is one validated, immutable set of roots + leaf + the rustls
//! configs built from them. Rotation (Consul mode) builds a new one and swaps
//! it; connections already established keep the config they started with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::identity::tickets::InstanceTickets;
use crate::identity::{peer_identity, IdentityError, PeerIdentity, SpiffeId};

/// Why a set of certificates cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: no PEM CERTIFICATE block found")]
    NoCertificates { what: String },
    #[error("{what}: {why}")]
    BadPem { what: String, why: String },
    #[error("{what}: root certificate #{index} is not usable: {why}")]
    BadRoot {
        what: String,
        index: usize,
        why: String,
    },
    #[error("{what}: no PEM private key found (expected EC PRIVATE KEY or PRIVATE KEY)")]
    NoKey { what: String },
    #[error("{key} is not the private key of the leaf in {chain} ({why})")]
    KeyMismatch {
        chain: String,
        key: String,
        why: String,
    },
    #[error("{chain}: leaf certificate does not chain to the trusted roots in {roots}: {why}")]
    LeafNotTrusted {
        chain: String,
        roots: String,
        why: rustls::Error,
    },
    #[error("{chain}: leaf certificate identity: {why}")]
    LeafIdentity { chain: String, why: IdentityError },
    #[error("{chain}: leaf certificate is for service {found:?}, but this proxy is {expected:?}")]
    WrongService {
        chain: String,
        expected: String,
        found: String,
    },
    #[error("building the TLS configuration: {0}")]
    Config(String),
}

/// PEM text of the three things a proxy needs, with a note of where each came
/// from so errors can name the file.
#[derive(Clone)]
pub struct PemBundle {
    /// Trusted roots, one or more CERTIFICATE blocks.
    pub roots: String,
    /// Leaf certificate followed by any intermediates (Consul's `CertPEM`).
    pub chain: String,
    /// The leaf's private key (SEC 1 or PKCS#8).
    pub key: String,
    /// Where `roots`, `chain` and `key` came from, in that order (file paths).
    pub origin: [String; 3],
}

impl std::fmt::Debug for PemBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemBundle")
            .field("origin", &self.origin)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// One validated set of roots and leaf, and the rustls configs built on it.
pub struct Credentials {
    /// Our own identity, from the leaf.
    pub identity: PeerIdentity,
    /// Start of the leaf's validity, seconds since the Unix epoch.
    pub leaf_not_before: i64,
    /// End of the leaf's validity, seconds since the Unix epoch.
    pub leaf_not_after: i64,
    roots: Arc<RootCertStore>,
    certified: Arc<CertifiedKey>,
    provider: Arc<CryptoProvider>,
    server: Arc<ServerConfig>,
    /// One client config per upstream instance, by upstream then address,
    /// built on first use and kept for its session tickets (see
    /// [`crate::identity::tickets`]). Nested so a lookup allocates no key. std lock: a
    /// lookup.
    clients: Mutex<HashMap<String, HashMap<ClientKey, Arc<ClientConfig>>>>,
    /// Per upstream, the exact SPIFFE URIs a server may present instead of
    /// "that upstream's name in our trust domain" (xDS: the cluster's SAN
    /// matcher). Empty in flag and agent mode.
    expected: HashMap<String, Vec<String>>,
}

/// Instances per upstream whose client config (and tickets) is kept. Past
/// this, an arbitrary one is dropped and starts over with a full handshake.
const MAX_CLIENT_CONFIGS: usize = 256;

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity.id.to_string())
            .field("serial", &self.identity.serial)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

/// The crypto provider every config uses: ring, with TLS 1.3's
/// AES-128-GCM-SHA256 preferred, as Go's crypto/tls (Consul's own proxy) and
/// BoringSSL (Envoy) do. Both AES-GCM suites are full-strength; the SHA-384
/// key schedule of AES-256-GCM has no hardware path in ring and was a tenth
/// of the CPU of a resumed handshake, while SHA-256 uses the SHA extensions.
/// Every suite stays on offer; as a server we follow the client's order.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

impl Credentials {
    /// Parses and validates `pem` for `service`: the leaf must chain to the
    /// roots, be valid now, match its key, and name `service` in the roots'
    /// trust domain. Builds the server config; client configs are built per
    /// upstream on first use.
    pub fn new(pem: &PemBundle, service: &str) -> Result<Credentials, TlsError> {
        let provider = provider();
        let [roots_what, chain_what, key_what] = &pem.origin;
        let root_ders = parse_certs(&pem.roots, roots_what)?;
        let mut roots = RootCertStore::empty();
        for (index, der) in root_ders.into_iter().enumerate() {
            roots.add(der).map_err(|e| TlsError::BadRoot {
                what: roots_what.clone(),
                index,
                why: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let chain = parse_certs(&pem.chain, chain_what)?;
        let key =
            PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).map_err(|_| TlsError::NoKey {
                what: key_what.clone(),
            })?;
        let certified = Arc::new(
            CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|e| {
                let why = match e {
                    rustls::Error::InconsistentKeys(_) => "the public keys differ".to_string(),
                    other => other.to_string(),
                };
                TlsError::KeyMismatch {
                    chain: chain_what.clone(),
                    key: key_what.clone(),
                    why,
                }
            })?,
        );

        let leaf = &chain[0];
        let untrusted = |why| TlsError::LeafNotTrusted {
            chain: chain_what.clone(),
            roots: roots_what.clone(),
            why,
        };
        let parsed = ParsedCertificate::try_from(leaf).map_err(untrusted)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(untrusted)?;
        let identity = peer_identity(leaf).map_err(|why| TlsError::LeafIdentity {
            chain: chain_what.clone(),
            why,
        })?;
        if identity.id.service != service {
            return Err(TlsError::WrongService {
                chain: chain_what.clone(),
                expected: service.to_string(),
                found: identity.id.service.clone(),
            });
        }
        let (leaf_not_before, leaf_not_after) = x509_parser::parse_x509_certificate(leaf)
            .map(|(_, c)| {
                (
                    c.validity().not_before.timestamp(),
                    c.validity().not_after.timestamp(),
                )
            })
            .unwrap_or((0, 0));

        let trust_domain = identity.id.trust_domain.clone();
        let server = server_config(&provider, &roots, &certified, &trust_domain)?;
        Ok(Credentials {
            identity,
            leaf_not_before,
            leaf_not_after,
            roots,
            certified,
            provider,
            server,
            clients: Mutex::new(HashMap::new()),
            expected: HashMap::new(),
        })
    }

    /// These credentials with, per upstream name, the exact SPIFFE URIs its
    /// servers may present (any one of them), replacing the default check
    /// (the upstream's name in our trust domain) for those upstreams only.
    pub fn with_expected_identities(mut self, expected: HashMap<String, Vec<String>>) -> Self {
        self.expected = expected;
        self
    }

    /// Our trust domain, taken from our own leaf.
    pub fn trust_domain(&self) -> &str {
        &self.identity.id.trust_domain
    }

    /// Number of trusted roots.
    pub fn root_count(&self) -> usize {
        self.roots.len()
    }

    /// The config for accepting mesh connections.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The config for dialing `instance` of `upstream`, which verifies that
    /// the server is that service in our trust domain (or, with `identity`,
    /// one of those exact URIs: an instance with its own, such as an
    /// aggregate cluster's leg) and keeps the instance's session tickets.
    pub fn client_config(
        &self,
        upstream: &str,
        instance: SocketAddr,
        identity: Option<&Arc<[String]>>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let key = (instance, identity.cloned());
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(upstream).and_then(|i| i.get(&key)) {
            return Ok(c.clone());
        }
        let expected = match (identity, self.expected.get(upstream)) {
            (Some(uris), _) => Expected::Exact(uris.to_vec()),
            (None, Some(uris)) => Expected::Exact(uris.clone()),
            (None, None) => Expected::Service(SpiffeId {
                service: upstream.to_string(),
                ..self.identity.id.clone()
            }),
        };
        let config = client_config(&self.provider, &self.roots, &self.certified, expected)?;
        let instances = clients.entry(upstream.to_string()).or_default();
        if instances.len() >= MAX_CLIENT_CONFIGS {
            if let Some(old) = instances.keys().next().cloned() {
                instances.remove(&old);
            }
        }
        instances.insert(key, config.clone());
        Ok(config)
    }
}

/// A client config per instance address and identity it is checked for.
type ClientKey = (SocketAddr, Option<Arc<[String]>>);

pub(super) fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            what: what.to_string(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            what: what.to_string(),
        });
    }
    Ok(certs)
}

/// TLS 1.2 stays on: Envoy sidecars as clients stop at 1.2 by default (spec §2.7).
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

pub(super) fn versions() -> &'static [&'static rustls::SupportedProtocolVersion] {
    VERSIONS
}

fn server_config(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<RootCertStore>,
    key: &Arc<CertifiedKey>,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = Arc::new(MeshClientVerifier {
        inner,
        trust_domain: trust_domain.to_string(),
    });
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions())
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCert(key.clone())));
    // No ALPN: a rustls server with protocols configured aborts the handshake
    // when the client offers none that match, and mesh clients differ (§2.7).
    config.alpn_protocols.clear();
    config.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Config(e.to_string()))?;
    // SNI is accepted whatever it says: Envoy sends one, the Go proxy none.
    Ok(Arc::new(config))
}

fn client_config(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<RootCertStore>,
    key: &Arc<CertifiedKey>,
    expected: Expected,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = Arc::new(MeshServerVerifier {
        roots: roots.clone(),
        algs: provider.signature_verification_algorithms,
        expected,
    });
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions())
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCert(key.clone())));
    config.resumption = Resumption::store(Arc::new(InstanceTickets::default()));
    Ok(Arc::new(config))
}

/// Presents our one leaf whatever the peer asks for: the key is parsed once,
/// in [`Credentials::new`], and shared by the server and every client config.
#[derive(Debug)]
struct SingleCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for SingleCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for SingleCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn identity_error(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// True when a certificate was refused for the identity it names (rather
/// than for its chain), so metrics can tell the two apart.
pub fn is_identity_error(e: &OtherError) -> bool {
    e.0.is::<IdentityError>() || e.0.is::<WrongServerIdentity>()
}

/// Intermediates a peer may send. Consul sends one or two (more only across
/// a CA migration); webpki allows six, and with many candidate issuers its
/// path search costs tens of milliseconds of CPU per handshake, which a
/// stranger could spend for us before proving they hold any key.
pub const MAX_INTERMEDIATES: usize = 4;

/// A chain longer than [`MAX_INTERMEDIATES`].
#[derive(Debug, thiserror::Error)]
#[error("certificate chain has {0} intermediates; at most {MAX_INTERMEDIATES} are accepted")]
pub struct ChainTooLong(usize);

pub(super) fn check_chain_length(
    intermediates: &[CertificateDer<'_>],
) -> Result<(), rustls::Error> {
    if intermediates.len() > MAX_INTERMEDIATES {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(ChainTooLong(intermediates.len()))),
        )));
    }
    Ok(())
}

/// Server side: WebPKI client verification, then "this certificate names
/// exactly one service of our trust domain". Authorization (intentions)
/// happens after the handshake, where it can be logged with the identity.
#[derive(Debug)]
struct MeshClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for MeshClientVerifier {
    // Stated, not inherited from the trait's defaults: a mesh peer without a
    // certificate must never get past the handshake.
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_chain_length(intermediates)?;
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = peer_identity(end_entity).map_err(identity_error)?;
        peer.id
            .require_trust_domain(&self.trust_domain)
            .map_err(identity_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: chain to the roots with the serverAuth EKU, no hostname
/// check, then the URI SAN must be `expected` (trust domain, partition,
/// namespace and service; any datacenter, since static upstreams do not say
/// which one an instance lives in).
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    expected: Expected,
}

/// Who the server must be.
#[derive(Debug)]
enum Expected {
    /// This service (trust domain, partition, namespace, name; any
    /// datacenter).
    Service(SpiffeId),
    /// Exactly one of these URIs (a control plane's SAN matcher).
    Exact(Vec<String>),
}

/// Why a server's identity was refused; carried inside the rustls error so the
/// connection log can say exactly what the server presented.
#[derive(Debug, thiserror::Error)]
#[error("server presented {found}, expected service {expected:?}")]
pub struct WrongServerIdentity {
    found: String,
    expected: String,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check_chain_length(intermediates)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let peer = peer_identity(end_entity).map_err(identity_error)?;
        let (ok, expected) = match &self.expected {
            Expected::Service(want) => (
                peer.id
                    .trust_domain
                    .eq_ignore_ascii_case(&want.trust_domain)
                    && peer.id.partition.eq_ignore_ascii_case(&want.partition)
                    && peer.id.namespace.eq_ignore_ascii_case(&want.namespace)
                    && peer.id.service.eq_ignore_ascii_case(&want.service),
                want.service.clone(),
            ),
            Expected::Exact(uris) => {
                let found = peer.id.to_string();
                (uris.contains(&found), uris.join(" or "))
            }
        };
        if !ok {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(WrongServerIdentity {
                    found: peer.id.to_string(),
                    expected,
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
