//! What the proxy will do, built once from the command line and validated
//! before anything binds. Nothing downstream re-validates.
//!
//! [`Config::from_args`] runs in named steps: the settings every mode
//! shares, then registration mode or flag mode (inbound, upstreams,
//! certificates, `-register`), and builds the [`Config`] once at the end.
//!
//! Owns: meaning and validation of what the user typed. Imports `cli` (what
//! was typed) and the types of the parts it configures; must never import
//! `app` or `control`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::authz::{IntentionError, Intentions};
use crate::cli::{DestinationType, ProxyArgs};
use crate::identity::tls::{Credentials, PemBundle, TlsError};
use crate::proxy::balancer::EjectionPolicy;
pub use crate::proxy::net::{BindAddr, UnixBind};
pub use crate::proxy::Timeouts;

mod addr;
pub mod agent;
mod control_plane;

use addr::{check_host_port, parse_addr, parse_listen, resolve};

use agent::{AgentConfig, AgentConfigError, Env, ProxyIdentity};

/// Why the configuration cannot be used. Each message names the flag or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("-service is required: the name of the service this proxy represents")]
    MissingService,
    #[error("-proxy-id/-sidecar-for take the configuration from a Consul agent; they cannot be used with -certs")]
    RegistrationStandalone,
    #[error("{0}")]
    Agent(#[from] AgentConfigError),
    #[error("-register needs -listen: the registration advertises the public listener")]
    RegisterWithoutListen,
    #[error("-register needs a Consul agent; it cannot be used with -certs")]
    RegisterStandalone,
    #[error("nothing to do: give -listen with -service-addr for inbound traffic, and/or -upstream for outbound")]
    NothingToDo,
    #[error("-listen requires -service-addr (where to forward allowed inbound connections)")]
    ListenWithoutServiceAddr,
    #[error(
        "-service-addr is set but -listen is not: there is no inbound listener to forward from"
    )]
    ServiceAddrWithoutListen,
    #[error("{flag} {value:?}: {why}")]
    BadAddr {
        flag: &'static str,
        value: String,
        why: String,
    },
    #[error("-upstream {0}: no instances; add -upstream-addr {0}=HOST:PORT")]
    NoInstances(String),
    #[error("-upstream-addr {0}: there is no -upstream {0}")]
    UnknownUpstream(String),
    #[error("-upstream {0}.query: prepared queries need a Consul agent; in standalone mode use -upstream {0}:PORT")]
    QueryInStandalone(String),
    #[error("-upstream {name} and -upstream {other} both bind {addr}")]
    DuplicateBind {
        name: String,
        other: String,
        addr: String,
    },
    #[error("{flag}: {why}")]
    BadValue { flag: &'static str, why: String },
    #[error("-certs {dir}: cannot read {file}: {source}")]
    CertFile {
        dir: PathBuf,
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("-certs {dir}: {source}")]
    Certs { dir: PathBuf, source: Box<TlsError> },
    #[error("{0}")]
    Intentions(#[from] IntentionError),
}

/// The public mTLS listener.
#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The local app, `host:port` or `unix:/path`, dialed for each allowed
    /// connection.
    pub service_addr: String,
    /// Who may connect.
    pub authz: AuthzSource,
}

/// Where intention decisions come from.
#[derive(Debug, Clone)]
pub enum AuthzSource {
    /// Static intentions from `-allow`/`-deny`/`-default-deny`.
    Static(Intentions),
    /// The agent's authorize API; while the agent is unreachable, a decision
    /// for the same source made within `fallback_window` is reused.
    Agent {
        fallback_window: Duration,
        /// Re-check interval for live connections when the token cannot
        /// watch intentions.
        recheck_every: Duration,
    },
    /// RBAC pushed by a control plane (xDS); open connections a new policy
    /// denies are closed.
    ControlPlane,
}

/// How an upstream's instances are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// Fixed addresses (standalone `-upstream-addr`).
    Static(Vec<SocketAddr>),
    /// Healthy instances from the agent, optionally in another datacenter.
    Service { datacenter: Option<String> },
    /// A prepared query executed through the agent.
    Query { datacenter: Option<String> },
    /// Pushed by a control plane (xDS endpoints), SNI included.
    ControlPlane,
}

/// One upstream listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Destination service (or prepared query) name; instances must present
    /// this service's identity.
    pub name: String,
    /// Local plaintext listener: TCP, or a Unix socket.
    pub bind: BindAddr,
    /// Where instances come from.
    pub discovery: Discovery,
    /// This upstream's own bound on finding a working instance (a
    /// registration's `connect_timeout_ms`); `None`: the global one.
    pub deadline: Option<Duration>,
    /// This upstream's own cap on open connections (a registration's
    /// `limits.max_connections`, xDS `circuit_breakers`); `None`: the
    /// global `-max-upstream-conns`.
    pub max_conns: Option<usize>,
    /// This upstream's own passive ejection (a registration's
    /// `passive_health_check`, xDS `outlier_detection`); `None`: the global
    /// `-eject-after`/`-eject-for`.
    pub ejection: Option<EjectionPolicy>,
}

/// Where our certificates come from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// Loaded and validated from `-certs` at startup.
    Files(Arc<Credentials>),
    /// Watched from the agent; nothing accepts mTLS until they arrive.
    Agent,
    /// Pushed by a control plane (xDS); nothing accepts mTLS until they arrive.
    ControlPlane,
}

/// Everything the proxy needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The service this proxy represents.
    pub service: String,
    /// Our certificates.
    pub certs: CertSource,
    /// How to reach the agent, when one is used.
    pub agent: Option<AgentConfig>,
    /// The admin listener (`-admin-addr`, or `-pprof-addr` alone).
    pub admin: Option<SocketAddr>,
    /// `-register`: register with the agent, with this `-register-id` suffix.
    pub register: Option<Option<String>>,
    /// Registration mode (`-proxy-id`/`-sidecar-for`): the service, public
    /// listener and upstreams come from this registration at startup.
    pub sidecar: Option<ProxyIdentity>,
    /// `-authz-fallback-window`, kept for listeners a registration defines.
    pub authz_fallback_window: Duration,
    /// `-reauthorize-interval`, likewise.
    pub reauthorize_interval: Duration,
    /// The public listener, if any.
    pub inbound: Option<InboundConfig>,
    /// Upstream listeners.
    pub upstreams: Vec<UpstreamConfig>,
    /// Phase timeouts.
    pub timeouts: Timeouts,
    /// Instances tried per upstream connection.
    pub upstream_attempts: u32,
    /// Passive ejection of failing instances.
    pub ejection: EjectionPolicy,
    /// Close connections idle this long (None: never).
    pub idle_timeout: Option<Duration>,
    /// Close connections this long after they started (None: never).
    pub max_lifetime: Option<Duration>,
    /// Caps on concurrent connections and handshakes.
    pub limits: Limits,
}

/// Caps on what a flood can make ferry hold (0: no cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `-max-conns`: inbound connections open at once.
    pub conns: usize,
    /// `-max-upstream-conns`: connections open at once per upstream.
    pub upstream_conns: usize,
    /// `-max-handshakes`: the budget of inbound TLS handshakes in progress;
    /// when full, the least promising one is closed to make room.
    pub handshakes: usize,
    /// `-max-handshakes-per-source`: the share of that budget one source
    /// address may hold.
    pub handshakes_per_source: usize,
}

/// What the flags say about where the proxy's identity, listeners and
/// certificates come from: the part of [`Config`] that differs between
/// registration mode and flag mode.
struct Plan {
    service: String,
    certs: CertSource,
    agent: Option<AgentConfig>,
    register: Option<Option<String>>,
    sidecar: Option<ProxyIdentity>,
    inbound: Option<InboundConfig>,
    upstreams: Vec<UpstreamConfig>,
}

/// Settings every mode shares: timeouts, limits, ejection, admin.
struct Common {
    timeouts: Timeouts,
    ejection: EjectionPolicy,
    idle_timeout: Option<Duration>,
    max_lifetime: Option<Duration>,
    limits: Limits,
    admin: Option<SocketAddr>,
    authz_fallback_window: Duration,
    reauthorize_interval: Duration,
}

impl Config {
    /// Builds and validates the configuration: reads certificate files in
    /// standalone mode (`-certs`), resolves how to reach the agent otherwise.
    /// Warnings (flags that have no effect) are returned for the caller to log.
    pub fn from_args(
        args: &ProxyArgs,
        env: &dyn Env,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let mut warnings = Vec::new();
        let common = common(args)?;
        let identity = ProxyIdentity::resolve(args, env);
        let plan = if identity != ProxyIdentity::None {
            registration_mode(args, env, identity, &mut warnings)?
        } else {
            flag_mode(args, env, &common, &mut warnings)?
        };
        let config = Config {
            service: plan.service,
            certs: plan.certs,
            agent: plan.agent,
            admin: common.admin,
            register: plan.register,
            sidecar: plan.sidecar,
            authz_fallback_window: common.authz_fallback_window,
            reauthorize_interval: common.reauthorize_interval,
            inbound: plan.inbound,
            upstreams: plan.upstreams,
            timeouts: common.timeouts,
            upstream_attempts: args.upstream_attempts,
            ejection: common.ejection,
            idle_timeout: common.idle_timeout,
            max_lifetime: common.max_lifetime,
            limits: common.limits,
        };
        Ok((config, warnings))
    }
}

/// Step 1: the settings every mode shares.
fn common(args: &ProxyArgs) -> Result<Common, ConfigError> {
    if args.upstream_attempts == 0 {
        return Err(ConfigError::BadValue {
            flag: "-upstream-attempts",
            why: "must be at least 1".into(),
        });
    }
    let timeouts = Timeouts {
        handshake: nonzero_duration("-handshake-timeout", args.handshake_timeout.0)?,
        local_connect: nonzero_duration("-local-connect-timeout", args.local_connect_timeout.0)?,
        upstream_connect: nonzero_duration(
            "-upstream-connect-timeout",
            args.upstream_connect_timeout.0,
        )?,
        upstream_deadline: nonzero_duration("-upstream-deadline", args.upstream_deadline.0)?,
    };
    let admin = match (&args.admin_addr, &args.pprof_addr) {
        (Some(a), _) => Some(parse_addr("-admin-addr", a)?),
        (None, Some(p)) if !p.is_empty() => Some(parse_addr("-pprof-addr", p)?),
        _ => None,
    };
    Ok(Common {
        timeouts,
        ejection: EjectionPolicy {
            after_failures: args.eject_after,
            duration: args.eject_for.0,
        },
        idle_timeout: Some(args.idle_timeout.0).filter(|d| !d.is_zero()),
        max_lifetime: Some(args.max_lifetime.0).filter(|d| !d.is_zero()),
        limits: Limits {
            conns: args.max_conns,
            upstream_conns: args.max_upstream_conns,
            handshakes: args.max_handshakes,
            handshakes_per_source: args.max_handshakes_per_source,
        },
        admin,
        authz_fallback_window: args.authz_fallback_window.0,
        reauthorize_interval: nonzero_duration(
            "-reauthorize-interval",
            args.reauthorize_interval.0,
        )?,
    })
}

/// Step 2a (`-proxy-id`/`-sidecar-for`): the registration decides the
/// service, listeners and upstreams at startup; flags that would say the
/// same are ignored with a warning.
fn registration_mode(
    args: &ProxyArgs,
    env: &dyn Env,
    identity: ProxyIdentity,
    warnings: &mut Vec<String>,
) -> Result<Plan, ConfigError> {
    if args.certs.is_some() {
        return Err(ConfigError::RegistrationStandalone);
    }
    let ignored: Vec<&str> = [
        ("-service", args.service.is_some()),
        ("-listen", args.listen.is_some()),
        ("-service-addr", args.service_addr.is_some()),
        ("-upstream", !args.upstream.is_empty()),
        ("-upstream-addr", !args.upstream_addr.is_empty()),
        ("-register", args.register),
    ]
    .iter()
    .filter(|(_, set)| *set)
    .map(|(f, _)| *f)
    .collect();
    if !ignored.is_empty() {
        warnings.push(format!(
            "{} ignored: with -proxy-id/-sidecar-for the proxy registration decides",
            ignored.join(", ")
        ));
    }
    Ok(Plan {
        service: String::new(),
        certs: CertSource::Agent,
        agent: Some(AgentConfig::resolve(&args.agent, env)?),
        register: None,
        sidecar: Some(identity),
        inbound: None,
        upstreams: Vec::new(),
    })
}

/// Step 2b: the flags say what to serve; certificates come from `-certs`
/// (standalone) or the agent.
fn flag_mode(
    args: &ProxyArgs,
    env: &dyn Env,
    common: &Common,
    warnings: &mut Vec<String>,
) -> Result<Plan, ConfigError> {
    let service = args
        .service
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or(ConfigError::MissingService)?;
    let inbound = inbound(args, common, warnings)?;
    let upstreams = upstreams(args, warnings)?;
    if inbound.is_none() && upstreams.is_empty() {
        return Err(ConfigError::NothingToDo);
    }
    let (certs, agent) = match &args.certs {
        Some(dir) => {
            let pem = read_cert_dir(dir, &service)?;
            let credentials =
                Credentials::new(&pem, &service).map_err(|source| ConfigError::Certs {
                    dir: dir.clone(),
                    source: Box::new(source),
                })?;
            (CertSource::Files(Arc::new(credentials)), None)
        }
        None => (
            CertSource::Agent,
            Some(AgentConfig::resolve(&args.agent, env)?),
        ),
    };
    let register = register(args, inbound.is_some(), agent.is_some(), warnings)?;
    Ok(Plan {
        service,
        certs,
        agent,
        register,
        sidecar: None,
        inbound,
        upstreams,
    })
}

/// The public listener from `-listen`, `-service-addr` and, standalone,
/// the static intentions.
fn inbound(
    args: &ProxyArgs,
    common: &Common,
    warnings: &mut Vec<String>,
) -> Result<Option<InboundConfig>, ConfigError> {
    let intention_flags = !args.allow.is_empty() || !args.deny.is_empty() || args.default_deny;
    let (listen, app) = match (&args.listen, &args.service_addr) {
        (Some(listen), Some(app)) => (listen, app),
        (Some(_), None) => return Err(ConfigError::ListenWithoutServiceAddr),
        (None, Some(_)) => return Err(ConfigError::ServiceAddrWithoutListen),
        (None, None) => {
            if intention_flags {
                warnings.push("-allow/-deny/-default-deny have no effect without -listen".into());
            }
            return Ok(None);
        }
    };
    let authz = if args.certs.is_some() {
        let intentions = Intentions::new(&args.allow, &args.deny, args.default_deny)?;
        if intentions.allows_are_moot() {
            warnings.push("-allow has no effect while the default is allow; add -default-deny (or -deny '*') to refuse everyone else".to_string());
        }
        AuthzSource::Static(intentions)
    } else {
        if intention_flags {
            warnings.push("-allow/-deny/-default-deny are ignored: with a Consul agent, intentions come from Consul".into());
        }
        AuthzSource::Agent {
            fallback_window: common.authz_fallback_window,
            recheck_every: common.reauthorize_interval,
        }
    };
    Ok(Some(InboundConfig {
        listen: parse_listen(listen)?,
        service_addr: check_host_port("-service-addr", app)?,
        authz,
    }))
}

/// The upstream listeners from `-upstream` and `-upstream-addr`.
fn upstreams(
    args: &ProxyArgs,
    warnings: &mut Vec<String>,
) -> Result<Vec<UpstreamConfig>, ConfigError> {
    let standalone = args.certs.is_some();
    // Keyed by name: a repeated -upstream NAME overrides the earlier one,
    // as in Consul's flag parser.
    let mut by_name = BTreeMap::new();
    for u in &args.upstream {
        if standalone && u.kind == DestinationType::PreparedQuery {
            return Err(ConfigError::QueryInStandalone(u.name.clone()));
        }
        if by_name
            .insert(u.name.clone(), (u.bind.clone(), u.kind))
            .is_some()
        {
            warnings.push(format!(
                "-upstream {} given more than once; the last one wins",
                u.name
            ));
        }
    }
    let mut instances: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
    for ua in &args.upstream_addr {
        if !by_name.contains_key(&ua.name) {
            return Err(ConfigError::UnknownUpstream(ua.name.clone()));
        }
        let list = instances.entry(ua.name.clone()).or_default();
        for a in &ua.addrs {
            list.push(resolve("-upstream-addr", a)?);
        }
    }
    let datacenter = args.agent.datacenter.clone().filter(|d| !d.is_empty());
    let mut upstreams = Vec::new();
    let mut binds: Vec<(BindAddr, String)> = Vec::new();
    for (name, (bind, kind)) in by_name {
        let port_zero = matches!(bind, BindAddr::Tcp(a) if a.port() == 0);
        if let Some((_, other)) = binds.iter().find(|(b, _)| *b == bind && !port_zero) {
            return Err(ConfigError::DuplicateBind {
                name,
                other: other.clone(),
                addr: bind.to_string(),
            });
        }
        binds.push((bind.clone(), name.clone()));
        let discovery = match instances.remove(&name) {
            Some(list) => Discovery::Static(list),
            None if standalone => return Err(ConfigError::NoInstances(name)),
            None if kind == DestinationType::PreparedQuery => Discovery::Query {
                datacenter: datacenter.clone(),
            },
            None => Discovery::Service {
                datacenter: datacenter.clone(),
            },
        };
        upstreams.push(UpstreamConfig {
            name,
            bind,
            discovery,
            deadline: None,
            max_conns: None,
            ejection: None,
        });
    }
    Ok(upstreams)
}

/// `-register` and `-register-id`: registering needs a public listener to
/// advertise and an agent to register with.
fn register(
    args: &ProxyArgs,
    has_inbound: bool,
    has_agent: bool,
    warnings: &mut Vec<String>,
) -> Result<Option<Option<String>>, ConfigError> {
    if !args.register {
        if args.register_id.is_some() {
            warnings.push("-register-id has no effect without -register".into());
        }
        return Ok(None);
    }
    if !has_inbound {
        return Err(ConfigError::RegisterWithoutListen);
    }
    if !has_agent {
        return Err(ConfigError::RegisterStandalone);
    }
    Ok(Some(args.register_id.clone()))
}

fn nonzero_duration(flag: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(ConfigError::BadValue {
            flag,
            why: "must be greater than 0".into(),
        })
    } else {
        Ok(d)
    }
}

/// Reads `DIR/ca.pem`, `DIR/<service>.pem` and `DIR/<service>-key.pem`.
pub fn read_cert_dir(dir: &Path, service: &str) -> Result<PemBundle, ConfigError> {
    let files = [
        dir.join("ca.pem"),
        dir.join(format!("{service}.pem")),
        dir.join(format!("{service}-key.pem")),
    ];
    let read = |f: &PathBuf| {
        std::fs::read_to_string(f).map_err(|source| ConfigError::CertFile {
            dir: dir.to_path_buf(),
            file: f.clone(),
            source,
        })
    };
    Ok(PemBundle {
        roots: read(&files[0])?,
        chain: read(&files[1])?,
        key: read(&files[2])?,
        origin: files.map(|f| f.display().to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: [(&str, &str); 1] = [("CONSUL_HTTP_ADDR", "127.0.0.1:8500")];

    fn args(flags: &[&str]) -> ProxyArgs {
        let mut argv = vec!["ferry"];
        argv.extend_from_slice(flags);
        crate::cli::parse(argv).expect("flags parse").proxy
    }

    fn config(flags: &[&str]) -> Result<(Config, Vec<String>), ConfigError> {
        Config::from_args(&args(flags), &AGENT)
    }

    #[test]
    fn common_settings_are_checked_before_the_mode() {
        let cases: [(&[&str], &str); 4] = [
            (&["-upstream-attempts", "0"], "-upstream-attempts"),
            (&["-handshake-timeout", "0"], "-handshake-timeout"),
            (&["-reauthorize-interval", "0"], "-reauthorize-interval"),
            (&["-admin-addr", "nowhere"], "-admin-addr"),
        ];
        for (flags, flag) in cases {
            let mut all = flags.to_vec();
            all.extend(["-sidecar-for", "api-1"]);
            let e = config(&all).expect_err("refused");
            assert!(e.to_string().starts_with(flag), "{flags:?}: {e}");
        }
    }

    #[test]
    fn registration_mode_leaves_listeners_to_the_registration() {
        let (c, warnings) =
            config(&["-sidecar-for", "api-1", "-service", "x", "-register"]).unwrap();
        assert_eq!(c.sidecar, Some(ProxyIdentity::SidecarFor("api-1".into())));
        assert!(c.inbound.is_none() && c.upstreams.is_empty() && c.register.is_none());
        assert!(matches!(c.certs, CertSource::Agent) && c.agent.is_some());
        assert_eq!(
            warnings,
            ["-service, -register ignored: with -proxy-id/-sidecar-for the proxy registration decides"]
        );
        let e = config(&["-proxy-id", "p", "-certs", "/nonexistent"])
            .err()
            .unwrap();
        assert!(matches!(e, ConfigError::RegistrationStandalone));
    }

    #[test]
    fn flag_mode_builds_listeners_from_flags() {
        let (c, warnings) = config(&[
            "-service",
            "web",
            "-listen",
            ":21000",
            "-service-addr",
            "127.0.0.1:8080",
            "-upstream",
            "db:9191",
            "-upstream",
            "cache.query:9292",
            "-datacenter",
            "dc2",
            "-register",
            "-register-id",
            "1",
            "-allow",
            "api",
        ])
        .unwrap();
        assert_eq!(c.service, "web");
        let i = c.inbound.as_ref().unwrap();
        assert_eq!(i.listen, "0.0.0.0:21000".parse().unwrap());
        assert!(matches!(i.authz, AuthzSource::Agent { .. }));
        let names: Vec<_> = c
            .upstreams
            .iter()
            .map(|u| (u.name.as_str(), &u.discovery))
            .collect();
        assert_eq!(
            names,
            [
                (
                    "cache",
                    &Discovery::Query {
                        datacenter: Some("dc2".into())
                    }
                ),
                (
                    "db",
                    &Discovery::Service {
                        datacenter: Some("dc2".into())
                    }
                ),
            ]
        );
        assert_eq!(c.register, Some(Some("1".into())));
        assert_eq!(
            warnings,
            ["-allow/-deny/-default-deny are ignored: with a Consul agent, intentions come from Consul"]
        );
    }

    #[test]
    fn inbound_and_register_rules_name_the_flag() {
        let cases: [(&[&str], &str); 5] = [
            (
                &["-service", "web", "-listen", ":1"],
                "-listen requires -service-addr",
            ),
            (
                &["-service", "web", "-service-addr", "a:1"],
                "-service-addr is set but -listen is not",
            ),
            (&["-service", "web"], "nothing to do"),
            (
                &["-service", "web", "-upstream", "db:1", "-register"],
                "-register needs -listen",
            ),
            (
                &["-listen", ":1", "-service-addr", "a:1"],
                "-service is required",
            ),
        ];
        for (flags, want) in cases {
            let e = config(flags).expect_err("refused");
            assert!(e.to_string().starts_with(want), "{flags:?}: {e}");
        }
    }

    #[test]
    fn upstream_flags_merge_by_name_and_refuse_clashes() {
        let mut w = Vec::new();
        let ups = upstreams(
            &args(&[
                "-upstream",
                "db:9191",
                "-upstream",
                "db:9192",
                "-upstream-addr",
                "db=127.0.0.1:1",
            ]),
            &mut w,
        )
        .unwrap();
        assert_eq!(ups.len(), 1);
        assert_eq!(
            ups[0].bind,
            BindAddr::Tcp("127.0.0.1:9192".parse().unwrap()),
            "the last -upstream db wins"
        );
        assert_eq!(
            ups[0].discovery,
            Discovery::Static(vec!["127.0.0.1:1".parse().unwrap()])
        );
        assert_eq!(w, ["-upstream db given more than once; the last one wins"]);

        let clash = upstreams(
            &args(&["-upstream", "a:9191", "-upstream", "b:9191"]),
            &mut w,
        );
        assert!(matches!(clash, Err(ConfigError::DuplicateBind { .. })));
        let unknown = upstreams(
            &args(&["-upstream", "a:9191", "-upstream-addr", "b=127.0.0.1:1"]),
            &mut w,
        );
        assert!(matches!(unknown, Err(ConfigError::UnknownUpstream(n)) if n == "b"));
    }

    #[test]
    fn register_id_alone_is_only_a_warning() {
        let mut w = Vec::new();
        let r = register(&args(&["-register-id", "x"]), true, true, &mut w).unwrap();
        assert_eq!(r, None);
        assert_eq!(w, ["-register-id has no effect without -register"]);
        let standalone = register(&args(&["-register"]), true, false, &mut w);
        assert!(matches!(standalone, Err(ConfigError::RegisterStandalone)));
    }
}
