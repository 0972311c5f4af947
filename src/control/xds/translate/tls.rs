//! TLS contexts as ferry can use them: the transport socket's typed
//! config, inline data, exact SAN matchers, and where the certificates
//! come from (inline, or SDS `connect-leaf`/`connect-root`).

use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource, TransportSocket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, CertificateValidationContext, CommonTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use prost::Message;

use super::{decode, refuse, Certs, Refused};

pub(super) fn transport<M: Message + Default>(
    ts: &TransportSocket,
    want: &str,
    what: &str,
) -> Result<M, Refused> {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    match &ts.config_type {
        Some(ConfigType::TypedConfig(tc)) => decode(tc, want, &format!("{what} transport_socket")),
        None => refuse(what, "transport_socket without typed_config"),
    }
}

pub(super) fn inline(d: &Option<DataSource>, what: &str) -> Result<String, Refused> {
    match d.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::InlineString(s)) => Ok(s.clone()),
        Some(data_source::Specifier::InlineBytes(b)) => {
            String::from_utf8(b.clone()).or_else(|_| refuse(what, "inline_bytes is not PEM text"))
        }
        Some(data_source::Specifier::Filename(_)) => refuse(
            what,
            "certificate files are not supported (inline or SDS only)",
        ),
        _ => refuse(what, "missing"),
    }
}

/// The exact SAN URIs a validation context accepts (any one of them).
pub(super) fn san_matchers(
    v: &CertificateValidationContext,
    what: &str,
) -> Result<Vec<String>, Refused> {
    let mut sans = Vec::new();
    // Deprecated in Envoy, but what released Consul sends.
    #[allow(deprecated)]
    let legacy = &v.match_subject_alt_names;
    for m in legacy {
        match &m.match_pattern {
            Some(string_matcher::MatchPattern::Exact(s)) if !m.ignore_case => sans.push(s.clone()),
            _ => return refuse(what, "only exact SAN matchers are supported"),
        }
    }
    for m in &v.match_typed_subject_alt_names {
        match m.matcher.as_ref().and_then(|m| m.match_pattern.as_ref()) {
            Some(string_matcher::MatchPattern::Exact(s)) => sans.push(s.clone()),
            _ => return refuse(what, "only exact SAN matchers are supported"),
        }
    }
    Ok(sans)
}

pub(super) fn certs(c: &CommonTlsContext, what: &str) -> Result<Certs, Refused> {
    if let Some(p) = &c.tls_params {
        if !p.cipher_suites.is_empty()
            || p.tls_minimum_protocol_version != 0
            || p.tls_maximum_protocol_version != 0
        {
            return refuse(
                what,
                "tls_params (versions, cipher suites) are not supported",
            );
        }
    }
    match (
        &c.tls_certificates[..],
        &c.tls_certificate_sds_secret_configs[..],
        &c.validation_context_type,
    ) {
        ([cert], [], Some(common_tls_context::ValidationContextType::ValidationContext(v))) => {
            Ok(Certs::Inline {
                chain: inline(
                    &cert.certificate_chain,
                    &format!("{what} certificate_chain"),
                )?,
                key: inline(&cert.private_key, &format!("{what} private_key"))?,
                roots: inline(&v.trusted_ca, &format!("{what} trusted_ca"))?,
            })
        }
        (
            [],
            [leaf],
            Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(r)),
        ) => Ok(Certs::Sds {
            leaf: leaf.name.clone(),
            roots: r.name.clone(),
        }),
        // The one shape with both SDS roots and SAN matchers: the roots
        // from the secret, the matchers (read by the caller) from the
        // default context, which must not bring roots of its own.
        (
            [],
            [leaf],
            Some(common_tls_context::ValidationContextType::CombinedValidationContext(cv)),
        ) => match (
            &cv.validation_context_sds_secret_config,
            &cv.default_validation_context,
        ) {
            (Some(_), Some(d)) if d.trusted_ca.is_some() => refuse(
                what,
                "a combined validation context with roots of its own besides the SDS secret's",
            ),
            (Some(r), _) => Ok(Certs::Sds {
                leaf: leaf.name.clone(),
                roots: r.name.clone(),
            }),
            (None, _) => refuse(what, "a combined validation context without its SDS secret"),
        },
        _ => refuse(
            what,
            "expected one inline certificate with inline roots, or SDS leaf and roots",
        ),
    }
}
