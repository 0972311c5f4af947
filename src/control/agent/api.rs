//! Every request and response body of the agent's HTTP API that ferry
//! reads or writes (spec §1), as typed values. Decoding is lenient where Go
//! is: unknown fields are ignored, `null` slices and maps become empty.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A blocking query's position: `index` 0 means "answer at once".
#[derive(Debug, Clone, Copy)]
pub struct Blocking {
    /// The last `X-Consul-Index` seen (0: none yet).
    pub index: u64,
    /// How long the agent may hold the call.
    pub wait: Duration,
}

/// A decoded answer and its `X-Consul-Index`.
#[derive(Debug, Clone)]
pub struct Reply<T> {
    pub value: T,
    /// The blocking index; 0 if the agent sent none.
    pub index: u64,
}

/// `GET /v1/agent/connect/ca/roots` (spec §1.1).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CaRoots {
    #[serde(default, rename = "ActiveRootID")]
    pub active_root_id: String,
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub roots: Vec<CaRoot>,
}

/// One root of [`CaRoots`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CaRoot {
    #[serde(default, rename = "ID")]
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub root_cert: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub intermediate_certs: Vec<String>,
    #[serde(default)]
    pub active: bool,
}

/// `GET /v1/agent/connect/ca/leaf/<service>` (spec §1.2).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IssuedCert {
    #[serde(default)]
    pub serial_number: String,
    /// Leaf followed by the active root's intermediates.
    #[serde(rename = "CertPEM")]
    pub cert_pem: String,
    #[serde(rename = "PrivateKeyPEM")]
    pub private_key_pem: String,
    #[serde(default)]
    pub service: String,
    #[serde(default, rename = "ServiceURI")]
    pub service_uri: String,
    #[serde(default)]
    pub valid_before: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial_number", &self.serial_number)
            .field("service_uri", &self.service_uri)
            .field("valid_before", &self.valid_before)
            .field("private_key_pem", &"<redacted>")
            .finish()
    }
}

/// A TTL check's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    Passing,
    Warning,
    Critical,
}

/// The body of `POST /v1/agent/connect/authorize` (spec §1.3). The agent
/// rejects unknown fields, so this has exactly the CE ones.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AuthorizeRequest<'a> {
    pub target: &'a str,
    #[serde(rename = "ClientCertURI")]
    pub client_cert_uri: &'a str,
    pub client_cert_serial: &'a str,
}

/// The agent's intention decision.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Authorization {
    pub authorized: bool,
    #[serde(default)]
    pub reason: String,
}

/// One entry of `GET /v1/health/connect/<service>` (spec §1.4).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceEntry {
    pub node: Node,
    pub service: EntryService,
}

/// The node part of a [`ServiceEntry`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub datacenter: String,
}

/// The service part of a [`ServiceEntry`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EntryService {
    #[serde(default, rename = "ID")]
    pub id: String,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub port: u16,
}

impl ServiceEntry {
    /// Where to dial: `Service.Address`, or `Node.Address` when empty.
    pub fn dial_host(&self) -> &str {
        if self.service.address.is_empty() {
            &self.node.address
        } else {
            &self.service.address
        }
    }
}

/// `GET /v1/query/<name>/execute` (spec §1.6).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct QueryResult {
    #[serde(default, deserialize_with = "null_as_default")]
    pub nodes: Vec<ServiceEntry>,
}

/// Decodes a JSON `null` as the type's default (Go marshals nil slices
/// and maps as `null`).
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A local agent service, as `/v1/agent/service/<id>` and
/// `/v1/agent/services` return it (the fields ferry reads).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentService {
    #[serde(default)]
    pub kind: String,
    #[serde(default, rename = "ID")]
    pub id: String,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub proxy: Option<AgentProxy>,
}

/// The `Proxy` block of a `connect-proxy` registration.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentProxy {
    pub destination_service_name: String,
    #[serde(rename = "DestinationServiceID")]
    pub destination_service_id: String,
    pub local_service_address: String,
    pub local_service_port: u16,
    pub local_service_socket_path: String,
    #[serde(deserialize_with = "null_as_default")]
    pub config: HashMap<String, Value>,
    #[serde(deserialize_with = "null_as_default")]
    pub upstreams: Vec<AgentUpstream>,
    #[serde(deserialize_with = "null_as_default")]
    pub expose: AgentExpose,
}

/// `Proxy.Expose`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentExpose {
    /// Expose every HTTP check of the destination service.
    pub checks: bool,
    #[serde(deserialize_with = "null_as_default")]
    pub paths: Vec<AgentExposePath>,
}

/// One `Proxy.Expose.Paths[]` entry.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentExposePath {
    pub listener_port: u16,
    pub path: String,
    pub local_path_port: u16,
    pub protocol: String,
    pub parsed_from_check: bool,
}

/// One entry of `Proxy.Upstreams`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentUpstream {
    pub destination_type: String,
    pub destination_name: String,
    pub datacenter: String,
    pub local_bind_address: String,
    pub local_bind_port: u16,
    pub local_bind_socket_path: String,
    /// Octal file mode for the socket, e.g. `"0700"`.
    pub local_bind_socket_mode: String,
    #[serde(deserialize_with = "null_as_default")]
    pub config: HashMap<String, Value>,
}

/// The body of `PUT /v1/agent/service/register` for `-register` (spec §1.8).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RegisterBody<'a> {
    pub kind: &'static str,
    #[serde(rename = "ID")]
    pub id: &'a str,
    pub name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub port: u16,
    pub proxy: ProxyBody<'a>,
    pub check: CheckBody<'a>,
}

/// Its `Proxy` block.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProxyBody<'a> {
    pub destination_service_name: &'a str,
}

/// Its TTL check.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckBody<'a> {
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: &'static str,
    #[serde(rename = "TTL")]
    pub ttl: String,
    pub notes: &'a str,
    pub status: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_consul_shapes_leniently() {
        let roots: CaRoots = serde_json::from_str(
            r#"{"ActiveRootID":"a","TrustDomain":"x.consul","Roots":[{"ID":"a","Name":"n","RootCert":"PEM","IntermediateCerts":null,"Active":true,"Extra":1}]}"#,
        )
        .unwrap();
        assert_eq!(roots.roots.len(), 1);
        assert!(
            roots.roots[0].intermediate_certs.is_empty(),
            "null intermediates"
        );
        let empty: CaRoots = serde_json::from_str(r#"{"Roots":null}"#).unwrap();
        assert!(empty.roots.is_empty());

        let entries: Vec<ServiceEntry> = serde_json::from_str(
            r#"[{"Node":{"Address":"10.0.0.1","Datacenter":"dc1"},"Service":{"ID":"s1","Service":"api-sidecar-proxy","Address":"","Port":21000},"Checks":[]}]"#,
        )
        .unwrap();
        assert_eq!(
            entries[0].dial_host(),
            "10.0.0.1",
            "empty Service.Address falls back to the node"
        );
    }

    #[test]
    fn authorize_body_has_exactly_the_ce_fields() {
        let body = serde_json::to_value(AuthorizeRequest {
            target: "api",
            client_cert_uri: "spiffe://x.consul/ns/default/dc/dc1/svc/web",
            client_cert_serial: "01:02",
        })
        .unwrap();
        let keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(keys, ["ClientCertSerial", "ClientCertURI", "Target"]);
    }

    #[test]
    fn issued_cert_debug_hides_the_key() {
        let c = IssuedCert {
            serial_number: "01".into(),
            cert_pem: "C".into(),
            private_key_pem: "SECRET".into(),
            service: "web".into(),
            service_uri: "u".into(),
            valid_before: "".into(),
        };
        assert!(!format!("{c:?}").contains("SECRET"));
    }
}
