//! The command line, flag for flag in the style of `consul connect proxy`.
//!
//! Consul's CLI uses Go's `flag` package: long flags take one dash or two
//! (`-service web`, `--service=web`), booleans are set by their bare name or
//! `-flag=true|false`, and a repeated flag overrides the earlier one (except
//! the repeatable ones). clap wants two dashes, so [`parse`] first rewrites
//! one-dash long flags (it knows which words are flags and which take a
//! value, from clap's own definition) and then lets clap do the rest.
//!
//! Every flag of `consul connect proxy` is accepted with Consul's meaning and
//! default. The Consul-agent flags Consul shares between its commands
//! (`-http-addr`, `-token`, TLS, `-datacenter`, `-stale`) live in
//! [`AgentArgs`], flattened into [`ProxyArgs`]; the flags that choose how the
//! proxy is configured (`-proxy-id`, `-sidecar-for`, `-register`, ...) and
//! logging live in [`ProxyArgs`] itself.
//!
//! This module only says what the user typed; `config` decides what it means.
//! In particular no flag here reads the environment (clap's `env` attribute is
//! deliberately not used): the fallbacks to `CONSUL_HTTP_ADDR`,
//! `CONNECT_PROXY_ID` and the others are applied by
//! [`AgentConfig::resolve`](crate::config::agent::AgentConfig::resolve) and
//! [`ProxyIdentity::resolve`](crate::config::agent::ProxyIdentity::resolve)
//! through the `Env` trait, so tests never touch the process environment.
//!
//! Owns: clap structs ([`Cli`]), Go-flag compatibility (`goflags`) and the
//! flag value types ([`UpstreamArg`], [`GoDuration`], [`Token`], ...). Must
//! never import anything of ferry: every other part reads from it.

// The doc comments of the flags are their --help text, written for a
// terminal: <placeholders> and [optional] parts are meant literally.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};
use tracing::level_filters::LevelFilter;

pub mod envoy;
mod goflags;
mod values;

pub(crate) use goflags::go_bool;
pub use values::{
    BindAddr, DestinationType, GoDuration, Token, UnixBind, UpstreamAddrArg, UpstreamArg,
};

/// ferry: a small, fast L4 sidecar proxy for Consul service mesh.
#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "A small, fast L4 sidecar proxy for Consul service mesh (a drop-in for `consul connect proxy`).",
    args_override_self = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// A helper command instead of running the proxy.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Proxy flags.
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

/// Helper commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a development CA (once) and a Consul-shaped leaf per service.
    Certs(CertsArgs),
    /// Run the local mesh demo: dev certs, a service, two ferries, real traffic.
    Demo(DemoArgs),
}

/// `ferry certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory for ca.pem, ca-key.pem, <service>.pem and <service>-key.pem.
    #[arg(long, default_value = "certs")]
    pub dir: PathBuf,
    /// Trust domain for a new CA (<uuid>.consul); random if not given.
    /// An existing CA in -dir is reused and must match.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Datacenter written into each leaf's SPIFFE ID.
    #[arg(long, default_value = "dc1")]
    pub dc: String,
    /// Leaf lifetime (Go duration; Consul's default is 72h).
    #[arg(long, default_value = "72h")]
    pub ttl: GoDuration,
    /// Services to issue leaves for.
    #[arg(required = true, value_name = "SERVICE")]
    pub services: Vec<String>,
}

/// `ferry demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the demo keeps its dev certificates.
    #[arg(long, default_value = "certs")]
    pub dir: PathBuf,
}

/// The proxy's own flags.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Agent API mode: the ID of a connect-proxy service already registered
    /// on the local agent; the proxy takes its configuration from that
    /// registration. Takes precedence over -sidecar-for. Default: none.
    /// Environment: CONNECT_PROXY_ID (used when the flag is not given).
    #[arg(long, value_name = "ID")]
    pub proxy_id: Option<String>,

    /// Agent API mode: the ID of a service instance on the local agent; the
    /// proxy becomes the one connect-proxy registered with
    /// Proxy.DestinationServiceID set to it (more than one is an error).
    /// Default: none. Environment: CONNECT_SIDECAR_FOR (used when the flag is
    /// not given).
    #[arg(long, value_name = "ID")]
    pub sidecar_for: Option<String>,

    /// Name of the service this proxy represents; its leaf certificate is for this name.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,

    /// Public mTLS listener, HOST:PORT (an empty host means all addresses).
    /// Requires -service-addr.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,

    /// The local application that allowed inbound connections are forwarded to.
    /// This hop is plain TCP: keep it on loopback.
    #[arg(long, value_name = "HOST:PORT")]
    pub service_addr: Option<String>,

    /// Register this proxy with the local agent as a connect-proxy service
    /// (ID SERVICE-proxy, or SERVICE-proxy-ID with -register-id ID) with a
    /// TTL check it keeps passing, and deregister it on shutdown. Needs
    /// -service and -listen.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = go_bool)]
    pub register: bool,

    /// With -register: a suffix that makes the registered ID
    /// SERVICE-proxy-ID, to tell several proxies of one service apart.
    /// Default: none.
    #[arg(long, value_name = "ID")]
    pub register_id: Option<String>,

    /// A local plaintext listener for a destination service:
    /// NAME[.TYPE]:[ADDR:]PORT (ADDR defaults to 127.0.0.1; TYPE is service or query),
    /// or NAME[.TYPE]:unix:/PATH for a Unix socket. Repeatable.
    #[arg(long, value_name = "NAME:[ADDR:]PORT")]
    pub upstream: Vec<UpstreamArg>,

    /// Standalone mode: trust DIR/ca.pem and present DIR/<service>.pem with
    /// DIR/<service>-key.pem. No Consul agent is contacted.
    #[arg(long, value_name = "DIR")]
    pub certs: Option<PathBuf>,

    /// Standalone mode: static instances of upstream NAME,
    /// NAME=HOST:PORT[,HOST:PORT...]. Repeatable.
    #[arg(long, value_name = "NAME=HOST:PORT,...")]
    pub upstream_addr: Vec<UpstreamAddrArg>,

    /// Standalone intentions: allow source service SRC (`*` for any). Repeatable.
    #[arg(long, value_name = "SRC")]
    pub allow: Vec<String>,

    /// Standalone intentions: deny source service SRC (`*` for any). Repeatable.
    #[arg(long, value_name = "SRC")]
    pub deny: Vec<String>,

    /// Standalone intentions: deny sources no -allow names (the default is allow).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = go_bool)]
    pub default_deny: bool,

    /// Bound on a TLS handshake, inbound and outbound.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub handshake_timeout: GoDuration,

    /// Bound on connecting to the local application.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub local_connect_timeout: GoDuration,

    /// Bound on one TCP connect to an upstream instance.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub upstream_connect_timeout: GoDuration,

    /// Instances tried per upstream connection before giving up.
    #[arg(long, default_value = "3", value_name = "N")]
    pub upstream_attempts: u32,

    /// Bound on finding a working upstream instance, all attempts together.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub upstream_deadline: GoDuration,

    /// Consecutive failures after which an instance is ejected (0: never).
    #[arg(long, default_value = "3", value_name = "N")]
    pub eject_after: u32,

    /// How long an ejected instance is skipped before it is tried again.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub eject_for: GoDuration,

    /// Close a connection when no byte has moved either way for this long (0: never).
    #[arg(long, default_value = "0", value_name = "DURATION")]
    pub idle_timeout: GoDuration,

    /// With a Consul agent: when the agent cannot be reached, an
    /// authorization made for the same source service within this window is
    /// reused instead of refusing the connection (0 turns the fallback off).
    /// Default 10s: long enough to ride out an agent restart, short enough
    /// that an intention revoked just before the outage is honoured soon.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub authz_fallback_window: GoDuration,

    /// With a Consul agent whose ACL token cannot read intentions: how often
    /// live connections are re-authorized, so that a revoked intention
    /// closes them. (When it can, changes are watched and acted on at once.)
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub reauthorize_interval: GoDuration,

    /// Most established inbound connections (handshake done) at once; while
    /// all are taken, newcomers are refused at accept (0: no limit). Pending
    /// handshakes have their own budget, -max-handshakes. Default 1024: at up to about 64 KiB each (buffers and
    /// TLS state) that is 64 MiB, within a sidecar's usual 128 MB, and far
    /// above what one service instance normally holds.
    #[arg(long, default_value = "1024", value_name = "N")]
    pub max_conns: usize,

    /// Most connections open at once per upstream listener (0: no limit).
    /// Default 1024, for the same reason as -max-conns.
    #[arg(long, default_value = "1024", value_name = "N")]
    pub max_upstream_conns: usize,

    /// Budget of inbound TLS handshakes in progress (0: no budget). When it
    /// is full a newcomer is not refused: the pending handshake that made
    /// least progress (sent nothing, then a partial ClientHello), oldest
    /// first, is closed to make room, and while it is three quarters full a
    /// handshake older than 2 s is closed too. Default 128: a handshake costs
    /// about a quarter of a millisecond of CPU, so 128 is far more than one
    /// core finishes in a handshake timeout's worth of honest traffic, while
    /// a flood of clients that never finish holds no more than that.
    #[arg(long, default_value = "128", value_name = "N")]
    pub max_handshakes: usize,

    /// Share of -max-handshakes one source address may hold (0: none): when
    /// the budget is full, among handshakes that made the same progress, one
    /// older than 250 ms from an address over its share gives first.
    /// Default 32, a quarter of the default budget.
    #[arg(long, default_value = "32", value_name = "N")]
    pub max_handshakes_per_source: usize,

    /// Close any connection this long after it started (0: never).
    #[arg(long, default_value = "0", value_name = "DURATION")]
    pub max_lifetime: GoDuration,

    /// On SIGINT/SIGTERM, how long open connections may finish before they
    /// are closed. Default 4s: just under Nomad's default 5s kill_timeout, so
    /// the drain ends before Nomad escalates to SIGKILL.
    #[arg(long, default_value = "4s", value_name = "DURATION")]
    pub drain_timeout: GoDuration,

    /// Log level: trace, debug, info, warn or error, in any case; Consul's
    /// spellings (TRACE, DEBUG, INFO, WARN, ERR, ERROR) work too.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,

    /// Write log lines as JSON objects, one per line, instead of text.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = go_bool)]
    pub log_json: bool,

    /// Consul serves Go's pprof profiles here; ferry has none, and serves
    /// its admin endpoints (see -admin-addr) on this address instead, unless
    /// -admin-addr is also given. Default: none (disabled).
    #[arg(long, value_name = "HOST:PORT")]
    pub pprof_addr: Option<String>,

    /// Admin listener: /metrics (Prometheus), /ready, /live, /status.
    /// Plain HTTP: keep it on loopback or a management network.
    /// Default: none (disabled).
    #[arg(long, value_name = "HOST:PORT")]
    pub admin_addr: Option<String>,

    /// How to reach the local Consul agent.
    #[command(flatten)]
    pub agent: AgentArgs,
}

/// How to reach the local Consul agent: the HTTP API flags Consul's commands
/// share (`command/flags/http.go`, client and server flag sets).
///
/// Each value is what was typed, or `None`; an empty value counts as not
/// given, as in Consul. The environment fallbacks, the defaults and the checks
/// are applied by
/// [`AgentConfig::resolve`](crate::config::agent::AgentConfig::resolve).
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Consul agent")]
pub struct AgentArgs {
    /// Address of the agent's HTTP API: HOST:PORT, http://HOST:PORT[/PREFIX],
    /// https://HOST:PORT[/PREFIX] or unix:///PATH/TO/SOCKET. Default
    /// http://127.0.0.1:8500; https is the default scheme when
    /// CONSUL_HTTP_SSL=true. Environment: CONSUL_HTTP_ADDR.
    #[arg(long, value_name = "ADDR")]
    pub http_addr: Option<String>,

    /// ACL token sent to the agent. Default: none (the agent then uses its
    /// own default token). Environment: CONSUL_HTTP_TOKEN. -token-file wins
    /// over this; this wins over CONSUL_HTTP_TOKEN_FILE.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<Token>,

    /// File holding the ACL token (surrounding whitespace is ignored); it
    /// must be readable. Wins over -token. Default: none. Environment:
    /// CONSUL_HTTP_TOKEN_FILE.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// PEM file of CA certificates for verifying the agent's HTTPS
    /// certificate. Default: none. Environment: CONSUL_CACERT.
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,

    /// Directory of PEM CA certificates for verifying the agent's HTTPS
    /// certificate. Default: none. Environment: CONSUL_CAPATH.
    #[arg(long, value_name = "PATH")]
    pub ca_path: Option<PathBuf>,

    /// Client certificate (PEM) for agents with verify_incoming; needs
    /// -client-key. Default: none. Environment: CONSUL_CLIENT_CERT.
    #[arg(long, value_name = "PATH")]
    pub client_cert: Option<PathBuf>,

    /// Private key (PEM) of -client-cert. Default: none. Environment:
    /// CONSUL_CLIENT_KEY.
    #[arg(long, value_name = "PATH")]
    pub client_key: Option<PathBuf>,

    /// Server name for SNI and for checking the agent's certificate; a
    /// trailing :PORT is dropped. Default: the host of -http-addr.
    /// Environment: CONSUL_TLS_SERVER_NAME. (CONSUL_HTTP_SSL_VERIFY=false
    /// turns certificate verification off; it has no flag, as in Consul.)
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,

    /// Datacenter to query, sent as ?dc= on the agent API calls that take
    /// it. Default: the agent's own datacenter.
    #[arg(long, value_name = "DC")]
    pub datacenter: Option<String>,

    /// Accepted for compatibility and ignored with a warning when set: Consul
    /// declares it for this command but never applies it to the proxy's
    /// queries.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = go_bool)]
    pub stale: bool,
}

/// `-log-level`: ferry's names and Consul's (`TRACE`, `DEBUG`, `INFO`,
/// `WARN`, `ERR`/`ERROR`), case-insensitively, plus `off`. `None` for
/// anything else.
///
/// ```
/// use ferry::cli::log_level;
/// use tracing::level_filters::LevelFilter;
/// assert_eq!(log_level("ERR"), Some(LevelFilter::ERROR));
/// assert_eq!(log_level("loud"), None);
/// ```
pub fn log_level(s: &str) -> Option<LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "trace" => Some(LevelFilter::TRACE),
        "debug" => Some(LevelFilter::DEBUG),
        "info" => Some(LevelFilter::INFO),
        "warn" => Some(LevelFilter::WARN),
        "err" | "error" => Some(LevelFilter::ERROR),
        "off" => Some(LevelFilter::OFF),
        _ => None,
    }
}

/// The exit code for bad flags and bad files: BSD's `EX_USAGE`, as
/// linkerd's proxy uses.
pub const EXIT_USAGE: u8 = 64;

/// Prints a parse error (or the `--help`/`--version` text clap returns as
/// one) and gives the exit code: [`EXIT_USAGE`], or success for help.
pub fn exit_for(e: &clap::Error) -> std::process::ExitCode {
    let _ = e.print();
    if e.use_stderr() {
        std::process::ExitCode::from(EXIT_USAGE)
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// Parses the process arguments, accepting Go-style flags.
pub fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    Cli::try_parse_from(goflags::go_style(
        Cli::command(),
        args.into_iter().map(Into::into).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    #[test]
    fn accepts_go_style_flags() {
        for args in [
            &["ferry", "-service", "web", "-listen", ":8443"][..],
            &["ferry", "-service=web", "--listen", ":8443"],
            &["ferry", "--service=web", "--listen=:8443"],
        ] {
            let cli = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(cli.proxy.service.as_deref(), Some("web"), "{args:?}");
            assert_eq!(cli.proxy.listen.as_deref(), Some(":8443"), "{args:?}");
        }
    }

    #[test]
    fn values_may_start_with_a_dash_and_last_flag_wins() {
        let cli = parse([
            "ferry", "-service", "-odd-", "-service", "web", "-allow", "-x",
        ])
        .unwrap();
        assert_eq!(cli.proxy.service.as_deref(), Some("web"));
        assert_eq!(cli.proxy.allow, ["-x"]);
    }

    #[test]
    fn go_booleans() {
        assert!(
            parse(["ferry", "-default-deny"])
                .unwrap()
                .proxy
                .default_deny
        );
        assert!(
            parse(["ferry", "-default-deny=true"])
                .unwrap()
                .proxy
                .default_deny
        );
        assert!(
            !parse(["ferry", "-default-deny=false"])
                .unwrap()
                .proxy
                .default_deny
        );
        assert!(!parse(["ferry"]).unwrap().proxy.default_deny);
        assert!(parse(["ferry", "-default-deny=maybe"]).is_err());
    }

    #[test]
    fn every_consul_connect_proxy_flag_is_accepted() {
        // `consul connect proxy` (command/connect/proxy/proxy.go with the
        // client and server flag sets of command/flags/http.go).
        let consul = [
            "proxy-id",
            "sidecar-for",
            "log-level",
            "log-json",
            "pprof-addr",
            "service",
            "upstream",
            "service-addr",
            "listen",
            "register",
            "register-id",
            "http-addr",
            "token",
            "token-file",
            "ca-file",
            "ca-path",
            "client-cert",
            "client-key",
            "tls-server-name",
            "datacenter",
            "stale",
        ];
        let cmd = Cli::command();
        let ours: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
        for flag in consul {
            assert!(ours.contains(&flag), "-{flag} is missing");
        }
    }

    #[test]
    fn consul_flags_in_go_style() {
        let p = parse([
            "ferry",
            "-register",
            "-register-id",
            "2",
            "-proxy-id=web-sidecar-proxy",
            "-sidecar-for",
            "web",
            "-log-json",
            "-pprof-addr",
            ":6060",
            "-http-addr",
            "unix:///tmp/c.sock",
            "-token",
            "-starts-with-a-dash",
            "-token-file=/run/token",
            "-ca-file",
            "/ca.pem",
            "-ca-path=/cas",
            "-client-cert",
            "/c.pem",
            "-client-key",
            "/k.pem",
            "-tls-server-name",
            "consul.local:8501",
            "-datacenter",
            "dc2",
            "-stale",
        ])
        .unwrap()
        .proxy;
        assert!(p.register);
        assert_eq!(p.register_id.as_deref(), Some("2"));
        assert_eq!(p.proxy_id.as_deref(), Some("web-sidecar-proxy"));
        assert_eq!(p.sidecar_for.as_deref(), Some("web"));
        assert!(p.log_json);
        assert_eq!(p.pprof_addr.as_deref(), Some(":6060"));
        let a = &p.agent;
        assert_eq!(a.http_addr.as_deref(), Some("unix:///tmp/c.sock"));
        assert_eq!(
            a.token.as_ref().map(Token::secret),
            Some("-starts-with-a-dash")
        );
        assert_eq!(a.token_file, Some(PathBuf::from("/run/token")));
        assert_eq!(a.ca_file, Some(PathBuf::from("/ca.pem")));
        assert_eq!(a.ca_path, Some(PathBuf::from("/cas")));
        assert_eq!(a.client_cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(a.client_key, Some(PathBuf::from("/k.pem")));
        assert_eq!(a.tls_server_name.as_deref(), Some("consul.local:8501"));
        assert_eq!(a.datacenter.as_deref(), Some("dc2"));
        assert!(a.stale);
    }

    #[test]
    fn consul_flag_defaults() {
        let p = parse(["ferry"]).unwrap().proxy;
        assert!(!p.register && !p.log_json && !p.agent.stale);
        assert_eq!(p.log_level, "info");
        assert!(p.proxy_id.is_none() && p.sidecar_for.is_none() && p.register_id.is_none());
        assert!(p.pprof_addr.is_none());
        let a = p.agent;
        assert!(a.http_addr.is_none() && a.token.is_none() && a.token_file.is_none());
        assert!(a.ca_file.is_none() && a.ca_path.is_none() && a.tls_server_name.is_none());
        assert!(a.client_cert.is_none() && a.client_key.is_none() && a.datacenter.is_none());
    }

    #[test]
    fn consul_go_booleans() {
        type Get = fn(&ProxyArgs) -> bool;
        let cases: [(&[&str], Get, bool); 9] = [
            (&["-register"], |p| p.register, true),
            (&["-register=true"], |p| p.register, true),
            (&["-register=false"], |p| p.register, false),
            (&["-register=0"], |p| p.register, false),
            (&["-log-json"], |p| p.log_json, true),
            (&["--log-json=F"], |p| p.log_json, false),
            (&["-stale"], |p| p.agent.stale, true),
            (&["-stale=false"], |p| p.agent.stale, false),
            // A Go boolean never takes the next word as its value.
            (&["-register", "-service", "web"], |p| p.register, true),
        ];
        for (args, get, want) in cases {
            let argv = std::iter::once("ferry").chain(args.iter().copied());
            let cli = parse(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(get(&cli.proxy), want, "{args:?}");
        }
        for bad in ["-register=maybe", "-log-json=yes", "-stale=2"] {
            assert!(parse(["ferry", bad]).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn the_token_is_not_in_debug_or_help() {
        let cli = parse(["ferry", "-token", "s3cret-token"]).unwrap();
        assert!(!format!("{cli:?}").contains("s3cret-token"));
        assert!(!format!("{cli:#?}").contains("s3cret-token"));
        let help = Cli::command().render_long_help().to_string();
        for var in [
            "CONSUL_HTTP_ADDR",
            "CONSUL_HTTP_SSL",
            "CONSUL_HTTP_TOKEN",
            "CONSUL_HTTP_TOKEN_FILE",
            "CONSUL_CACERT",
            "CONSUL_CAPATH",
            "CONSUL_CLIENT_CERT",
            "CONSUL_CLIENT_KEY",
            "CONSUL_TLS_SERVER_NAME",
            "CONNECT_PROXY_ID",
            "CONNECT_SIDECAR_FOR",
        ] {
            assert!(help.contains(var), "--help does not mention {var}");
        }
        // No default is printed for the token: it has none, and clap's
        // `env` attribute (which could show a value) is not used.
        let token_help = help
            .split("--token <TOKEN>")
            .nth(1)
            .and_then(|rest| rest.split("--token-file").next())
            .expect("-token in --help");
        assert!(!token_help.contains("[default"), "{token_help}");
        assert!(!token_help.contains("[env"), "{token_help}");
    }

    #[test]
    fn log_levels_in_both_spellings() {
        let ok = [
            ("trace", LevelFilter::TRACE),
            ("TRACE", LevelFilter::TRACE),
            ("debug", LevelFilter::DEBUG),
            ("DEBUG", LevelFilter::DEBUG),
            ("info", LevelFilter::INFO),
            ("INFO", LevelFilter::INFO),
            ("Info", LevelFilter::INFO),
            ("warn", LevelFilter::WARN),
            ("WARN", LevelFilter::WARN),
            ("err", LevelFilter::ERROR),
            ("ERR", LevelFilter::ERROR),
            ("error", LevelFilter::ERROR),
            ("ERROR", LevelFilter::ERROR),
            ("off", LevelFilter::OFF),
        ];
        for (s, want) in ok {
            assert_eq!(log_level(s), Some(want), "{s}");
        }
        for bad in ["", "loud", "warning", "3", " info"] {
            assert_eq!(log_level(bad), None, "{bad:?} accepted");
        }
    }

    #[test]
    fn subcommands_take_go_style_flags_too() {
        let cli = parse(["ferry", "certs", "-dir", "/tmp/x", "-ttl=1h", "web", "db"]).unwrap();
        let Some(Command::Certs(c)) = cli.command else {
            panic!("not certs")
        };
        assert_eq!(c.dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.ttl.0, Duration::from_secs(3600));
        assert_eq!(c.services, ["web", "db"]);
    }

    #[test]
    fn parses_upstreams_like_consul() {
        let ok = [
            ("db:9191", "db", DestinationType::Service, "127.0.0.1:9191"),
            (
                "db:10.0.0.1:9191",
                "db",
                DestinationType::Service,
                "10.0.0.1:9191",
            ),
            (
                "db.service:9191",
                "db",
                DestinationType::Service,
                "127.0.0.1:9191",
            ),
            (
                "db.query:9191",
                "db",
                DestinationType::PreparedQuery,
                "127.0.0.1:9191",
            ),
            (
                "db:0x23e7",
                "db",
                DestinationType::Service,
                "127.0.0.1:9191",
            ),
            (
                "db:021747",
                "db",
                DestinationType::Service,
                "127.0.0.1:9191",
            ),
            (
                "db:[::1]:9191",
                "db",
                DestinationType::Service,
                "[::1]:9191",
            ),
        ];
        for (input, name, kind, bind) in ok {
            let u: UpstreamArg = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(u.name, name, "{input}");
            assert_eq!(u.kind, kind, "{input}");
            assert_eq!(u.bind, BindAddr::Tcp(bind.parse().unwrap()), "{input}");
        }
        let sock: UpstreamArg = "db.query:unix:/run/db.sock".parse().unwrap();
        assert_eq!(sock.kind, DestinationType::PreparedQuery);
        assert_eq!(
            sock.bind,
            BindAddr::Unix(UnixBind {
                path: "/run/db.sock".into(),
                mode: None
            })
        );
        assert!("db:unix:relative.sock".parse::<UpstreamArg>().is_err());
        let bad = [
            "db",
            ":9191",
            "db:",
            "db:99999",
            "db:host.name:1",
            "db.mesh:1",
            "db:1:2:3",
            "db:-1",
        ];
        for input in bad {
            assert!(
                input.parse::<UpstreamArg>().is_err(),
                "{input} was accepted"
            );
        }
    }

    #[test]
    fn parses_upstream_addrs() {
        let u: UpstreamAddrArg = "db=127.0.0.1:1,localhost:2".parse().unwrap();
        assert_eq!(u.name, "db");
        assert_eq!(u.addrs, ["127.0.0.1:1", "localhost:2"]);
        for bad in ["db", "=1.2.3.4:5", "db=1.2.3.4", "db=1.2.3.4:0", "db=h:x"] {
            assert!(
                bad.parse::<UpstreamAddrArg>().is_err(),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn parses_go_durations() {
        let ok = [
            ("0", 0.0),
            ("10s", 10.0),
            ("500ms", 0.5),
            ("1m30s", 90.0),
            ("1.5h", 5400.0),
            ("250us", 0.00025),
        ];
        for (s, secs) in ok {
            let d: GoDuration = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert!((d.0.as_secs_f64() - secs).abs() < 1e-9, "{s}");
        }
        for bad in ["", "10", "-1s", "1x", "s", "1.2.3s"] {
            assert!(bad.parse::<GoDuration>().is_err(), "{bad} was accepted");
        }
        let shown: Vec<String> = ["72h", "90s", "5s", "1.5s"]
            .iter()
            .map(|s| s.parse::<GoDuration>().unwrap().to_string())
            .collect();
        assert_eq!(shown, ["72h0m0s", "1m30s", "5s", "1.5s"]);
    }
}
