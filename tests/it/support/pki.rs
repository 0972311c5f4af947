//! A dev PKI on disk laid out as `-certs` expects, TLS configs built from
//! its leaves, and raw mesh clients that present any certificate (or none)
//! and trust any server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry::identity::dev_ca::{DevCa, Leaf, LeafSpec};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use tokio_rustls::TlsConnector;

/// A dev CA and a directory laid out as `-certs` expects.
pub struct Pki {
    pub ca: DevCa,
    dir: tempfile::TempDir,
}

impl Pki {
    /// A new CA with a random trust domain; `ca.pem` is written.
    pub fn new() -> Pki {
        Pki::with_trust_domain(&ferry::identity::dev_ca::random_trust_domain())
    }

    /// A new CA for `trust_domain`.
    pub fn with_trust_domain(trust_domain: &str) -> Pki {
        let ca = DevCa::generate(trust_domain).expect("generate CA");
        let dir = tempfile::tempdir().expect("tempdir");
        ca.write(dir.path()).expect("write CA");
        Pki { ca, dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn dir_arg(&self) -> String {
        self.dir.path().display().to_string()
    }

    pub fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    /// A Consul-shaped leaf for `service` in datacenter `dc`, not written.
    pub fn leaf_in(&self, service: &str, dc: &str) -> Leaf {
        self.ca
            .leaf(service, dc, Duration::from_secs(3600))
            .expect("leaf")
    }

    /// Issues a Consul-shaped leaf for `service` in dc1 and writes it to the dir.
    pub fn leaf(&self, service: &str) -> Leaf {
        let leaf = self
            .ca
            .leaf(service, "dc1", Duration::from_secs(3600))
            .expect("leaf");
        ferry::identity::dev_ca::write_leaf(self.dir(), service, &leaf).expect("write leaf");
        leaf
    }

    /// Issues a leaf exactly as `spec` says (not written to the dir).
    pub fn issue(&self, spec: &LeafSpec) -> Leaf {
        self.ca.issue(spec).expect("issue")
    }

    /// The SPIFFE URI for `service` in dc1.
    pub fn uri(&self, service: &str) -> String {
        self.ca.spiffe_uri("dc1", service)
    }

    /// A path inside the dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certs")
}

fn key(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("key")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS server config presenting `leaf`, requiring client certs from `pki`.
pub fn server_config(pki: &Pki, leaf: &Leaf) -> Arc<ServerConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(pki.ca.cert_pem()) {
        roots.add(c).expect("root");
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .expect("verifier");
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&leaf.cert_pem), key(&leaf.key_pem))
        .expect("server cert");
    Arc::new(config)
}

/// A mesh client that presents `client` (or no certificate) and accepts any
/// server certificate: for testing what ferry's *inbound* side refuses.
pub fn raw_client(client: Option<&Leaf>) -> TlsConnector {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer));
    let config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(certs(&leaf.cert_pem), key(&leaf.key_pem))
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

/// The server name raw clients send.
pub fn any_name() -> ServerName<'static> {
    ServerName::try_from("ferry.test").expect("name")
}

#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The first certificate in `pem` (the leaf, for a chain) as DER: what a
/// TLS peer presenting `pem` shows as `peer_certificates()[0]`.
pub fn first_cert(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate")
}

/// True if `s` is in Consul's serial and key-ID format: lower-case hex
/// bytes joined by colons (`0a:1b:...`), at least one.
pub fn is_colon_hex(s: &str) -> bool {
    s.split(':').all(|p| {
        p.len() == 2
            && p.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    })
}
