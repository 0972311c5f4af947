//! The Consul agent's HTTP API, as ferry uses it. This is the only module
//! that knows URLs, headers and JSON shapes (spec §1); everything else sees
//! typed values.
//!
//! Conventions followed (spec §1.0): the token goes in `X-Consul-Token`;
//! blocking calls send `index` and an explicit `wait`, and get an HTTP
//! timeout above `wait + wait/16` (the agent adds up to wait/16 of jitter);
//! `dc` is sent only when configured; `ns`/`partition` never (Consul CE
//! answers them with 400). Error bodies are plain text and are kept, cut
//! short, in the error.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::agent::{AgentAddr, AgentConfig, AgentTls, Token};
use crate::metrics::{EndpointLabel, Metrics};

/// Extra time beyond `wait + wait/16` before a blocking call is abandoned.
const BLOCKING_SLACK: Duration = Duration::from_secs(5);
/// The largest agent reply ferry reads: far above a health answer for
/// thousands of instances, far below what could hurt a sidecar.
const MAX_BODY: usize = 64 << 20;
/// Idle connections kept open to the agent.
const MAX_IDLE_AGENT_CONNS: usize = 8;
/// Timeout for calls that do not block.
const PLAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Could not set up the HTTP client (TLS files, addresses).
    #[error("agent client setup: {0}")]
    Setup(String),
    /// Connection refused, reset, DNS, TLS: the agent is not answering.
    #[error("{endpoint}: agent unreachable: {why}")]
    Unreachable { endpoint: String, why: String },
    /// No complete answer within the timeout.
    #[error("{endpoint}: agent did not answer within {0:?}", .timeout)]
    Timeout { endpoint: String, timeout: Duration },
    /// A non-2xx answer. `body` is Consul's plain-text reason, cut short.
    #[error("{endpoint}: HTTP {status}: {body}")]
    Status {
        endpoint: String,
        status: u16,
        body: String,
    },
    /// A 2xx answer we could not decode.
    #[error("{endpoint}: malformed reply: {why}")]
    Malformed { endpoint: String, why: String },
}

impl AgentError {
    /// A short, stable description of the kind of failure, for "log once
    /// per change of state" (a different body text is not a new state).
    pub fn kind(&self) -> String {
        match self {
            AgentError::Setup(_) => "setup".into(),
            AgentError::Unreachable { .. } => "unreachable".into(),
            AgentError::Timeout { .. } => "timeout".into(),
            AgentError::Status { status, .. } => format!("HTTP {status}"),
            AgentError::Malformed { .. } => "malformed".into(),
        }
    }

    /// The HTTP status, if the agent answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            AgentError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// For a 403: the permission Consul said was missing, e.g.
    /// `service:write on "web"` from `... lacks permission 'service:write' on "web"`.
    pub fn missing_permission(&self) -> Option<String> {
        let AgentError::Status {
            status: 403, body, ..
        } = self
        else {
            return None;
        };
        let rest = body.split("lacks permission '").nth(1)?;
        let (perm, tail) = rest.split_once('\'')?;
        // `on "web"`, possibly followed by more prose (Consul explains the
        // anonymous token after it): keep the quoted resource only.
        let on = tail
            .trim_start()
            .strip_prefix("on \"")
            .and_then(|r| r.split_once('"'))
            .map(|(res, _)| res);
        Some(match on {
            Some(res) => format!("{perm} on \"{res}\""),
            None => perm.to_string(),
        })
    }
}

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

/// The agent client. Cheap to clone; one connection pool underneath.
#[derive(Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    /// `scheme://authority[/prefix]`, no trailing slash.
    base: Arc<str>,
    token: Option<Token>,
    datacenter: Option<String>,
    /// Counts failed requests per endpoint, when set.
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("base", &self.base)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Builds a client for `config`. Reads TLS files now, so a bad
    /// `-ca-file` is reported at startup.
    pub fn new(config: &AgentConfig) -> Result<AgentClient, AgentError> {
        // reqwest (built without a bundled provider) asks rustls for the
        // process default even for plain http; make it ring, like the rest of
        // ferry. Already installed is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(60))
            // Authorize calls for a burst of inbound connections open as many
            // agent connections at once; keep only a few of them idle.
            .pool_max_idle_per_host(MAX_IDLE_AGENT_CONNS)
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")));
        let base = match &config.addr {
            AgentAddr::Http {
                scheme,
                authority,
                prefix,
            } => {
                if scheme == "https" {
                    builder = builder.use_preconfigured_tls(agent_tls(&config.tls)?);
                }
                format!("{scheme}://{authority}{}", prefix.trim_end_matches('/'))
            }
            AgentAddr::Unix { path } => {
                builder = builder.unix_socket(path.clone());
                // The host is not used to connect; it is what the agent sees.
                "http://localhost".to_string()
            }
        };
        let http = builder
            .build()
            .map_err(|e| AgentError::Setup(e.to_string()))?;
        Ok(AgentClient {
            http,
            base: base.into(),
            token: config.token.clone(),
            datacenter: config.datacenter.clone(),
            metrics: None,
        })
    }

    /// Counts failed requests in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> AgentClient {
        self.metrics = Some(metrics);
        self
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t.secret());
        }
        req
    }

    async fn send(
        &self,
        endpoint: &str,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<(reqwest::header::HeaderMap, bytes_body::Body), AgentError> {
        let fut = async {
            let resp = req.send().await.map_err(|e| AgentError::Unreachable {
                endpoint: endpoint.to_string(),
                why: error_chain(&e),
            })?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let mut resp = resp;
            // Read in chunks under a cap: a broken or hostile agent must not
            // make ferry buffer without bound.
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| AgentError::Unreachable {
                endpoint: endpoint.to_string(),
                why: error_chain(&e),
            })? {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(AgentError::Malformed {
                        endpoint: endpoint.to_string(),
                        why: format!("reply larger than {} MiB", MAX_BODY >> 20),
                    });
                }
                body.extend_from_slice(&chunk);
            }
            if !status.is_success() {
                return Err(status_error(endpoint, status, &body));
            }
            Ok((headers, bytes_body::Body(body)))
        };
        let result = tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(AgentError::Timeout {
                    endpoint: endpoint.to_string(),
                    timeout,
                })
            });
        if let (Err(_), Some(m)) = (&result, &self.metrics) {
            m.agent_errors.inc(&EndpointLabel {
                endpoint: endpoint.to_string(),
            });
        }
        result
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        endpoint: &str,
        path: &str,
        query: &[(&str, String)],
        blocking: Option<Blocking>,
    ) -> Result<Reply<T>, AgentError> {
        let mut q: Vec<(&str, String)> = query.to_vec();
        let mut timeout = PLAIN_TIMEOUT;
        if let Some(b) = blocking {
            if b.index > 0 {
                q.push(("index", b.index.to_string()));
            }
            q.push(("wait", format!("{}ms", b.wait.as_millis())));
            timeout = b.wait + b.wait / 16 + BLOCKING_SLACK;
        }
        let req = self.request(Method::GET, path).query(&q);
        let (headers, body) = self.send(endpoint, req, timeout).await?;
        let index = headers
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let value = body.json(endpoint)?;
        Ok(Reply { value, index })
    }

    fn dc_query(&self) -> Vec<(&'static str, String)> {
        self.datacenter
            .iter()
            .map(|dc| ("dc", dc.clone()))
            .collect()
    }

    /// The CA roots (blocking).
    pub async fn roots(&self, b: Blocking) -> Result<Reply<CaRoots>, AgentError> {
        self.get_json(
            "roots",
            "/v1/agent/connect/ca/roots",
            &self.dc_query(),
            Some(b),
        )
        .await
    }

    /// The leaf certificate for `service` (blocking). `dc` is never sent: it
    /// would become the datacenter in the leaf's SPIFFE ID (spec §1.2).
    pub async fn leaf(&self, service: &str, b: Blocking) -> Result<Reply<IssuedCert>, AgentError> {
        let path = format!("/v1/agent/connect/ca/leaf/{}", path_segment(service));
        self.get_json("leaf", &path, &[], Some(b)).await
    }

    /// Asks the agent whether `client_uri` may connect to `target`.
    pub async fn authorize(
        &self,
        target: &str,
        client_uri: &str,
        serial: &str,
        timeout: Duration,
    ) -> Result<Authorization, AgentError> {
        let body = AuthorizeRequest {
            target,
            client_cert_uri: client_uri,
            client_cert_serial: serial,
        };
        let req = self
            .request(Method::POST, "/v1/agent/connect/authorize")
            .json(&body);
        let (_, body) = self.send("authorize", req, timeout).await?;
        body.json("authorize")
    }

    /// Healthy mesh instances of `service` (blocking), in datacenter `dc`
    /// if given, else the agent's default.
    pub async fn healthy(
        &self,
        service: &str,
        dc: Option<&str>,
        b: Blocking,
    ) -> Result<Reply<Vec<ServiceEntry>>, AgentError> {
        let path = format!("/v1/health/connect/{}", path_segment(service));
        let mut q = vec![("passing", "1".to_string())];
        match dc {
            Some(dc) => q.push(("dc", dc.to_string())),
            None => q.extend(self.dc_query()),
        }
        self.get_json("health", &path, &q, Some(b)).await
    }

    /// Executes prepared query `name` for mesh-capable endpoints.
    pub async fn query(
        &self,
        name: &str,
        dc: Option<&str>,
    ) -> Result<Reply<QueryResult>, AgentError> {
        let path = format!("/v1/query/{}/execute", path_segment(name));
        let mut q = vec![("connect", "true".to_string())];
        match dc {
            Some(dc) => q.push(("dc", dc.to_string())),
            None => q.extend(self.dc_query()),
        }
        self.get_json("query", &path, &q, None).await
    }

    /// Intentions whose destination is `service` (blocking). Only compared
    /// for change, so kept as raw JSON.
    pub async fn intention_match(
        &self,
        service: &str,
        b: Blocking,
    ) -> Result<Reply<serde_json::Value>, AgentError> {
        let q = [
            ("by", "destination".to_string()),
            ("name", service.to_string()),
        ];
        let blocking = (!b.wait.is_zero()).then_some(b);
        self.get_json("intentions", "/v1/connect/intentions/match", &q, blocking)
            .await
    }

    /// A local service registration (hash-blocking when `hash` is given).
    pub async fn agent_service<T: DeserializeOwned>(
        &self,
        id: &str,
        hash: Option<&str>,
        wait: Duration,
    ) -> Result<(T, Option<String>), AgentError> {
        let path = format!("/v1/agent/service/{}", path_segment(id));
        self.get_hashed("proxy registration", &path, hash, wait)
            .await
    }

    /// Registers a service, replacing its existing checks (so registering
    /// again is idempotent).
    pub async fn register_service<B: Serialize>(&self, body: &B) -> Result<(), AgentError> {
        let q = [("replace-existing-checks", "true".to_string())];
        self.put("register", "/v1/agent/service/register", &q, Some(body))
            .await
    }

    /// Deregisters service instance `id`.
    pub async fn deregister_service(&self, id: &str) -> Result<(), AgentError> {
        let path = format!("/v1/agent/service/deregister/{}", path_segment(id));
        self.put::<()>("deregister", &path, &[], None).await
    }

    /// Sets TTL check `id` to `status` with `note` as its output, resetting
    /// its TTL.
    pub async fn check_ttl(
        &self,
        id: &str,
        status: CheckStatus,
        note: &str,
    ) -> Result<(), AgentError> {
        let verb = match status {
            CheckStatus::Passing => "pass",
            CheckStatus::Warning => "warn",
            CheckStatus::Critical => "fail",
        };
        let path = format!("/v1/agent/check/{verb}/{}", path_segment(id));
        self.put::<()>("heartbeat", &path, &[("note", note.to_string())], None)
            .await
    }

    /// A PUT with an optional JSON body and query.
    async fn put<B: Serialize>(
        &self,
        endpoint: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<(), AgentError> {
        let mut req = self.request(Method::PUT, path).query(query);
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send(endpoint, req, PLAIN_TIMEOUT).await.map(|_| ())
    }

    /// A GET of any JSON, non-blocking or hash-blocking (agent-local
    /// endpoints): returns the value and `X-Consul-ContentHash`.
    async fn get_hashed<T: DeserializeOwned>(
        &self,
        endpoint: &str,
        path: &str,
        hash: Option<&str>,
        wait: Duration,
    ) -> Result<(T, Option<String>), AgentError> {
        let mut q: Vec<(&str, String)> = vec![("wait", format!("{}ms", wait.as_millis()))];
        if let Some(h) = hash {
            q.push(("hash", h.to_string()));
        }
        let req = self.request(Method::GET, path).query(&q);
        let timeout = wait + wait / 16 + BLOCKING_SLACK;
        let (headers, body) = self.send(endpoint, req, timeout).await?;
        let hash = headers
            .get("X-Consul-ContentHash")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((body.json(endpoint)?, hash))
    }

    /// Every service registered with the local agent, by ID.
    pub async fn services<T: DeserializeOwned>(&self) -> Result<HashMap<String, T>, AgentError> {
        let req = self.request(Method::GET, "/v1/agent/services");
        let (_, body) = self.send("services", req, PLAIN_TIMEOUT).await?;
        body.json("services")
    }
}

/// The response body, kept as bytes until decoded.
mod bytes_body {
    use super::AgentError;

    pub struct Body(pub Vec<u8>);

    impl Body {
        pub fn json<T: serde::de::DeserializeOwned>(
            &self,
            endpoint: &str,
        ) -> Result<T, AgentError> {
            serde_json::from_slice(&self.0).map_err(|e| AgentError::Malformed {
                endpoint: endpoint.to_string(),
                why: e.to_string(),
            })
        }
    }
}

/// Percent-encodes one URL path segment (service names are plain, but a
/// stray `/` or `?` must not change which endpoint is called).
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn status_error(endpoint: &str, status: StatusCode, body: &[u8]) -> AgentError {
    let text = String::from_utf8_lossy(body);
    let mut text = text.trim().to_string();
    if text.len() > 300 {
        let mut cut = 300;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    AgentError::Status {
        endpoint: endpoint.to_string(),
        status: status.as_u16(),
        body: text,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The rustls config for an https agent: trust `-ca-file`/`-ca-path` (or
/// the system bundle when neither is set), present `-client-cert` if given,
/// check the certificate against `-tls-server-name` when set (instead of
/// the URL's host), or not at all with `CONSUL_HTTP_SSL_VERIFY=false`.
fn agent_tls(tls: &AgentTls) -> Result<rustls::ClientConfig, AgentError> {
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
    let provider = crate::tls::provider();
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
    fn names_the_missing_permission_of_a_403() {
        let e = AgentError::Status {
            endpoint: "leaf".into(),
            status: 403,
            body: "Permission denied: token with AccessorID 'abc' lacks permission 'service:write' on \"web\"".into(),
        };
        assert_eq!(
            e.missing_permission().as_deref(),
            Some("service:write on \"web\"")
        );
        let other = AgentError::Status {
            endpoint: "leaf".into(),
            status: 403,
            body: "ACL not found".into(),
        };
        assert_eq!(other.missing_permission(), None);
        let anonymous = AgentError::Status {
            endpoint: "leaf".into(),
            status: 403,
            body: "Permission denied: anonymous token lacks permission 'service:write' on \"web\". The anonymous token is used implicitly when a request does not specify a token.".into(),
        };
        assert_eq!(
            anonymous.missing_permission().as_deref(),
            Some("service:write on \"web\"")
        );
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(path_segment("web-1_a.b"), "web-1_a.b");
        assert_eq!(path_segment("a/b?c"), "a%2Fb%3Fc");
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
