//! The agent's HTTP client: URLs, headers, timeouts and errors. With the
//! bodies in [`super::api`] and HTTPS in `https`, this is all that
//! knows how Consul's HTTP API is spoken (spec §1); everything else sees
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
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::{
    Authorization, AuthorizeRequest, Blocking, CaRoots, CheckStatus, IssuedCert, QueryResult,
    Reply, ServiceEntry,
};
use super::https::agent_tls;
use crate::config::agent::{AgentAddr, AgentConfig, Token};
use crate::ops::metrics::{EndpointLabel, Metrics};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
