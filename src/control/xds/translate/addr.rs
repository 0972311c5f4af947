//! Envoy addresses as ferry can use them: an IP and port, or (where a
//! local side may be one) a Unix socket file.

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Address, Pipe};

use super::{refuse, Refused};
use crate::config::UnixBind;

/// An Envoy `Address` ferry can use: an IP and port, or a Unix socket.
pub(super) enum Addr {
    Ip(SocketAddr),
    Pipe(UnixBind),
}

pub(super) fn address(a: &Option<Address>, what: &str) -> Result<Addr, Refused> {
    match a.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => {
            let port = match s.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => p,
                _ => return refuse(what, "named ports are not supported"),
            };
            let ip = s
                .address
                .parse::<std::net::IpAddr>()
                .or_else(|_| refuse(what, format_args!("{:?} is not an IP address", s.address)))?;
            let port = u16::try_from(port).or_else(|_| refuse(what, "port out of range"))?;
            Ok(Addr::Ip(SocketAddr::new(ip, port)))
        }
        Some(address::Address::Pipe(p)) => pipe(p, what).map(Addr::Pipe),
        _ => refuse(what, "no socket address"),
    }
}

/// A `pipe` address: what Consul sends for `local_bind_socket_path` (with
/// `local_bind_socket_mode`, an octal string Consul parses into the
/// numeric `mode`: `"0640"` arrives as 416) and for
/// `local_service_socket_path` (no mode). The path must be absolute, as
/// registration mode requires of the same fields; mode 0 means "leave it
/// to the umask", as Envoy does.
fn pipe(p: &Pipe, what: &str) -> Result<UnixBind, Refused> {
    let path = &p.path;
    if path.is_empty() {
        return refuse(what, "pipe address with an empty path");
    }
    if path.starts_with('@') {
        return refuse(
            what,
            format_args!("pipe {path:?}: abstract unix sockets are not supported"),
        );
    }
    if !path.starts_with('/') {
        return refuse(
            what,
            format_args!("pipe path {path:?} is not absolute (ferry binds and dials socket files by absolute path only)"),
        );
    }
    let mode = match p.mode {
        0 => None,
        m if m <= 0o777 => Some(m),
        m => {
            return refuse(
                what,
                format_args!("pipe mode {m:#o} is not a file mode (at most 0o777)"),
            )
        }
    };
    Ok(UnixBind {
        path: path.into(),
        mode,
    })
}

/// [`address`] where only an IP and port make sense; `why` says why a
/// Unix socket does not.
pub(super) fn ip_addr(a: &Option<Address>, what: &str, why: &str) -> Result<SocketAddr, Refused> {
    match address(a, what)? {
        Addr::Ip(a) => Ok(a),
        Addr::Pipe(_) => refuse(what, format_args!("unix socket address refused: {why}")),
    }
}
