//! What tests build and read: how to start the agent ([`AgentOpts`]), the
//! roots, instances and intentions it serves, the calls it logs and the
//! checks it holds.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::extract::Query;
use tokio::time::Instant;

use super::blocking::Params;
use crate::support::Pki;

/// How to start a [`FakeAgent`](super::FakeAgent).
#[derive(Clone)]
pub struct AgentOpts {
    /// `TrustDomain` in the roots answer (`<cluster-id>.consul`). Empty means
    /// the CA is not bootstrapped (leaf requests then fail with 500).
    pub trust_domain: String,
    /// The agent's datacenter: local services' `Datacenter` and the default
    /// for `?dc=`. Default `dc1`.
    pub datacenter: String,
    /// The agent's node name (in `/catalog/service`). Default `fake-agent`.
    pub node: String,
    /// When set, ACLs are on with default policy deny and this is the one
    /// token that works. Never printed.
    pub token: Option<String>,
    /// Root certificates (PEM) listed at start; the first is active.
    pub roots: Vec<String>,
    /// CA certificate and key files: leaves for services without a
    /// `set_leaf` are issued from them on first request.
    pub issuer: Option<(PathBuf, PathBuf)>,
}

impl Default for AgentOpts {
    fn default() -> AgentOpts {
        AgentOpts {
            trust_domain: ferry::identity::dev_ca::random_trust_domain(),
            datacenter: "dc1".into(),
            node: "fake-agent".into(),
            token: None,
            roots: Vec::new(),
            issuer: None,
        }
    }
}

impl AgentOpts {
    /// An agent whose CA is `pki`'s: its trust domain, its root, and leaves
    /// issued on demand for any service name.
    pub fn for_pki(pki: &Pki) -> AgentOpts {
        AgentOpts {
            trust_domain: pki.trust_domain().to_string(),
            roots: vec![pki.ca.cert_pem().to_string()],
            issuer: Some((pki.path("ca.pem"), pki.path("ca-key.pem"))),
            ..AgentOpts::default()
        }
    }

    /// Sets the agent's datacenter.
    pub fn datacenter(mut self, dc: &str) -> AgentOpts {
        self.datacenter = dc.into();
        self
    }

    /// Turns ACLs on: `token` is required on every request but roots.
    pub fn token(mut self, token: &str) -> AgentOpts {
        self.token = Some(token.into());
        self
    }
}

/// A CA root as `/agent/connect/ca/roots` lists it.
#[derive(Clone, Debug)]
pub struct Root {
    pub cert_pem: String,
    /// Cross-signed or signing intermediates; the one that signs leaves last.
    pub intermediates: Vec<String>,
    pub active: bool,
}

impl Root {
    /// The active root, without intermediates.
    pub fn active(cert_pem: &str) -> Root {
        Root {
            cert_pem: cert_pem.into(),
            intermediates: Vec::new(),
            active: true,
        }
    }

    /// A root kept after a rotation, no longer active.
    pub fn inactive(cert_pem: &str) -> Root {
        Root {
            active: false,
            ..Root::active(cert_pem)
        }
    }
}

/// A check or instance status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// One mesh endpoint of a service, as `/health/connect/<service>` lists it.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Where it listens: `Service.Address` and `Service.Port`.
    pub addr: SocketAddr,
    /// `Node.Datacenter`; `None` is the agent's.
    pub datacenter: Option<String>,
    /// Status of its service check (the node check always passes).
    pub health: Health,
    /// A Connect-native instance of the service itself rather than a
    /// `connect-proxy` sidecar for it.
    pub native: bool,
    /// Node name; default derived from the address.
    pub node: Option<String>,
    /// Leave `Service.Address` empty, so clients must use `Node.Address`.
    pub address_on_node: bool,
}

impl Instance {
    /// A passing sidecar proxy (`Kind: connect-proxy`) listening on `addr`.
    pub fn sidecar(addr: SocketAddr) -> Instance {
        Instance {
            addr,
            datacenter: None,
            health: Health::Passing,
            native: false,
            node: None,
            address_on_node: false,
        }
    }

    /// A passing Connect-native instance (`Connect.Native: true`) on `addr`.
    pub fn native(addr: SocketAddr) -> Instance {
        Instance {
            native: true,
            ..Instance::sidecar(addr)
        }
    }

    /// Places the instance in another datacenter (seen only with `?dc=`).
    pub fn in_dc(mut self, dc: &str) -> Instance {
        self.datacenter = Some(dc.into());
        self
    }

    /// Sets the status of its service check.
    pub fn with_health(mut self, health: Health) -> Instance {
        self.health = health;
        self
    }

    /// Leaves `Service.Address` empty; the address is only `Node.Address`.
    pub fn address_on_node(mut self) -> Instance {
        self.address_on_node = true;
        self
    }
}

/// What an L4 intention does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// A service intention (source → destination); either name may be `*`.
#[derive(Clone, Debug)]
pub struct Intention {
    pub source: String,
    pub destination: String,
    pub action: Action,
    /// Has HTTP permissions (L7): authorize always denies it (spec §3).
    pub l7: bool,
}

impl Intention {
    /// An L4 allow.
    pub fn allow(source: &str, destination: &str) -> Intention {
        Intention {
            source: source.into(),
            destination: destination.into(),
            action: Action::Allow,
            l7: false,
        }
    }

    /// An L4 deny.
    pub fn deny(source: &str, destination: &str) -> Intention {
        Intention {
            action: Action::Deny,
            ..Intention::allow(source, destination)
        }
    }

    /// An L7 intention (HTTP permissions), which authorize treats as deny.
    pub fn l7(source: &str, destination: &str) -> Intention {
        Intention {
            l7: true,
            ..Intention::allow(source, destination)
        }
    }
}

/// One request as the agent received it.
#[derive(Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    /// The raw query string, without `?`.
    pub query: String,
    /// The ACL token the agent used (`?token=`, `X-Consul-Token` or
    /// `Authorization: Bearer`), if any. Masked in `Debug`.
    pub token: Option<String>,
    /// The request body as text.
    pub body: String,
    pub at: Instant,
}

impl Call {
    /// The first value of query parameter `name` (`Some("")` for `?name`).
    pub fn param(&self, name: &str) -> Option<String> {
        Query::<Params>::try_from_uri(&format!("/?{}", self.query).parse().ok()?)
            .ok()?
            .0
            .get(name)
            .map(String::from)
    }
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let query: Vec<String> = self
            .query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some(("token", _)) => "token=<redacted>".to_string(),
                _ => p.to_string(),
            })
            .collect();
        let token = if self.token.is_some() { "yes" } else { "no" };
        write!(f, "{} {}", self.method, self.path)?;
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        write!(f, " (token: {token})")?;
        if !self.body.is_empty() {
            write!(f, " {}", self.body)?;
        }
        Ok(())
    }
}

/// A check registered with the agent, as a test reads it.
#[derive(Clone, Debug)]
pub struct CheckState {
    pub id: String,
    pub name: String,
    pub service_id: String,
    /// `ttl`, `tcp`, `http`, `alias`, ...
    pub kind: String,
    /// `passing`, `warning` or `critical` (TTL expiry applied).
    pub status: String,
    pub output: String,
    pub ttl: Option<Duration>,
    /// When it was last set through pass/warn/fail/update (`None`: never).
    pub updated: Option<Instant>,
    /// How many pass/warn/fail/update calls it has had.
    pub updates: u64,
}
