//! The CA endpoints (spec §1.1, §1.2): roots and leaves, their JSON, and
//! what the agent reports about a certificate.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Extension;
use ferry::identity::dev_ca::Leaf;
use serde_json::{json, Value};
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::public_key::PublicKey;

use super::blocking::{Blocking, Params};
use super::encoding::{colon_hex, rfc3339, sha1};
use super::reply::{indexed, refuse, Refusal, Reply};
use super::serve::{Caller, Sh};
use super::state::{AgentState, Cfg, ListedRoot};

/// `GET /v1/agent/connect/ca/roots` (§1.1). No ACL.
pub(super) async fn roots(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Query(q): Query<Params>,
) -> Reply {
    let b = Blocking::parse(&q)?;
    sh.block_on_index(&caller, &b, |s| s.roots_index).await?;
    let s = sh.lock();
    Ok(indexed(s.roots_index, &roots_json(&sh.cfg, &s.roots)))
}

/// `GET /v1/agent/connect/ca/leaf/:service` (§1.2).
pub(super) async fn leaf(
    State(sh): Sh,
    Extension(caller): Extension<Caller>,
    Path(service): Path<String>,
    Query(q): Query<Params>,
) -> Reply {
    let b = Blocking::parse(&q)?;
    sh.acl(&caller, "service:write", Some(&service))?;
    sh.change(|s| ensure_leaf(&sh.cfg, s, &service))?;
    sh.block_on_index(&caller, &b, |s| s.leaf_index(&service))
        .await?;
    let s = sh.lock();
    let (leaf, index) = &s.leaves[&service];
    Ok(indexed(*index, &leaf_json(&sh.cfg, &service, leaf, *index)))
}

/// Makes sure `service` has a leaf: the one set, or one from the CA.
fn ensure_leaf(cfg: &Cfg, s: &mut AgentState, service: &str) -> Result<(), Refusal> {
    if s.leaves.contains_key(service) {
        return Ok(());
    }
    let error = |msg: String| refuse(StatusCode::INTERNAL_SERVER_ERROR, msg);
    if cfg.trust_domain.is_empty() || s.roots.is_empty() {
        return Err(error("cluster has no CA bootstrapped yet".into()));
    }
    let Some(ca) = &s.issuer else {
        return Err(error(format!(
            "fake agent: no leaf for service {service:?} (set_leaf, or start with AgentOpts::for_pki)"
        )));
    };
    let leaf = ca
        .leaf(service, &cfg.datacenter, Duration::from_secs(3600))
        .map_err(|e| error(e.to_string()))?;
    let index = s.bump();
    s.leaves.insert(service.into(), (leaf, index));
    Ok(())
}

fn roots_json(cfg: &Cfg, roots: &[ListedRoot]) -> Value {
    let cluster = cfg
        .trust_domain
        .strip_suffix(".consul")
        .unwrap_or(&cfg.trust_domain);
    let listed: Vec<Value> = roots.iter().map(|r| root_json(r, cluster)).collect();
    let active = listed
        .iter()
        .find(|r| r["Active"] == true)
        .map_or(json!(""), |r| r["ID"].clone());
    json!({ "ActiveRootID": active, "TrustDomain": cfg.trust_domain, "Roots": listed })
}

fn root_json(listed: &ListedRoot, cluster: &str) -> Value {
    let root = &listed.root;
    let facts = CertFacts::of(&root.cert_pem);
    // The key that signs leaves: the last intermediate's, else the root's.
    let signer = root.intermediates.last().map(|p| CertFacts::of(p));
    let signing_key = signer.as_ref().unwrap_or(&facts).key_id.clone();
    let serial = facts
        .serial
        .iter()
        .rev()
        .take(8)
        .rev()
        .fold(0u64, |acc, b| acc << 8 | u64::from(*b));
    let mut pem = root.cert_pem.clone();
    if !pem.ends_with('\n') {
        pem.push('\n');
    }
    let intermediates = if root.intermediates.is_empty() {
        Value::Null
    } else {
        json!(root.intermediates)
    };
    json!({
        "ID": colon_hex(&sha1(&facts.der)),
        "Name": "Consul CA Primary Cert",
        "SerialNumber": serial,
        "SigningKeyID": colon_hex(&signing_key),
        "ExternalTrustDomain": cluster,
        "NotBefore": rfc3339(facts.not_before),
        "NotAfter": rfc3339(facts.not_after),
        "RootCert": pem,
        "IntermediateCerts": intermediates,
        "Active": root.active,
        "PrivateKeyType": facts.key_type,
        "PrivateKeyBits": facts.key_bits,
        "CreateIndex": listed.create_index,
        "ModifyIndex": listed.create_index,
    })
}

fn leaf_json(cfg: &Cfg, service: &str, leaf: &Leaf, index: u64) -> Value {
    let facts = CertFacts::of(&leaf.cert_pem);
    let uri = facts.uri.clone().unwrap_or_else(|| {
        format!(
            "spiffe://{}/ns/default/dc/{}/svc/{service}",
            cfg.trust_domain, cfg.datacenter
        )
    });
    json!({
        "SerialNumber": colon_hex(&facts.serial),
        "CertPEM": leaf.cert_pem,
        "PrivateKeyPEM": leaf.key_pem,
        "Service": service,
        "ServiceURI": uri,
        "ValidAfter": rfc3339(facts.not_before),
        "ValidBefore": rfc3339(facts.not_after),
        "CreateIndex": index,
        "ModifyIndex": index,
    })
}

/// What the agent reports about a certificate; defaults if it does not parse
/// (tests may hand out garbage on purpose).
struct CertFacts {
    der: Vec<u8>,
    /// Minimal big-endian bytes, as Go's `big.Int.Bytes()`.
    serial: Vec<u8>,
    uri: Option<String>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    key_id: Vec<u8>,
    key_type: &'static str,
    key_bits: usize,
}

impl CertFacts {
    fn of(pem: &str) -> CertFacts {
        CertFacts::parse(pem).unwrap_or_else(|| CertFacts {
            der: pem.as_bytes().to_vec(),
            serial: Vec::new(),
            uri: None,
            not_before: OffsetDateTime::now_utc(),
            not_after: OffsetDateTime::now_utc(),
            key_id: Vec::new(),
            key_type: "ec",
            key_bits: 256,
        })
    }

    fn parse(pem: &str) -> Option<CertFacts> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
        let cert = pem.parse_x509().ok()?;
        let san = cert.subject_alternative_name().ok().flatten();
        let uri = san.and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
        });
        let key_id = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            });
        let (key_type, key_bits) = match cert.public_key().parsed() {
            Ok(PublicKey::RSA(k)) => ("rsa", k.key_size()),
            Ok(PublicKey::EC(k)) => ("ec", k.key_size()),
            _ => ("ec", 256),
        };
        let serial = cert.raw_serial();
        let first = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
        Some(CertFacts {
            der: pem.contents.clone(),
            serial: serial[first..].to_vec(),
            uri,
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            key_id: key_id.unwrap_or_default(),
            key_type,
            key_bits,
        })
    }
}
