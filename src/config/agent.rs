//! How to reach the local Consul agent: address, ACL token and TLS, from
//! flags and the environment variables Consul's own CLI reads (spec §1.0).
//!
//! Precedence, as in Consul's Go client: a flag beats its environment
//! variable; for the token, `-token-file` > `-token` > `CONSUL_HTTP_TOKEN_FILE`
//! > `CONSUL_HTTP_TOKEN`. Environment access goes through [`Env`] so tests
//! never touch the process environment.

use std::fmt;
use std::path::PathBuf;

/// Where the agent's HTTP API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    /// `http://` or `https://` with host:port and an optional path prefix,
    /// e.g. `https://127.0.0.1:8501/consul`. Stored without a trailing `/`.
    Http {
        /// `http` or `https`.
        scheme: String,
        /// `host:port`.
        authority: String,
        /// Path prefix before `/v1/...`, empty or starting with `/`.
        prefix: String,
    },
    /// `unix:///path/to/consul.sock`: HTTP over a unix socket.
    Unix {
        /// The socket path.
        path: PathBuf,
    },
}

/// An ACL token. Its `Debug` and `Display` never show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a secret.
    pub fn new(secret: String) -> Token {
        Token(secret)
    }
    /// The secret, for the `X-Consul-Token` header only.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// TLS to the agent (when the address is https).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentTls {
    /// `-ca-file` / `CONSUL_CACERT`: PEM bundle of CAs for the agent's certificate.
    pub ca_file: Option<PathBuf>,
    /// `-ca-path` / `CONSUL_CAPATH`: a directory of PEM CA files.
    pub ca_path: Option<PathBuf>,
    /// `-client-cert` / `CONSUL_CLIENT_CERT`: for agents with verify_incoming.
    pub client_cert: Option<PathBuf>,
    /// `-client-key` / `CONSUL_CLIENT_KEY`.
    pub client_key: Option<PathBuf>,
    /// `-tls-server-name` / `CONSUL_TLS_SERVER_NAME` (a trailing `:port` is
    /// stripped): the name the agent's certificate is checked against.
    pub server_name: Option<String>,
    /// `CONSUL_HTTP_SSL_VERIFY=false` turns verification off. Default true.
    pub verify: bool,
}

/// Everything needed to talk to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Default `http://127.0.0.1:8500`; `CONSUL_HTTP_SSL=true` makes the
    /// default scheme https.
    pub addr: AgentAddr,
    /// ACL token, if any.
    pub token: Option<Token>,
    /// TLS settings for https.
    pub tls: AgentTls,
    /// `-datacenter`: sent as `?dc=` on every call that takes it.
    pub datacenter: Option<String>,
}

/// Read access to environment variables (a map in tests).
pub trait Env {
    /// The variable's value, if set.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }
}
