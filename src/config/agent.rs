//! How to reach the local Consul agent: address, ACL token and TLS, from
//! flags and the environment variables Consul's own CLI reads (spec §1.0);
//! and which registration the proxy is ([`ProxyIdentity`]).
//!
//! Precedence, as in Consul's Go client (`api/api.go` `defaultConfig` and
//! `NewClient`, `command/flags/http.go`): a flag beats its environment
//! variable; for the token, the order is `-token-file`, `-token`,
//! `CONSUL_HTTP_TOKEN_FILE`, `CONSUL_HTTP_TOKEN`. An empty flag or variable
//! counts as not set, as in Go where `""` is the zero value. Environment
//! access goes through [`Env`] so tests never touch the process environment.
//!
//! Where we differ from the Go client, on purpose:
//! - An unparsable `CONSUL_HTTP_SSL` or `CONSUL_HTTP_SSL_VERIFY` is an error.
//!   Go only logs a warning and then reads the value as `false`, which for
//!   `CONSUL_HTTP_SSL_VERIFY=yes` silently turns verification *off*.
//! - A path after `HOST:PORT` is a prefix with or without a scheme; Go only
//!   splits it off after `http://`/`https://` and otherwise sends requests to
//!   a host name containing a `/`, which cannot work.
//! - A missing host (`http://`, `unix://`) is an error here, not at the
//!   first request; an empty host before `:PORT` means 127.0.0.1, as Go's
//!   dialer reads it.
//! - `unix://` always speaks plain HTTP on the socket; Go would speak TLS
//!   over it when `CONSUL_HTTP_SSL=true`.
//! - A token source that turns out empty (an empty or whitespace-only token
//!   file, `-token=`) is skipped for the next one in the order above. Go
//!   does the same except that an empty `-token-file` skips
//!   `CONSUL_HTTP_TOKEN_FILE` too.
//! - A token file that does not exist is skipped with a warning (Go stops):
//!   Nomad writes `si_token` only when Consul ACLs are on, so the same job
//!   must start without it. Other read errors stay fatal.

use std::path::PathBuf;

pub use crate::cli::Token;
use crate::cli::{go_bool, AgentArgs, ProxyArgs};

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
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

/// Why the agent settings cannot be used. Each message names the flag or
/// environment variable the bad value came from. No message contains a token.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    /// The address has a scheme other than http, https or unix (Consul's
    /// client says `Unknown protocol scheme`).
    #[error(
        "{origin} {value:?}: Unknown protocol scheme: {scheme} (expected http, https or unix)"
    )]
    UnknownScheme {
        origin: &'static str,
        value: String,
        scheme: String,
    },
    /// `http://` or `https://` with nothing where HOST:PORT should be.
    #[error("{origin} {value:?}: missing HOST:PORT after the scheme")]
    MissingHost { origin: &'static str, value: String },
    /// `unix://` with no socket path.
    #[error("{origin} {value:?}: missing the socket path after unix:// (e.g. unix:///var/run/consul.sock)")]
    MissingSocketPath { origin: &'static str, value: String },
    /// A boolean variable that Go's `strconv.ParseBool` would not accept.
    #[error("{var}={value:?} is not a boolean (expected true or false; also 1, t, T, TRUE, True, 0, f, F, FALSE, False)")]
    BadBool { var: &'static str, value: String },
    /// A configured token file that exists but cannot be read: fatal, as in
    /// the Go client
    /// too, rather than silently running without a token.
    #[error("{origin} {}: cannot read the token file: {source}", path.display())]
    TokenFile {
        origin: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A server name that is not NAME or NAME:PORT.
    #[error("{origin} {value:?}: {why}")]
    BadServerName {
        origin: &'static str,
        value: String,
        why: &'static str,
    },
    /// A client certificate without its key.
    #[error("{origin} is set but neither -client-key nor CONSUL_CLIENT_KEY is: a client certificate needs its key")]
    CertWithoutKey { origin: &'static str },
    /// A client key without its certificate.
    #[error("{origin} is set but neither -client-cert nor CONSUL_CLIENT_CERT is: a client key needs its certificate")]
    KeyWithoutCert { origin: &'static str },
}

/// The agent address when neither `-http-addr` nor `CONSUL_HTTP_ADDR` is set.
const DEFAULT_AUTHORITY: &str = "127.0.0.1:8500";

impl AgentConfig {
    /// Resolves the agent flags against the environment, with Consul's
    /// precedence and defaults (module doc, spec §1.0). Reads the token file,
    /// if one is configured; no other file is opened here.
    pub fn resolve(args: &AgentArgs, env: &dyn Env) -> Result<AgentConfig, AgentConfigError> {
        let ssl = env_bool(env, "CONSUL_HTTP_SSL")?.unwrap_or(false);
        let verify = env_bool(env, "CONSUL_HTTP_SSL_VERIFY")?.unwrap_or(true);

        let addr = match string_setting(&args.http_addr, "-http-addr", env, "CONSUL_HTTP_ADDR") {
            Some((value, origin)) => parse_addr(&value, origin, ssl)?,
            None => AgentAddr::Http {
                scheme: default_scheme(ssl).to_string(),
                authority: DEFAULT_AUTHORITY.to_string(),
                prefix: String::new(),
            },
        };

        let client_cert =
            path_setting(&args.client_cert, "-client-cert", env, "CONSUL_CLIENT_CERT");
        let client_key = path_setting(&args.client_key, "-client-key", env, "CONSUL_CLIENT_KEY");
        match (&client_cert, &client_key) {
            (Some((_, origin)), None) => return Err(AgentConfigError::CertWithoutKey { origin }),
            (None, Some((_, origin))) => return Err(AgentConfigError::KeyWithoutCert { origin }),
            _ => {}
        }
        let server_name = match string_setting(
            &args.tls_server_name,
            "-tls-server-name",
            env,
            "CONSUL_TLS_SERVER_NAME",
        ) {
            Some((value, origin)) => {
                strip_port(&value).map_err(|why| AgentConfigError::BadServerName {
                    origin,
                    value: value.clone(),
                    why,
                })?
            }
            None => None,
        };
        let tls = AgentTls {
            ca_file: path_setting(&args.ca_file, "-ca-file", env, "CONSUL_CACERT").map(|s| s.0),
            ca_path: path_setting(&args.ca_path, "-ca-path", env, "CONSUL_CAPATH").map(|s| s.0),
            client_cert: client_cert.map(|s| s.0),
            client_key: client_key.map(|s| s.0),
            server_name,
            verify,
        };

        Ok(AgentConfig {
            addr,
            token: resolve_token(args, env)?,
            tls,
            datacenter: args.datacenter.clone().filter(|dc| !dc.is_empty()),
        })
    }
}

/// Which agent registration the proxy takes its configuration from
/// (spec §4.2). Resolved once at startup; `SidecarFor` still has to be
/// looked up on the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyIdentity {
    /// `-proxy-id` / `CONNECT_PROXY_ID`: the ID of a `connect-proxy`
    /// service registered on the local agent (Agent API mode).
    ProxyId(String),
    /// `-sidecar-for` / `CONNECT_SIDECAR_FOR`: the ID of a local service
    /// instance whose one sidecar proxy is to be found (Agent API mode).
    SidecarFor(String),
    /// Neither: the proxy is configured by flags (`-service`, Flags mode).
    None,
}

impl ProxyIdentity {
    /// As Consul's `connect proxy` command does it: each flag falls back to
    /// its own variable first, and only then does a proxy ID (from either
    /// source) win over a sidecar-for ID (from either source). So
    /// `CONNECT_PROXY_ID` in the environment beats `-sidecar-for` on the
    /// command line, exactly as in Consul.
    pub fn resolve(args: &ProxyArgs, env: &dyn Env) -> ProxyIdentity {
        let proxy_id = string_setting(&args.proxy_id, "-proxy-id", env, "CONNECT_PROXY_ID");
        let sidecar_for = string_setting(
            &args.sidecar_for,
            "-sidecar-for",
            env,
            "CONNECT_SIDECAR_FOR",
        );
        match (proxy_id, sidecar_for) {
            (Some((id, _)), _) => ProxyIdentity::ProxyId(id),
            (None, Some((id, _))) => ProxyIdentity::SidecarFor(id),
            (None, None) => ProxyIdentity::None,
        }
    }
}

/// An environment variable's value; empty counts as unset, as in Go.
fn env_value(env: &dyn Env, var: &str) -> Option<String> {
    env.get(var).filter(|v| !v.is_empty())
}

/// A string flag if given and not empty, else its variable; with the name
/// of where the value came from, for error messages.
fn string_setting(
    flag: &Option<String>,
    flag_name: &'static str,
    env: &dyn Env,
    var: &'static str,
) -> Option<(String, &'static str)> {
    match flag {
        Some(v) if !v.is_empty() => Some((v.clone(), flag_name)),
        _ => env_value(env, var).map(|v| (v, var)),
    }
}

/// [`string_setting`] for path flags.
fn path_setting(
    flag: &Option<PathBuf>,
    flag_name: &'static str,
    env: &dyn Env,
    var: &'static str,
) -> Option<(PathBuf, &'static str)> {
    match flag {
        Some(p) if !p.as_os_str().is_empty() => Some((p.clone(), flag_name)),
        _ => env_value(env, var).map(|v| (PathBuf::from(v), var)),
    }
}

/// A boolean variable in Go's `strconv.ParseBool` syntax; `None` if unset.
fn env_bool(env: &dyn Env, var: &'static str) -> Result<Option<bool>, AgentConfigError> {
    env_value(env, var)
        .map(|value| go_bool(&value).map_err(|_| AgentConfigError::BadBool { var, value }))
        .transpose()
}

fn default_scheme(ssl: bool) -> &'static str {
    if ssl {
        "https"
    } else {
        "http"
    }
}

/// `-http-addr` / `CONSUL_HTTP_ADDR`, as `NewClient` splits it: the scheme
/// before `://` (`http` keeps the default scheme, so it never turns off the
/// https that `CONSUL_HTTP_SSL=true` asked for), then `HOST:PORT`, then an
/// optional path prefix.
fn parse_addr(value: &str, origin: &'static str, ssl: bool) -> Result<AgentAddr, AgentConfigError> {
    let (scheme, rest) = match value.split_once("://") {
        None => (default_scheme(ssl), value),
        Some(("http", rest)) => (default_scheme(ssl), rest),
        Some(("https", rest)) => ("https", rest),
        Some(("unix", path)) => {
            if path.is_empty() {
                return Err(AgentConfigError::MissingSocketPath {
                    origin,
                    value: value.to_string(),
                });
            }
            return Ok(AgentAddr::Unix { path: path.into() });
        }
        Some((other, _)) => {
            return Err(AgentConfigError::UnknownScheme {
                origin,
                value: value.to_string(),
                scheme: other.to_string(),
            })
        }
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() {
        return Err(AgentConfigError::MissingHost {
            origin,
            value: value.to_string(),
        });
    }
    let authority = if authority.starts_with(':') {
        format!("127.0.0.1{authority}")
    } else {
        authority.to_string()
    };
    let path = path.trim_end_matches('/');
    let prefix = if path.is_empty() {
        String::new()
    } else {
        format!("/{path}")
    };
    Ok(AgentAddr::Http {
        scheme: scheme.to_string(),
        authority,
        prefix,
    })
}

/// The token, by precedence: `-token-file`, `-token`,
/// `CONSUL_HTTP_TOKEN_FILE`, `CONSUL_HTTP_TOKEN`. A token file is read and
/// trimmed; one that cannot be read is an error (a later source is not
/// tried, so a typo in the path is not hidden). A source that yields an empty
/// token is skipped, as the Go client keeps its previous token when the file
/// is empty. Files of sources after the winning one are not read.
fn resolve_token(args: &AgentArgs, env: &dyn Env) -> Result<Option<Token>, AgentConfigError> {
    enum Source {
        File(PathBuf, &'static str),
        Value(String),
    }
    let sources = [
        args.token_file
            .clone()
            .map(|p| Source::File(p, "-token-file")),
        args.token
            .as_ref()
            .map(|t| Source::Value(t.secret().to_string())),
        env_value(env, "CONSUL_HTTP_TOKEN_FILE")
            .map(|p| Source::File(p.into(), "CONSUL_HTTP_TOKEN_FILE")),
        env_value(env, "CONSUL_HTTP_TOKEN").map(Source::Value),
    ];
    for source in sources.into_iter().flatten() {
        let secret = match source {
            Source::Value(v) => v,
            Source::File(path, _) if path.as_os_str().is_empty() => continue,
            Source::File(path, origin) => match std::fs::read_to_string(&path) {
                Ok(s) => s.trim().to_string(),
                // Nomad writes si_token only when Consul ACLs are on, so a
                // job that names it must also run where it never appears.
                // Going on without a token grants nothing: an agent with
                // ACLs answers 403, and ferry fails closed. Go's client
                // stops here; other read errors (permissions, a directory)
                // still do.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(%origin, path = %path.display(), "token file does not exist; going on without it (fine when Consul ACLs are off)");
                    continue;
                }
                Err(source) => {
                    return Err(AgentConfigError::TokenFile {
                        origin,
                        path,
                        source,
                    })
                }
            },
        };
        if !secret.is_empty() {
            return Ok(Some(Token::new(secret)));
        }
    }
    Ok(None)
}

/// Drops a trailing `:PORT` from a server name, as Go's `SetupTLSConfig`
/// does (`net.SplitHostPort` when the last `:` comes after the last `]`).
/// A bracketed IPv6 address loses its brackets too, which Go's certificate
/// check also does before comparing. `Ok(None)` when nothing is left.
fn strip_port(name: &str) -> Result<Option<String>, &'static str> {
    let has_port = name.rfind(':') > name.rfind(']');
    let host = if let Some(bracketed) = name.strip_prefix('[') {
        let (host, rest) = bracketed
            .split_once(']')
            .ok_or("missing ']' after an IPv6 address")?;
        let port_ok = rest.is_empty() || (rest.starts_with(':') && !rest[1..].contains(':'));
        if !port_ok {
            return Err("expected NAME, NAME:PORT or [IPV6]:PORT");
        }
        host
    } else if has_port {
        let (host, _port) = name.rsplit_once(':').unwrap_or((name, ""));
        if host.contains(':') {
            return Err("too many colons (write an IPv6 address as [ADDR]:PORT)");
        }
        host
    } else {
        name
    };
    if host.contains(['[', ']']) {
        return Err("unexpected '[' or ']'");
    }
    Ok(Some(host.to_string()).filter(|h| !h.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Pads an environment table row; no variable has an empty name.
    const NO: (&str, &str) = ("", "");

    /// Two environment variables (pad with [`NO`]).
    type Env2<'a> = [(&'a str, &'a str); 2];

    fn http(scheme: &str, authority: &str, prefix: &str) -> AgentAddr {
        AgentAddr::Http {
            scheme: scheme.into(),
            authority: authority.into(),
            prefix: prefix.into(),
        }
    }

    fn addr_args(flag: Option<&str>) -> AgentArgs {
        AgentArgs {
            http_addr: flag.map(String::from),
            ..AgentArgs::default()
        }
    }

    fn token_file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    fn secret(config: &AgentConfig) -> Option<&str> {
        config.token.as_ref().map(Token::secret)
    }

    #[test]
    fn address_precedence_schemes_and_prefixes() {
        let ssl = ("CONSUL_HTTP_SSL", "true");
        let cases: [(&str, Option<&str>, Env2, AgentAddr); 21] = [
            (
                "default",
                None,
                [NO, NO],
                http("http", "127.0.0.1:8500", ""),
            ),
            (
                "default, ssl",
                None,
                [ssl, NO],
                http("https", "127.0.0.1:8500", ""),
            ),
            (
                "ssl=false",
                None,
                [("CONSUL_HTTP_SSL", "false"), NO],
                http("http", "127.0.0.1:8500", ""),
            ),
            (
                "env",
                None,
                [("CONSUL_HTTP_ADDR", "10.0.0.1:8500"), NO],
                http("http", "10.0.0.1:8500", ""),
            ),
            (
                "flag beats env",
                Some("10.0.0.2:8500"),
                [("CONSUL_HTTP_ADDR", "10.0.0.1:8500"), NO],
                http("http", "10.0.0.2:8500", ""),
            ),
            (
                "empty flag falls back to env",
                Some(""),
                [("CONSUL_HTTP_ADDR", "10.0.0.1:8500"), NO],
                http("http", "10.0.0.1:8500", ""),
            ),
            (
                "empty env is unset",
                None,
                [("CONSUL_HTTP_ADDR", ""), NO],
                http("http", "127.0.0.1:8500", ""),
            ),
            (
                "no scheme, ssl",
                Some("consul.local:8501"),
                [ssl, NO],
                http("https", "consul.local:8501", ""),
            ),
            (
                "http",
                Some("http://h:8500"),
                [NO, NO],
                http("http", "h:8500", ""),
            ),
            (
                "https",
                Some("https://h:8501"),
                [NO, NO],
                http("https", "h:8501", ""),
            ),
            (
                "https, ssl=false",
                Some("https://h:8501"),
                [("CONSUL_HTTP_SSL", "false"), NO],
                http("https", "h:8501", ""),
            ),
            (
                "http does not undo ssl=true",
                Some("http://h:8500"),
                [ssl, NO],
                http("https", "h:8500", ""),
            ),
            (
                "unix",
                Some("unix:///var/run/consul.sock"),
                [NO, NO],
                AgentAddr::Unix {
                    path: "/var/run/consul.sock".into(),
                },
            ),
            (
                "unix from env, ssl ignored",
                None,
                [("CONSUL_HTTP_ADDR", "unix:///tmp/c.sock"), ssl],
                AgentAddr::Unix {
                    path: "/tmp/c.sock".into(),
                },
            ),
            (
                "https prefix",
                Some("https://h:8501/consul"),
                [NO, NO],
                http("https", "h:8501", "/consul"),
            ),
            (
                "prefix, trailing slash dropped",
                Some("http://h:8500/consul/"),
                [NO, NO],
                http("http", "h:8500", "/consul"),
            ),
            (
                "nested prefix",
                Some("http://h:8500/a/b"),
                [NO, NO],
                http("http", "h:8500", "/a/b"),
            ),
            (
                "bare slash is no prefix",
                Some("http://h:8500/"),
                [NO, NO],
                http("http", "h:8500", ""),
            ),
            (
                "prefix without scheme",
                Some("h:8500/consul"),
                [NO, NO],
                http("http", "h:8500", "/consul"),
            ),
            (
                "empty host is loopback",
                Some(":8500"),
                [NO, NO],
                http("http", "127.0.0.1:8500", ""),
            ),
            (
                "ipv6",
                Some("https://[::1]:8501"),
                [NO, NO],
                http("https", "[::1]:8501", ""),
            ),
        ];
        for (name, flag, env, want) in cases {
            let got = AgentConfig::resolve(&addr_args(flag), &env)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got.addr, want, "{name}");
        }
    }

    #[test]
    fn bad_addresses_and_booleans_name_their_source() {
        let cases: [(&str, Option<&str>, Env2, &[&str]); 10] = [
            (
                "unknown scheme",
                Some("ftp://h:21"),
                [NO, NO],
                &["-http-addr", "Unknown protocol scheme: ftp"],
            ),
            (
                "unknown scheme from env",
                None,
                [("CONSUL_HTTP_ADDR", "tcp://h:8500"), NO],
                &["CONSUL_HTTP_ADDR", "Unknown protocol scheme: tcp"],
            ),
            (
                "scheme is case-sensitive, as in Go",
                Some("HTTP://h:8500"),
                [NO, NO],
                &["Unknown protocol scheme: HTTP"],
            ),
            (
                "unix without a path",
                Some("unix://"),
                [NO, NO],
                &["-http-addr", "socket path"],
            ),
            (
                "http without a host",
                Some("http://"),
                [NO, NO],
                &["-http-addr", "HOST:PORT"],
            ),
            (
                "https with only a prefix",
                Some("https:///consul"),
                [NO, NO],
                &["HOST:PORT"],
            ),
            (
                "bad CONSUL_HTTP_SSL",
                None,
                [("CONSUL_HTTP_SSL", "yes"), NO],
                &["CONSUL_HTTP_SSL=\"yes\"", "not a boolean"],
            ),
            (
                "bad CONSUL_HTTP_SSL even with a scheme",
                Some("https://h:8501"),
                [("CONSUL_HTTP_SSL", "on"), NO],
                &["CONSUL_HTTP_SSL="],
            ),
            (
                "bad CONSUL_HTTP_SSL_VERIFY",
                None,
                [("CONSUL_HTTP_SSL_VERIFY", "nope"), NO],
                &["CONSUL_HTTP_SSL_VERIFY=\"nope\"", "not a boolean"],
            ),
            (
                "Go booleans are case-sensitive",
                None,
                [("CONSUL_HTTP_SSL_VERIFY", "fALSE"), NO],
                &["CONSUL_HTTP_SSL_VERIFY"],
            ),
        ];
        for (name, flag, env, want) in cases {
            let err = match AgentConfig::resolve(&addr_args(flag), &env) {
                Ok(c) => panic!("{name}: accepted as {c:?}"),
                Err(e) => e.to_string(),
            };
            for w in want {
                assert!(err.contains(w), "{name}: {err:?} does not mention {w:?}");
            }
        }
    }

    #[test]
    fn token_precedence() {
        let flag_file = token_file("from-flag-file");
        let env_file = token_file("from-env-file");
        let empty_file = token_file(" \n\t\n");
        let flag_path = flag_file.path().to_str().unwrap();
        let env_path = env_file.path().to_str().unwrap();
        let empty_path = empty_file.path().to_str().unwrap();
        let missing = "/nonexistent/ferry-token";
        let env_tok = ("CONSUL_HTTP_TOKEN", "from-env");
        let env_f = ("CONSUL_HTTP_TOKEN_FILE", env_path);

        type Row<'a> = (
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            Env2<'a>,
            Option<&'a str>,
        );
        let cases: [Row; 13] = [
            ("none", None, None, [NO, NO], None),
            ("env token", None, None, [env_tok, NO], Some("from-env")),
            ("env file", None, None, [env_f, NO], Some("from-env-file")),
            (
                "env file beats env token",
                None,
                None,
                [env_tok, env_f],
                Some("from-env-file"),
            ),
            (
                "-token beats env",
                None,
                Some("from-flag"),
                [env_tok, env_f],
                Some("from-flag"),
            ),
            (
                "-token-file beats everything",
                Some(flag_path),
                Some("from-flag"),
                [env_tok, env_f],
                Some("from-flag-file"),
            ),
            (
                "-token: an unreadable env file is never read",
                None,
                Some("from-flag"),
                [("CONSUL_HTTP_TOKEN_FILE", missing), NO],
                Some("from-flag"),
            ),
            (
                "empty -token falls back",
                None,
                Some(""),
                [env_tok, NO],
                Some("from-env"),
            ),
            (
                "empty env token is none",
                None,
                None,
                [("CONSUL_HTTP_TOKEN", ""), NO],
                None,
            ),
            (
                "empty -token-file path falls back",
                Some(""),
                None,
                [env_tok, NO],
                Some("from-env"),
            ),
            (
                "empty file content falls back to -token",
                Some(empty_path),
                Some("from-flag"),
                [env_tok, NO],
                Some("from-flag"),
            ),
            (
                "empty env file falls back to env token",
                None,
                None,
                [("CONSUL_HTTP_TOKEN_FILE", empty_path), env_tok],
                Some("from-env"),
            ),
            (
                "only empty sources",
                Some(empty_path),
                Some(""),
                [
                    ("CONSUL_HTTP_TOKEN_FILE", empty_path),
                    ("CONSUL_HTTP_TOKEN", ""),
                ],
                None,
            ),
        ];
        for (name, file, token, env, want) in cases {
            let args = AgentArgs {
                token_file: file.map(PathBuf::from),
                token: token.map(|t| Token::new(t.into())),
                ..AgentArgs::default()
            };
            let got = AgentConfig::resolve(&args, &env).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(secret(&got), want, "{name}");
        }
    }

    #[test]
    fn token_file_is_trimmed() {
        for contents in ["s3cret", "s3cret\n", "  s3cret \r\n\t", "\n\ns3cret\n\n"] {
            let f = token_file(contents);
            let args = AgentArgs {
                token_file: Some(f.path().into()),
                ..AgentArgs::default()
            };
            let got = AgentConfig::resolve(&args, &[NO]).unwrap();
            assert_eq!(secret(&got), Some("s3cret"), "{contents:?}");
        }
    }

    #[test]
    fn unreadable_token_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let dir_s = dir.path().to_str().unwrap();
        let cases: [(&str, Option<&str>, Env2, &str, &str); 2] = [
            (
                "CONSUL_HTTP_TOKEN_FILE is a directory",
                None,
                [("CONSUL_HTTP_TOKEN_FILE", dir_s), NO],
                "CONSUL_HTTP_TOKEN_FILE",
                dir_s,
            ),
            ("a directory", Some(dir_s), [NO, NO], "-token-file", dir_s),
        ];
        for (name, file, env, origin, path) in cases {
            let args = AgentArgs {
                token_file: file.map(PathBuf::from),
                ..AgentArgs::default()
            };
            let err = match AgentConfig::resolve(&args, &env) {
                Ok(c) => panic!("{name}: accepted as {c:?}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(origin), "{name}: {err}");
            assert!(err.contains(path), "{name}: {err}");
            assert!(err.contains("token file"), "{name}: {err}");
        }
    }

    #[test]
    fn a_missing_token_file_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("si_token");
        let m = missing.to_str().unwrap();
        let cases: [(&str, Option<&str>, Env2, Option<&str>); 3] = [
            ("missing -token-file alone", Some(m), [NO, NO], None),
            (
                "missing -token-file, then the env token",
                Some(m),
                [("CONSUL_HTTP_TOKEN", "ok"), NO],
                Some("ok"),
            ),
            (
                "missing CONSUL_HTTP_TOKEN_FILE (Nomad without ACLs)",
                None,
                [("CONSUL_HTTP_TOKEN_FILE", m), NO],
                None,
            ),
        ];
        for (name, file, env, want) in cases {
            let args = AgentArgs {
                token_file: file.map(PathBuf::from),
                ..AgentArgs::default()
            };
            let config =
                AgentConfig::resolve(&args, &env).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(config.token.as_ref().map(Token::secret), want, "{name}");
        }
    }

    #[test]
    fn the_token_never_shows_in_debug_or_errors() {
        let f = token_file("file-s3cret\n");
        let env = [
            ("CONSUL_HTTP_TOKEN", "env-s3cret"),
            ("CONSUL_HTTP_TOKEN_FILE", f.path().to_str().unwrap()),
        ];
        let flag = AgentArgs {
            token: Some("flag-s3cret".parse().unwrap()),
            ..AgentArgs::default()
        };
        let from_file = AgentArgs::default();
        for (args, secret) in [(&flag, "flag-s3cret"), (&from_file, "file-s3cret")] {
            let config = AgentConfig::resolve(args, &env).unwrap();
            assert_eq!(config.token.as_ref().map(Token::secret), Some(secret));
            for shown in [
                format!("{config:?}"),
                format!("{config:#?}"),
                format!("{args:?}"),
                format!("{}", config.token.as_ref().unwrap()),
            ] {
                for s in ["flag-s3cret", "env-s3cret", "file-s3cret"] {
                    assert!(!shown.contains(s), "{s} shown in {shown}");
                }
            }
        }
        // An error with a token configured does not carry it either.
        let bad = AgentArgs {
            token: Some("flag-s3cret".parse().unwrap()),
            client_cert: Some("/c.pem".into()),
            ..AgentArgs::default()
        };
        let err = AgentConfig::resolve(&bad, &env).unwrap_err();
        assert!(!format!("{err} {err:?}").contains("s3cret"));
    }

    #[test]
    fn tls_settings_flag_beats_env() {
        let env = [
            ("CONSUL_CACERT", "/env/ca.pem"),
            ("CONSUL_CAPATH", "/env/cas"),
            ("CONSUL_CLIENT_CERT", "/env/cert.pem"),
            ("CONSUL_CLIENT_KEY", "/env/key.pem"),
            ("CONSUL_TLS_SERVER_NAME", "env.consul"),
        ];
        let from_env = AgentConfig::resolve(&AgentArgs::default(), &env).unwrap();
        assert_eq!(
            from_env.tls,
            AgentTls {
                ca_file: Some("/env/ca.pem".into()),
                ca_path: Some("/env/cas".into()),
                client_cert: Some("/env/cert.pem".into()),
                client_key: Some("/env/key.pem".into()),
                server_name: Some("env.consul".into()),
                verify: true,
            }
        );
        let flags = AgentArgs {
            ca_file: Some("/flag/ca.pem".into()),
            ca_path: Some("/flag/cas".into()),
            client_cert: Some("/flag/cert.pem".into()),
            client_key: Some("/flag/key.pem".into()),
            tls_server_name: Some("flag.consul".into()),
            ..AgentArgs::default()
        };
        let from_flags = AgentConfig::resolve(&flags, &env).unwrap();
        assert_eq!(
            from_flags.tls,
            AgentTls {
                ca_file: Some("/flag/ca.pem".into()),
                ca_path: Some("/flag/cas".into()),
                client_cert: Some("/flag/cert.pem".into()),
                client_key: Some("/flag/key.pem".into()),
                server_name: Some("flag.consul".into()),
                verify: true,
            }
        );
        let empty_flags = AgentArgs {
            ca_file: Some("".into()),
            tls_server_name: Some("".into()),
            ..AgentArgs::default()
        };
        let fallback = AgentConfig::resolve(&empty_flags, &env).unwrap();
        assert_eq!(fallback.tls, from_env.tls, "empty flags fall back to env");
        let none: [(&str, &str); 0] = [];
        let defaults = AgentConfig::resolve(&AgentArgs::default(), &none).unwrap();
        assert_eq!(
            defaults.tls,
            AgentTls {
                verify: true,
                ..AgentTls::default()
            }
        );
    }

    #[test]
    fn ssl_verify_parsing() {
        let cases = [
            ("", true),
            ("true", true),
            ("1", true),
            ("T", true),
            ("TRUE", true),
            ("True", true),
            ("false", false),
            ("0", false),
            ("f", false),
            ("F", false),
            ("FALSE", false),
            ("False", false),
        ];
        for (value, verify) in cases {
            let env = [("CONSUL_HTTP_SSL_VERIFY", value)];
            let got = AgentConfig::resolve(&AgentArgs::default(), &env)
                .unwrap_or_else(|e| panic!("{value:?}: {e}"));
            assert_eq!(got.tls.verify, verify, "{value:?}");
        }
        for bad in ["yes", "no", "off", "tRUE", " true"] {
            let env = [("CONSUL_HTTP_SSL_VERIFY", bad)];
            assert!(
                AgentConfig::resolve(&AgentArgs::default(), &env).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn server_name_port_is_stripped() {
        let ok = [
            ("consul.example", Some("consul.example")),
            ("consul.example:8501", Some("consul.example")),
            ("consul.example:", Some("consul.example")),
            ("10.0.0.1:8501", Some("10.0.0.1")),
            ("[::1]:8501", Some("::1")),
            ("[::1]", Some("::1")),
            (":8501", None),
        ];
        for (input, want) in ok {
            for (args, env) in [
                (
                    AgentArgs {
                        tls_server_name: Some(input.into()),
                        ..AgentArgs::default()
                    },
                    [NO],
                ),
                (AgentArgs::default(), [("CONSUL_TLS_SERVER_NAME", input)]),
            ] {
                let got =
                    AgentConfig::resolve(&args, &env).unwrap_or_else(|e| panic!("{input:?}: {e}"));
                assert_eq!(got.tls.server_name.as_deref(), want, "{input:?}");
            }
        }
        for (bad, origin_is_flag) in [
            ("a:b:8501", true),
            ("::1", false),
            ("[::1:8501", true),
            ("[::1]x", true),
            ("a]:1", false),
        ] {
            let (args, env) = if origin_is_flag {
                (
                    AgentArgs {
                        tls_server_name: Some(bad.into()),
                        ..AgentArgs::default()
                    },
                    [NO],
                )
            } else {
                (AgentArgs::default(), [("CONSUL_TLS_SERVER_NAME", bad)])
            };
            let err = AgentConfig::resolve(&args, &env).unwrap_err().to_string();
            let origin = if origin_is_flag {
                "-tls-server-name"
            } else {
                "CONSUL_TLS_SERVER_NAME"
            };
            assert!(err.contains(origin), "{bad:?}: {err}");
        }
    }

    #[test]
    fn client_cert_and_key_come_together() {
        type Row<'a> = (
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            Env2<'a>,
            Option<&'a str>,
        );
        let cases: [Row; 6] = [
            ("neither", None, None, [NO, NO], None),
            ("both flags", Some("/c"), Some("/k"), [NO, NO], None),
            (
                "cert flag, key env",
                Some("/c"),
                None,
                [("CONSUL_CLIENT_KEY", "/k"), NO],
                None,
            ),
            (
                "cert flag alone",
                Some("/c"),
                None,
                [NO, NO],
                Some("-client-cert is set"),
            ),
            (
                "cert env alone",
                None,
                None,
                [("CONSUL_CLIENT_CERT", "/c"), NO],
                Some("CONSUL_CLIENT_CERT is set"),
            ),
            (
                "key flag alone",
                None,
                Some("/k"),
                [NO, NO],
                Some("-client-key is set"),
            ),
        ];
        for (name, cert, key, env, want_err) in cases {
            let args = AgentArgs {
                client_cert: cert.map(PathBuf::from),
                client_key: key.map(PathBuf::from),
                ..AgentArgs::default()
            };
            match (AgentConfig::resolve(&args, &env), want_err) {
                (Ok(_), None) => {}
                (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{name}: {e}"),
                (got, _) => panic!("{name}: {got:?}"),
            }
        }
    }

    #[test]
    fn datacenter_as_given() {
        for (flag, want) in [(None, None), (Some(""), None), (Some("dc2"), Some("dc2"))] {
            let args = AgentArgs {
                datacenter: flag.map(String::from),
                ..AgentArgs::default()
            };
            let got = AgentConfig::resolve(&args, &[NO]).unwrap();
            assert_eq!(got.datacenter.as_deref(), want, "{flag:?}");
        }
    }

    #[test]
    fn proxy_identity_precedence() {
        use ProxyIdentity::{ProxyId, SidecarFor};
        let id = |s: &str| ProxyId(s.into());
        let sc = |s: &str| SidecarFor(s.into());
        let cases: [(&str, &[&str], Env2, ProxyIdentity); 11] = [
            ("nothing", &[], [NO, NO], ProxyIdentity::None),
            ("-proxy-id", &["-proxy-id", "p1"], [NO, NO], id("p1")),
            (
                "CONNECT_PROXY_ID",
                &[],
                [("CONNECT_PROXY_ID", "p2"), NO],
                id("p2"),
            ),
            (
                "-proxy-id beats its env",
                &["-proxy-id=p1"],
                [("CONNECT_PROXY_ID", "p2"), NO],
                id("p1"),
            ),
            (
                "-sidecar-for",
                &["-sidecar-for", "web"],
                [NO, NO],
                sc("web"),
            ),
            (
                "CONNECT_SIDECAR_FOR",
                &[],
                [("CONNECT_SIDECAR_FOR", "api"), NO],
                sc("api"),
            ),
            (
                "-sidecar-for beats its env",
                &["-sidecar-for", "web"],
                [("CONNECT_SIDECAR_FOR", "api"), NO],
                sc("web"),
            ),
            (
                "-proxy-id beats -sidecar-for",
                &["-proxy-id", "p1", "-sidecar-for", "web"],
                [NO, NO],
                id("p1"),
            ),
            (
                "CONNECT_PROXY_ID beats -sidecar-for, as in Consul",
                &["-sidecar-for", "web"],
                [("CONNECT_PROXY_ID", "p2"), NO],
                id("p2"),
            ),
            (
                "empty flag falls back to env",
                &["-proxy-id="],
                [("CONNECT_PROXY_ID", "p2"), NO],
                id("p2"),
            ),
            (
                "empty env is unset",
                &[],
                [("CONNECT_PROXY_ID", ""), ("CONNECT_SIDECAR_FOR", "api")],
                sc("api"),
            ),
        ];
        for (name, flags, env, want) in cases {
            let argv = std::iter::once("ferry").chain(flags.iter().copied());
            let cli = crate::cli::parse(argv).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(ProxyIdentity::resolve(&cli.proxy, &env), want, "{name}");
        }
    }
}
