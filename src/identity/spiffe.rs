//! Service identities: SPIFFE IDs as Consul writes them, and reading them out
//! of peer certificates.
//!
//! Consul names a service `spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<name>`,
//! with an `/ap/<partition>` prefix when the partition is not `default`
//! (spec §2.1). A Consul leaf carries exactly one URI SAN and an empty subject,
//! so the URI SAN is the only name we ever read; the CN is never consulted.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a SPIFFE ID or a peer certificate does not name a service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The URI is not a SPIFFE service ID of the Consul shape.
    #[error("{uri:?} is not a Consul service SPIFFE ID: {why}")]
    NotServiceId { uri: String, why: &'static str },
    /// The certificate could not be parsed as X.509.
    #[error("certificate is not valid X.509: {0}")]
    BadCertificate(String),
    /// The certificate has no URI SAN at all.
    #[error("certificate has no URI SAN (not a mesh identity)")]
    NoUriSan,
    /// More than one URI SAN: Consul never issues that, so we refuse to guess.
    #[error("certificate has {0} URI SANs; a mesh identity has exactly one")]
    ManyUriSans(usize),
    /// A valid service ID, but minted for a different mesh.
    #[error("identity {id} is from trust domain {found:?}, expected {expected:?}")]
    ForeignTrustDomain {
        id: String,
        found: String,
        expected: String,
    },
}

/// A Consul service identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// `<cluster-uuid>.consul`, always lower case.
    pub trust_domain: String,
    /// Admin partition; `default` when the URI has no `/ap/` segment.
    pub partition: String,
    /// Namespace; `default` on Consul CE.
    pub namespace: String,
    /// Datacenter of the agent that requested the certificate.
    pub datacenter: String,
    /// Service name.
    pub service: String,
}

impl SpiffeId {
    /// A service ID in the default partition and namespace.
    pub fn service(trust_domain: &str, datacenter: &str, service: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.to_ascii_lowercase(),
            partition: "default".into(),
            namespace: "default".into(),
            datacenter: datacenter.into(),
            service: service.into(),
        }
    }

    /// Parses a service SPIFFE ID. Segments may be percent-encoded, as Consul's
    /// parser allows; any other shape (agent, gateway, signing IDs) is refused.
    ///
    /// ```
    /// use ferry::identity::SpiffeId;
    /// let id = SpiffeId::parse("spiffe://1234.consul/ns/default/dc/dc1/svc/web").unwrap();
    /// assert_eq!((id.service.as_str(), id.datacenter.as_str()), ("web", "dc1"));
    /// assert_eq!(id.sni(), "web.default.dc1.internal.1234.consul");
    /// assert!(SpiffeId::parse("spiffe://1234.consul/agent/client/dc/dc1/id/n1").is_err());
    /// ```
    pub fn parse(uri: &str) -> Result<SpiffeId, IdentityError> {
        let bad = |why| IdentityError::NotServiceId {
            uri: uri.to_string(),
            why,
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("scheme is not spiffe://"))?;
        let (host, path) = rest.split_once('/').ok_or_else(|| bad("no path"))?;
        if host.is_empty() {
            return Err(bad("empty trust domain"));
        }
        if host.contains(['@', ':', '?', '#']) {
            return Err(bad("trust domain has a user, port, query or fragment"));
        }
        if path.contains(['?', '#']) {
            return Err(bad("query or fragment in path"));
        }
        let segs: Vec<&str> = path.split('/').collect();
        let (partition, segs) = match segs.as_slice() {
            ["ap", p, rest @ ..] => (Some(*p), rest),
            all => (None, all),
        };
        let ["ns", ns, "dc", dc, "svc", svc] = segs else {
            return Err(bad("path is not /ns/<ns>/dc/<dc>/svc/<service>"));
        };
        let decode = |s: &str| percent_decode(s).ok_or_else(|| bad("bad percent-encoding"));
        let id = SpiffeId {
            trust_domain: host.to_ascii_lowercase(),
            partition: match partition {
                Some(p) => decode(p)?,
                None => "default".into(),
            },
            namespace: decode(ns)?,
            datacenter: decode(dc)?,
            service: decode(svc)?,
        };
        if [&id.partition, &id.namespace, &id.datacenter, &id.service]
            .iter()
            .any(|s| s.is_empty())
        {
            return Err(bad("empty segment"));
        }
        // A segment that decodes to a URI delimiter, a space or a control
        // character names nothing Consul would issue, and would not print
        // back to the same ID: refuse it rather than guess.
        let plain = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'?' | b'#' | b'%'))
        };
        if ![
            &id.trust_domain,
            &id.partition,
            &id.namespace,
            &id.datacenter,
            &id.service,
        ]
        .iter()
        .all(|s| plain(s))
        {
            return Err(bad(
                "a segment holds a delimiter, space or control character",
            ));
        }
        Ok(id)
    }

    /// Fails unless this ID belongs to `trust_domain` (compared case-insensitively).
    ///
    /// Consul's Go proxy ignores the trust domain; Envoy pins it. We pin it, as
    /// Envoy does: a certificate from another mesh must never be accepted on
    /// the strength of its path alone.
    pub fn require_trust_domain(&self, trust_domain: &str) -> Result<(), IdentityError> {
        if self.trust_domain.eq_ignore_ascii_case(trust_domain) {
            Ok(())
        } else {
            Err(IdentityError::ForeignTrustDomain {
                id: self.to_string(),
                found: self.trust_domain.clone(),
                expected: trust_domain.to_ascii_lowercase(),
            })
        }
    }

    /// The SNI Envoy sends to reach this service (spec §2.7):
    /// `<svc>.<ns>.<dc>.internal.<td>` in the default partition,
    /// `<svc>.<ns>.<ap>.<dc>.internal-v1.<td>` otherwise.
    pub fn sni(&self) -> String {
        if self.partition == "default" {
            format!(
                "{}.{}.{}.internal.{}",
                self.service, self.namespace, self.datacenter, self.trust_domain
            )
        } else {
            format!(
                "{}.{}.{}.{}.internal-v1.{}",
                self.service, self.namespace, self.partition, self.datacenter, self.trust_domain
            )
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.trust_domain)?;
        if self.partition != "default" {
            write!(f, "/ap/{}", self.partition)?;
        }
        write!(
            f,
            "/ns/{}/dc/{}/svc/{}",
            self.namespace, self.datacenter, self.service
        )
    }
}

fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What a peer certificate says about who the peer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The service the certificate names.
    pub id: SpiffeId,
    /// Serial in Consul's format (see [`colon_hex`]), for logs and the
    /// agent's authorize call.
    pub serial: String,
}

/// Reads the SPIFFE service identity from a DER certificate: exactly one URI
/// SAN, which must parse as a service ID. Chain validation is not done here;
/// the TLS verifier has already done it by the time this is called.
pub fn peer_identity(cert_der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let mut uris = san.iter().flat_map(|ext| {
        ext.value.general_names.iter().filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
    });
    let first = uris.next().ok_or(IdentityError::NoUriSan)?;
    let more = uris.count();
    if more > 0 {
        return Err(IdentityError::ManyUriSans(more + 1));
    }
    Ok(PeerIdentity {
        id: SpiffeId::parse(first)?,
        serial: colon_hex(cert.raw_serial()),
    })
}

/// Consul's serial format: lower-case hex of the minimal big-endian bytes,
/// colon separated (`8` -> `08`, `0x01154b` -> `01:15:4b`). DER integers may
/// carry a leading zero byte to stay positive; Consul's encoding drops it.
///
/// ```
/// assert_eq!(ferry::identity::colon_hex(&[0x00, 0x01, 0x15, 0x4b]), "01:15:4b");
/// ```
pub fn colon_hex(raw: &[u8]) -> String {
    let trimmed = match raw.iter().position(|&b| b != 0) {
        Some(i) => &raw[i..],
        None => &raw[raw.len().saturating_sub(1)..],
    };
    let mut out = String::with_capacity(trimmed.len() * 3);
    for (i, b) in trimmed.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

    #[test]
    fn parses_and_prints_service_ids() {
        let cases = [
            (
                "default partition",
                format!("spiffe://{TD}/ns/default/dc/dc1/svc/web"),
                "default",
            ),
            (
                "named partition",
                format!("spiffe://{TD}/ap/part1/ns/default/dc/dc1/svc/web"),
                "part1",
            ),
        ];
        for (name, uri, partition) in cases {
            let id = SpiffeId::parse(&uri).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(id.service, "web", "{name}");
            assert_eq!(id.partition, partition, "{name}");
            assert_eq!(id.to_string(), uri, "{name}: round trip");
        }
    }

    #[test]
    fn trust_domain_is_lower_cased_and_segments_decoded() {
        let id = SpiffeId::parse("spiffe://ABC.consul/ns/default/dc/dc%5F1/svc/my%2Dsvc").unwrap();
        assert_eq!(id.trust_domain, "abc.consul");
        assert_eq!(id.datacenter, "dc_1");
        assert_eq!(id.service, "my-svc");
    }

    #[test]
    fn refuses_what_is_not_a_service_id() {
        let cases = [
            ("http scheme", "http://x.consul/ns/default/dc/dc1/svc/web"),
            ("signing id", "spiffe://x.consul"),
            ("agent id", "spiffe://x.consul/agent/client/dc/dc1/id/node1"),
            ("gateway id", "spiffe://x.consul/gateway/mesh/dc/dc1"),
            (
                "extra segment",
                "spiffe://x.consul/ns/default/dc/dc1/svc/web/x",
            ),
            ("empty service", "spiffe://x.consul/ns/default/dc/dc1/svc/"),
            ("empty host", "spiffe:///ns/default/dc/dc1/svc/web"),
            (
                "port in host",
                "spiffe://x.consul:80/ns/default/dc/dc1/svc/web",
            ),
            ("query", "spiffe://x.consul/ns/default/dc/dc1/svc/web?a=b"),
            ("bad escape", "spiffe://x.consul/ns/default/dc/dc1/svc/w%zz"),
            // Found by fuzzing: these decoded to IDs that did not print back.
            (
                "escaped #",
                "spiffe://x.consul/ns/default/dc/dc%5F1/svc/my%23svc",
            ),
            (
                "escaped /",
                "spiffe://x.consul/ns/default/dc/dc%2F1/svc/web",
            ),
            (
                "escaped %",
                "spiffe://x.consul/ns/default/dc/dc1/svc/w%2541",
            ),
            (
                "space in host",
                "spiffe://x .consul/ns/default/dc/dc1/svc/web",
            ),
            (
                "escaped space",
                "spiffe://x.consul/ns/default/dc/dc1/svc/w%20b",
            ),
            ("empty", ""),
        ];
        for (name, uri) in cases {
            assert!(SpiffeId::parse(uri).is_err(), "{name}: {uri} was accepted");
        }
    }

    #[test]
    fn trust_domain_must_match() {
        let id = SpiffeId::service(TD, "dc1", "web");
        assert!(id.require_trust_domain(&TD.to_uppercase()).is_ok());
        let err = id.require_trust_domain("other.consul").unwrap_err();
        assert!(matches!(err, IdentityError::ForeignTrustDomain { .. }));
    }

    #[test]
    fn sni_matches_consul() {
        let id = SpiffeId::service(TD, "dc1", "db");
        assert_eq!(id.sni(), format!("db.default.dc1.internal.{TD}"));
        let mut p = id.clone();
        p.partition = "ap1".into();
        assert_eq!(p.sni(), format!("db.default.ap1.dc1.internal-v1.{TD}"));
    }

    #[test]
    fn serials_use_consul_format() {
        assert_eq!(colon_hex(&[0x08]), "08");
        assert_eq!(colon_hex(&[0x00, 0x81]), "81");
        assert_eq!(colon_hex(&[0x01, 0x15, 0x4b]), "01:15:4b");
        assert_eq!(colon_hex(&[0x00]), "00");
    }
}
