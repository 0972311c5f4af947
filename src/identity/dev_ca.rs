//! A development certificate authority that issues Consul-shaped certificates.
//!
//! Standalone mode and the tests need certificates that look exactly like the
//! ones Consul's built-in CA hands out (spec §2.3, §2.4), so that whatever ferry
//! accepts here it also accepts from a real agent:
//! - CA: EC P-256, self-signed, `CA:TRUE`, keyCertSign|cRLSign|digitalSignature,
//!   the trust-domain URI SAN `spiffe://<cluster-id>.consul`, a CN in Consul's
//!   `pri-<id>.consul.ca.<id>.consul` form.
//! - Leaf: EC P-256, empty subject (so the SAN is critical), one URI SAN
//!   `spiffe://<td>/ns/default/dc/<dc>/svc/<name>`, serverAuth+clientAuth,
//!   valid from one minute ago (Consul's clock-skew allowance).
//! - Leaf keys are written as SEC 1 `EC PRIVATE KEY`, the form the agent returns.
//!
//! This is for development and tests only: the CA key sits on disk.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Errors from creating, loading or writing dev certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    BadCa { path: PathBuf, why: String },
    #[error("invalid trust domain {0:?}: expected <cluster-id>.consul in lower case letters, digits and '-'")]
    BadTrustDomain(String),
    #[error("invalid service name {0:?}: use letters, digits, '-' and '_'")]
    BadServiceName(String),
    #[error("invalid datacenter {0:?}: use letters, digits, '-' and '_'")]
    BadDatacenter(String),
}

/// A CA that can sign leaves. Holds its private key in memory.
pub struct DevCa {
    trust_domain: String,
    cert_pem: String,
    /// Intermediates between this CA and the root, this CA's own first
    /// (empty for a root). Appended to every leaf, as Consul's `CertPEM` is.
    chain_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Leaf {
    /// The certificate, followed by any intermediates (Consul's `CertPEM`).
    pub cert_pem: String,
    /// The private key, SEC 1 `EC PRIVATE KEY`.
    pub key_pem: String,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material, even in test failure output.
        f.debug_struct("Leaf")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Everything about a leaf that tests may want to bend out of shape.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// URI SANs, in order. Consul issues exactly one.
    pub uris: Vec<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Mark the certificate as a CA (a misuse case for tests).
    pub is_ca: bool,
}

impl LeafSpec {
    /// Consul's leaf profile for `spiffe_uri`, valid for `ttl` from one minute ago.
    pub fn consul(spiffe_uri: String, ttl: Duration) -> LeafSpec {
        let not_before = OffsetDateTime::now_utc() - time::Duration::minutes(1);
        LeafSpec {
            uris: vec![spiffe_uri],
            not_before,
            not_after: not_before + ttl,
            is_ca: false,
        }
    }
}

impl CertError {
    /// True when the user asked for something invalid (as opposed to the
    /// machine failing to do it): the binary exits with its usage code.
    pub fn is_usage(&self) -> bool {
        !matches!(self, CertError::Io { .. } | CertError::Generate(_))
    }
}

impl DevCa {
    /// Creates a new CA for `trust_domain` (`<uuid>.consul`).
    pub fn generate(trust_domain: &str) -> Result<DevCa, CertError> {
        check_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let short = trust_domain.get(..8).unwrap_or(trust_domain);
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("pri-{short}.consul.ca.{short}.consul"),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{trust_domain}"))?];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(DevCa {
            trust_domain: trust_domain.to_string(),
            cert_pem: cert.pem(),
            chain_pem: String::new(),
            issuer: Issuer::new(params, key),
        })
    }

    /// An intermediate CA signed by this one, for the same trust domain, as
    /// Consul uses in secondary datacenters and with Vault. Its leaves carry
    /// the intermediate after the leaf in `cert_pem`.
    pub fn intermediate(&self) -> Result<DevCa, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("sec.consul.ca.{}", self.trust_domain),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{}", self.trust_domain))?];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(365);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(DevCa {
            trust_domain: self.trust_domain.clone(),
            cert_pem: cert.pem(),
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA written earlier by [`DevCa::write`]; its trust domain is read
    /// from the certificate's URI SAN.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<DevCa, CertError> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let bad = |why: String| CertError::BadCa {
            path: cert_path.to_path_buf(),
            why,
        };
        let der = pem_der(&cert_pem).ok_or_else(|| bad("no CERTIFICATE PEM block".into()))?;
        let trust_domain = ca_trust_domain(&der).map_err(bad)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::BadCa {
            path: key_path.to_path_buf(),
            why: format!("not a usable private key: {e}"),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        Ok(DevCa {
            trust_domain,
            cert_pem,
            chain_pem: String::new(),
            issuer,
        })
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The SPIFFE ID of `service` in `dc` under this CA's trust domain.
    pub fn spiffe_uri(&self, dc: &str, service: &str) -> String {
        format!(
            "spiffe://{}/ns/default/dc/{dc}/svc/{service}",
            self.trust_domain
        )
    }

    /// A leaf for `service` with Consul's profile.
    pub fn leaf(&self, service: &str, dc: &str, ttl: Duration) -> Result<Leaf, CertError> {
        check_name(service).map_err(|_| CertError::BadServiceName(service.into()))?;
        check_name(dc).map_err(|_| CertError::BadDatacenter(dc.into()))?;
        self.issue(&LeafSpec::consul(self.spiffe_uri(dc, service), ttl))
    }

    /// A leaf exactly as `spec` says, signed by this CA.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Leaf, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = spec
            .uris
            .iter()
            .map(|u| uri_san(u))
            .collect::<Result<_, _>>()?;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        if spec.is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
        } else {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
                KeyUsagePurpose::DataEncipherment,
                KeyUsagePurpose::KeyAgreement,
            ];
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem: sec1_pem(&key),
        })
    }

    /// Writes `ca.pem` and `ca-key.pem` (0600) into `dir`. The CA key stays
    /// PKCS#8: only leaf keys need Consul's SEC 1 shape, and ring (behind
    /// rcgen) loads signing keys from PKCS#8 only.
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        write_file(&dir.join("ca.pem"), self.cert_pem.as_bytes(), 0o644)?;
        write_file(
            &dir.join("ca-key.pem"),
            self.issuer.key().serialize_pem().as_bytes(),
            0o600,
        )
    }
}

/// Writes `<service>.pem` and `<service>-key.pem` (0600) into `dir`.
pub fn write_leaf(dir: &Path, service: &str, leaf: &Leaf) -> Result<(), CertError> {
    write_file(
        &dir.join(format!("{service}.pem")),
        leaf.cert_pem.as_bytes(),
        0o644,
    )?;
    write_file(
        &dir.join(format!("{service}-key.pem")),
        leaf.key_pem.as_bytes(),
        0o600,
    )
}

/// What [`ensure_dir`] did.
#[derive(Debug)]
pub struct Issued {
    /// The trust domain of the CA in the directory.
    pub trust_domain: String,
    /// True when the CA was created now rather than reused.
    pub created_ca: bool,
    /// The leaf files written, one per service.
    pub leaves: Vec<PathBuf>,
}

/// `ferry certs`: reuse the CA in `dir` (or create one for `trust_domain`, a
/// random one if `None`), then issue a fresh leaf per service.
pub fn ensure_dir(
    dir: &Path,
    trust_domain: Option<&str>,
    dc: &str,
    ttl: Duration,
    services: &[String],
) -> Result<Issued, CertError> {
    // Check every name before writing anything: a typo must not leave a
    // fresh CA behind.
    check_name(dc).map_err(|_| CertError::BadDatacenter(dc.into()))?;
    for svc in services {
        check_name(svc).map_err(|_| CertError::BadServiceName(svc.clone()))?;
    }
    if let Some(td) = trust_domain {
        check_trust_domain(td)?;
    }
    let io = |e| CertError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    fs::create_dir_all(dir).map_err(io)?;
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let (ca, created_ca) = if ca_cert.exists() {
        let ca = DevCa::load(&ca_cert, &ca_key)?;
        if let Some(td) = trust_domain {
            if !td.eq_ignore_ascii_case(ca.trust_domain()) {
                return Err(CertError::BadCa {
                    path: ca_cert,
                    why: format!(
                        "existing CA is for trust domain {}, not {td}; remove the directory's ca*.pem to start over",
                        ca.trust_domain()
                    ),
                });
            }
        }
        (ca, false)
    } else {
        let td = match trust_domain {
            Some(td) => td.to_string(),
            None => random_trust_domain(),
        };
        let ca = DevCa::generate(&td)?;
        ca.write(dir)?;
        (ca, true)
    };
    let mut leaves = Vec::new();
    for svc in services {
        let leaf = ca.leaf(svc, dc, ttl)?;
        write_leaf(dir, svc, &leaf)?;
        leaves.push(dir.join(format!("{svc}.pem")));
    }
    Ok(Issued {
        trust_domain: ca.trust_domain().to_string(),
        created_ca,
        leaves,
    })
}

/// A fresh `<uuid-v4>.consul` trust domain, as Consul makes at CA bootstrap.
pub fn random_trust_domain() -> String {
    let mut b = [0u8; 16];
    fill_random(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}.consul",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn fill_random(buf: &mut [u8]) {
    // The ring provider's CSPRNG; failing to read the OS RNG is not recoverable.
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(buf)
        .expect("the operating system's random number generator failed");
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 8];
    fill_random(&mut b);
    b[0] &= 0x7f; // positive, and never the all-zero serial
    b[0] |= 0x01;
    SerialNumber::from_slice(&b)
}

fn uri_san(uri: &str) -> Result<SanType, CertError> {
    Ok(SanType::URI(uri.try_into()?))
}

fn check_trust_domain(td: &str) -> Result<(), CertError> {
    let ok = td.ends_with(".consul")
        && td.len() > ".consul".len()
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(CertError::BadTrustDomain(td.to_string()))
    }
}

fn check_name(s: &str) -> Result<(), ()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(())
    }
}

/// The trust domain a CA certificate signs for: its `spiffe://<td>` URI SAN.
fn ca_trust_domain(der: &[u8]) -> Result<String, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("CA certificate has no URI SAN naming its trust domain")?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => u
                .strip_prefix("spiffe://")
                .filter(|td| !td.is_empty() && !td.contains('/'))
                .map(str::to_string),
            _ => None,
        })
        .ok_or_else(|| "CA certificate has no spiffe://<trust-domain> URI SAN".into())
}

fn pem_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

/// Re-encodes a P-256 key as SEC 1 `EC PRIVATE KEY` with the curve named, the
/// shape Consul's agent returns and `openssl ec` writes. rcgen only emits
/// PKCS#8; for P-256 that wraps a SEC 1 structure without the curve
/// parameters, at fixed offsets. If the layout is ever not the one expected,
/// we keep the PKCS#8 form, which every loader (ours included) also accepts.
fn sec1_pem(key: &KeyPair) -> String {
    const PKCS8_PREFIX: [u8; 36] = [
        0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d,
        0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30,
        0x6b, 0x02, 0x01, 0x01, 0x04, 0x20,
    ];
    const PUB_PREFIX: [u8; 5] = [0xa1, 0x44, 0x03, 0x42, 0x00];
    let der = key.serialize_der();
    if der.len() != 138 || der[..36] != PKCS8_PREFIX || der[68..73] != PUB_PREFIX {
        return key.serialize_pem();
    }
    let (private, public) = (&der[36..68], &der[73..138]);
    let mut sec1 = vec![0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20];
    sec1.extend_from_slice(private);
    // [0] namedCurve prime256v1
    sec1.extend_from_slice(&[
        0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ]);
    sec1.extend_from_slice(&PUB_PREFIX);
    sec1.extend_from_slice(public);
    pem_encode("EC PRIVATE KEY", &sec1)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, &b| (acc << 8) | b as u32) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|e| CertError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Writes through a temporary file and a rename, so a reader never sees half a
/// key, with the mode set at creation so a key is never world-readable.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let io = |e| CertError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    // create_new honours the umask; make the mode exact.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::peer_identity;

    #[test]
    fn leaf_has_consul_profile() {
        let ca = DevCa::generate("0f0e0d0c-1111-4222-8333-444455556666.consul").unwrap();
        let leaf = ca.leaf("web", "dc1", Duration::from_secs(3600)).unwrap();
        assert!(leaf.key_pem.starts_with("-----BEGIN EC PRIVATE KEY-----"));
        let der = pem_der(&leaf.cert_pem).unwrap();
        let id = peer_identity(&der).unwrap();
        assert_eq!(id.id.service, "web");
        assert_eq!(id.id.datacenter, "dc1");
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(
            cert.subject().iter().next().is_none(),
            "subject must be empty"
        );
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "SAN is critical when the subject is empty");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth);
    }

    #[test]
    fn sec1_key_loads_back() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = sec1_pem(&key);
        use rustls::pki_types::pem::PemObject;
        let parsed = rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert!(matches!(parsed, rustls::pki_types::PrivateKeyDer::Sec1(_)));
        rustls::crypto::ring::sign::any_ecdsa_type(&parsed).expect("ring accepts the SEC1 key");
    }

    #[test]
    fn dir_reuses_ca_and_protects_keys() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_dir(
            dir.path(),
            None,
            "dc1",
            Duration::from_secs(60),
            &["a".into()],
        )
        .unwrap();
        assert!(first.created_ca);
        let again = ensure_dir(
            dir.path(),
            None,
            "dc1",
            Duration::from_secs(60),
            &["b".into()],
        )
        .unwrap();
        assert!(!again.created_ca);
        assert_eq!(first.trust_domain, again.trust_domain);
        for f in ["ca-key.pem", "a-key.pem", "b-key.pem"] {
            let mode = fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let err = ensure_dir(
            dir.path(),
            Some("other.consul"),
            "dc1",
            Duration::from_secs(60),
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("existing CA is for trust domain"),
            "{err}"
        );
    }

    #[test]
    fn refuses_bad_names() {
        assert!(DevCa::generate("Not A Domain").is_err());
        let ca = DevCa::generate("abc.consul").unwrap();
        assert!(ca.leaf("we/b", "dc1", Duration::from_secs(60)).is_err());
        assert!(ca.leaf("web", "", Duration::from_secs(60)).is_err());
    }

    #[test]
    fn random_trust_domains_are_uuid_shaped() {
        let td = random_trust_domain();
        assert_eq!(td.len(), 36 + ".consul".len());
        assert!(check_trust_domain(&td).is_ok());
        assert_ne!(td, random_trust_domain());
    }
}
