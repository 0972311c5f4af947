//! HTTPS to the agent: which CAs are trusted, the client certificate, and
//! the server name checked (spec §1.0, `CONSUL_HTTP_SSL*` and the TLS flags).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::AgentError;
use crate::config::agent::AgentTls;

/// The rustls config for an https agent: trust `-ca-file`/`-ca-path` (or
/// the system bundle when neither is set), present `-client-cert` if given,
/// check the certificate against `-tls-server-name` when set (instead of
/// the URL's host), or not at all with `CONSUL_HTTP_SSL_VERIFY=false`.
pub(super) fn agent_tls(tls: &AgentTls) -> Result<rustls::ClientConfig, AgentError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| AgentError::Setup(format!("{what}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    let mut files = Vec::new();
    if let Some(f) = &tls.ca_file {
        files.push(f.clone());
    }
    if let Some(dir) = &tls.ca_path {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| setup(&format!("-ca-path {}", dir.display()), &e))?;
        for e in entries.flatten() {
            let p = e.path();
            if p.is_file() {
                files.push(p);
            }
        }
    }
    if files.is_empty() {
        files.push("/etc/ssl/certs/ca-certificates.crt".into());
    }
    for f in &files {
        let pem = std::fs::read(f).map_err(|e| setup(&f.display().to_string(), &e))?;
        for c in CertificateDer::pem_slice_iter(&pem).flatten() {
            let _ = roots.add(c);
        }
    }
    if tls.verify && roots.is_empty() {
        return Err(AgentError::Setup(format!(
            "no CA certificate found in {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let provider = crate::identity::tls::provider();
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| setup("agent CA", &e))?;
    let server_name = match &tls.server_name {
        Some(n) => {
            Some(ServerName::try_from(n.clone()).map_err(|e| setup("-tls-server-name", &e))?)
        }
        None => None,
    };
    let verifier = Arc::new(AgentVerifier {
        inner: webpki,
        server_name,
        verify: tls.verify,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| setup("TLS", &e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| setup(&format!("-client-cert {}", cert.display()), &e))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| setup(&format!("-client-key {}", key.display()), &e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| setup("-client-cert/-client-key", &e))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// WebPKI verification of the agent, against `-tls-server-name` when set.
#[derive(Debug)]
struct AgentVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    server_name: Option<ServerName<'static>>,
    verify: bool,
}

impl ServerCertVerifier for AgentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.verify {
            return Ok(ServerCertVerified::assertion());
        }
        let name = self.server_name.as_ref().unwrap_or(server_name);
        self.inner
            .verify_server_cert(end_entity, intermediates, name, ocsp, now)
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
