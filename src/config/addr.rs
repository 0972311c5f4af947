//! Addresses as the flags spell them: `HOST:PORT`, `:PORT` for every
//! address, `unix:/PATH` where a local side may be a Unix socket, names
//! resolved once at startup (IPv4 preferred).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

use super::ConfigError;

/// `-listen HOST:PORT`; an empty host means every address, as in Consul.
pub(super) fn parse_listen(s: &str) -> Result<SocketAddr, ConfigError> {
    parse_addr("-listen", s)
}

/// A listen address for `flag`: `HOST:PORT`, or `:PORT` for every address.
pub(super) fn parse_addr(flag: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    let bad = |why: &str| ConfigError::BadAddr {
        flag,
        value: s.to_string(),
        why: why.to_string(),
    };
    if let Some(port) = s.strip_prefix(':') {
        let port = port.parse::<u16>().map_err(|_| bad("invalid port"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    resolve(flag, s)
}

pub(super) fn check_host_port(flag: &'static str, s: &str) -> Result<String, ConfigError> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.starts_with('/') {
            return Ok(s.to_string());
        }
        return Err(ConfigError::BadAddr {
            flag,
            value: s.to_string(),
            why: "expected unix:/ABSOLUTE/PATH".into(),
        });
    }
    let ok = s
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if ok {
        Ok(s.to_string())
    } else {
        Err(ConfigError::BadAddr {
            flag,
            value: s.to_string(),
            why: "expected HOST:PORT".into(),
        })
    }
}

pub(super) fn resolve(flag: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    let bad = |why: String| ConfigError::BadAddr {
        flag,
        value: s.to_string(),
        why,
    };
    let mut addrs = s.to_socket_addrs().map_err(|e| bad(e.to_string()))?;
    // Prefer IPv4 for names like "localhost" that resolve both ways: the
    // listeners we point at are usually bound on 127.0.0.1.
    let all: Vec<SocketAddr> = addrs.by_ref().collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| bad("resolves to no address".into()))
}
