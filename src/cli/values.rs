//! The types of flag values: each parses itself (`FromStr`) and says in its
//! error what was expected, so clap's message names the flag and the fix.

use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

pub use crate::proxy::net::{BindAddr, UnixBind};

/// A duration in Go's syntax (`300ms`, `1.5s`, `2h45m`, `0`).
///
/// ```
/// use ferry::cli::GoDuration;
/// let d: GoDuration = "1m30s".parse().unwrap();
/// assert_eq!(d.0.as_secs(), 90);
/// assert_eq!(d.to_string(), "1m30s");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

impl FromStr for GoDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a duration (examples: 500ms, 10s, 1m30s, 72h)");
        if s == "0" {
            return Ok(GoDuration(Duration::ZERO));
        }
        if s.is_empty() || s.starts_with('-') {
            return Err(bad());
        }
        let mut rest = s.strip_prefix('+').unwrap_or(s);
        let mut total = 0f64;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
            rest = &rest[num_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let scale = match &rest[..unit_len] {
                "ns" => 1e-9,
                "us" | "µs" | "μs" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            total += value * scale;
        }
        Duration::try_from_secs_f64(total)
            .map(GoDuration)
            .map_err(|_| bad())
    }
}

impl fmt::Display for GoDuration {
    /// Go's form for whole seconds (`72h0m0s`, `1m30s`), else Rust's (`1.5s`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() != 0 || d.is_zero() {
            return write!(f, "{d:?}");
        }
        let s = d.as_secs();
        match (s / 3600, s % 3600 / 60, s % 60) {
            (0, 0, s) => write!(f, "{s}s"),
            (0, m, s) => write!(f, "{m}m{s}s"),
            (h, m, s) => write!(f, "{h}h{m}m{s}s"),
        }
    }
}

/// How an upstream is discovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationType {
    /// A service name (`-upstream db:9191`).
    Service,
    /// A prepared query (`-upstream db.query:9191`).
    PreparedQuery,
}

/// One `-upstream` flag: `NAME[.TYPE]:[ADDR:]PORT`, parsed as Consul's
/// `flag_upstreams.go` does (port in Go's base-prefixed syntax), plus a
/// bracketed IPv6 bind address, which Consul's parser cannot express, and
/// `NAME[.TYPE]:unix:PATH` for a Unix socket listener (ferry's addition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamArg {
    /// Destination service or query name.
    pub name: String,
    /// Service or prepared query.
    pub kind: DestinationType,
    /// Local address (or Unix socket) to listen on.
    pub bind: BindAddr,
}

impl FromStr for UpstreamArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || {
            format!("{s:?}: expected NAME[.TYPE]:[ADDR:]PORT, e.g. db:9191 or db:127.0.0.1:9191")
        };
        let (dest, rest) = s.split_once(':').ok_or_else(syntax)?;
        let (name, kind) = match dest.split_once('.') {
            None | Some((_, "")) | Some((_, "service")) => (
                dest.split('.').next().unwrap_or(dest),
                DestinationType::Service,
            ),
            Some((n, "query")) => (n, DestinationType::PreparedQuery),
            Some((_, t)) => {
                return Err(format!(
                    "{s:?}: unknown upstream type {t:?} (expected service or query)"
                ))
            }
        };
        if name.is_empty() {
            return Err(syntax());
        }
        if let Some(path) = rest.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: the socket path {path:?} must be absolute (NAME:unix:/PATH)"
                ));
            }
            return Ok(UpstreamArg {
                name: name.to_string(),
                kind,
                bind: BindAddr::Unix(UnixBind {
                    path: path.into(),
                    mode: None,
                }),
            });
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, p) = v6.split_once("]:").ok_or_else(syntax)?;
            (Some(h), p)
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (Some(h), p),
                None => (None, rest),
            }
        };
        let port = go_port(port).ok_or_else(|| format!("{s:?}: invalid port {port:?}"))?;
        let ip = match host {
            None | Some("") => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some("localhost") => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(h) => h
                .parse()
                .map_err(|_| format!("{s:?}: bind address {h:?} is not an IP address"))?,
        };
        Ok(UpstreamArg {
            name: name.to_string(),
            kind,
            bind: BindAddr::Tcp(SocketAddr::new(ip, port)),
        })
    }
}

/// A port in Go's `strconv.ParseInt(s, 0, 16)` syntax: decimal, `0x` hex,
/// `0o`/leading-`0` octal, `0b` binary.
fn go_port(s: &str) -> Option<u16> {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if let Some(b) = s.strip_prefix("0b").or_else(|| s.strip_prefix("0B")) {
        (b, 2)
    } else if let Some(o) = s.strip_prefix("0o").or_else(|| s.strip_prefix("0O")) {
        (o, 8)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || digits.starts_with(['+', '-']) {
        return None;
    }
    u16::from_str_radix(digits, radix).ok()
}

/// One `-upstream-addr NAME=HOST:PORT[,HOST:PORT...]` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddrArg {
    /// The upstream these instances belong to.
    pub name: String,
    /// `HOST:PORT` strings, resolved when the configuration is built.
    pub addrs: Vec<String>,
}

impl FromStr for UpstreamAddrArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, list) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=HOST:PORT[,HOST:PORT...]"))?;
        if name.is_empty() {
            return Err(format!("{s:?}: missing upstream NAME before '='"));
        }
        let addrs: Vec<String> = list.split(',').map(|a| a.trim().to_string()).collect();
        for a in &addrs {
            let port = a.rsplit_once(':').map(|(_, p)| p);
            if !port.is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p > 0)) {
                return Err(format!("{s:?}: instance {a:?} is not HOST:PORT"));
            }
        }
        Ok(UpstreamAddrArg {
            name: name.to_string(),
            addrs,
        })
    }
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

/// For `-token`: any string is a token (an empty one means none, which
/// [`AgentConfig::resolve`](crate::config::agent::AgentConfig::resolve) decides, not the parser).
impl FromStr for Token {
    type Err = Infallible;

    fn from_str(s: &str) -> Result<Token, Infallible> {
        Ok(Token(s.to_string()))
    }
}
