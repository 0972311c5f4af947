//! A real Envoy beside ferry: static bootstraps rendered from the
//! Consul-shaped templates in `tests/envoy/`, the Envoy process they run
//! in, what its admin API and access log say, and the small apps and
//! certificate helpers the interop tests need.
//!
//! The binary is `FERRY_ENVOY`, or `.deps/envoy/envoy/_bin/envoy` in the
//! project as `make deps` installs it. Without one the tests fail and say
//! how to install it; they never skip.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::identity::dev_ca::Leaf;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::fake_agent::{Action, Intention};
use super::{within, DEADLINE};

// ---------------------------------------------------------------------------
// The binary.

/// Where `make deps` puts Envoy, relative to the project root.
const PROJECT_ENVOY: &str = ".deps/envoy/envoy/_bin/envoy";

/// The Envoy binary to run: `FERRY_ENVOY`, else the project-local install.
/// Panics, saying how to install it, when there is none.
pub fn binary() -> PathBuf {
    let path = match std::env::var_os("FERRY_ENVOY") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join(PROJECT_ENVOY),
    };
    let runnable = std::fs::metadata(&path)
        .map(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.is_file() && m.permissions().mode() & 0o111 != 0
        })
        .unwrap_or(false);
    assert!(
        runnable,
        "the Envoy interop tests need Envoy 1.40, but {} is not an executable file. \
         Install it with `make deps` (runs tests/envoy/install.sh into .deps/envoy), \
         or point FERRY_ENVOY at an Envoy binary.",
        path.display()
    );
    path
}

// ---------------------------------------------------------------------------
// Templates.

const BOOTSTRAP: &str = include_str!("../../envoy/bootstrap.yaml");
const PUBLIC_LISTENER: &str = include_str!("../../envoy/public_listener.yaml");
const LOCAL_APP_CLUSTER: &str = include_str!("../../envoy/local_app_cluster.yaml");
const UPSTREAM_LISTENER: &str = include_str!("../../envoy/upstream_listener.yaml");
const UPSTREAM_CLUSTER: &str = include_str!("../../envoy/upstream_cluster.yaml");
const ENDPOINT: &str = include_str!("../../envoy/endpoint.yaml");
const SNI_LISTENER: &str = include_str!("../../envoy/sni_listener.yaml");
const SNI_FILTER_CHAIN: &str = include_str!("../../envoy/sni_filter_chain.yaml");
const APP_CLUSTER: &str = include_str!("../../envoy/app_cluster.yaml");

/// What fills one placeholder.
pub enum Fill {
    /// One JSON value, written on the placeholder's line.
    Value(Value),
    /// Rendered YAML lines, indented to the placeholder's column.
    Block(String),
}

fn val(v: impl Into<Value>) -> Fill {
    Fill::Value(v.into())
}

/// Fills `{{NAME}}` placeholders in `template` (comment lines are left as
/// they are). Panics on a placeholder without a fill, or a fill of the
/// wrong kind: a template and its caller must agree exactly.
pub fn render(template: &str, fills: &[(&str, Fill)]) -> String {
    let find = |name: &str| {
        fills
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| f)
            .unwrap_or_else(|| panic!("template placeholder {{{{{name}}}}} has no value"))
    };
    let mut out = String::new();
    for line in template.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        if let Some(name) = trimmed
            .strip_prefix("{{")
            .and_then(|r| r.strip_suffix("}}"))
        {
            let Fill::Block(block) = find(name) else {
                panic!("{{{{{name}}}}} stands alone on its line: it takes a block");
            };
            let indent = &line[..line.len() - line.trim_start().len()];
            for l in block.lines() {
                if !l.trim().is_empty() {
                    out.push_str(indent);
                }
                out.push_str(l);
                out.push('\n');
            }
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let end = rest[start..]
                .find("}}")
                .unwrap_or_else(|| panic!("unclosed placeholder in {line:?}"))
                + start;
            let name = &rest[start + 2..end];
            let Fill::Value(v) = find(name) else {
                panic!("{{{{{name}}}}} follows a key: it takes one value");
            };
            out.push_str(&v.to_string());
            rest = &rest[end + 2..];
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// Intentions as Consul expresses them in Envoy's network RBAC filter.

/// Escapes regex metacharacters (RE2 syntax) in `s`.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A principal matching the URI SAN of `source` (`*`: any service) in
/// `trust_domain`, any datacenter, the default namespace: the pattern
/// Consul builds, trust domain pinned and dots escaped.
fn principal(trust_domain: &str, source: &str) -> Value {
    let svc = if source == "*" {
        "[^/]+".to_string()
    } else {
        regex_escape(source)
    };
    let regex = format!(
        "^spiffe://{}/ns/default/dc/[^/]+/svc/{svc}$",
        regex_escape(trust_domain)
    );
    json!({ "authenticated": { "principal_name": { "safe_regex": { "regex": regex } } } })
}

/// The `rules` of the network RBAC filter for `destination`, from the
/// intentions that name it (or `*`) and the default policy.
///
/// Consul turns an ordered list of allow/deny intentions into one flat
/// Envoy policy: with default deny it lists who is allowed (Envoy's ALLOW
/// action, the proto default, so no `action` is written); with default
/// allow it lists who is denied (`action: DENY`). Intentions whose action
/// equals the default drop out, but still carve themselves out of the
/// wildcard below them: `* allow` under `billing deny` becomes "any
/// service and not billing". L7 intentions count as deny on a TCP
/// listener, as in Consul.
pub fn rbac_rules(
    trust_domain: &str,
    destination: &str,
    intentions: &[Intention],
    default_allow: bool,
) -> Value {
    let rank = |i: &Intention| (i.destination != "*", i.source != "*");
    let mut applicable: Vec<&Intention> = intentions
        .iter()
        .filter(|i| i.destination == destination || i.destination == "*")
        .collect();
    // Highest precedence first: exact destination, then exact source.
    applicable.sort_by_key(|i| std::cmp::Reverse(rank(i)));
    // Only the highest-precedence intention per source counts.
    let mut seen = Vec::new();
    applicable.retain(|i| {
        let fresh = !seen.contains(&i.source);
        seen.push(i.source.clone());
        fresh
    });
    let allows = |i: &Intention| i.action == Action::Allow && !i.l7;
    let mut principals = Vec::new();
    for (n, i) in applicable.iter().enumerate() {
        if allows(i) == default_allow {
            continue;
        }
        let me = principal(trust_domain, &i.source);
        // Exact sources above a wildcard are excepted from it.
        let excepted: Vec<Value> = if i.source == "*" {
            applicable[..n]
                .iter()
                .filter(|j| j.source != "*")
                .map(|j| json!({ "not_id": principal(trust_domain, &j.source) }))
                .collect()
        } else {
            Vec::new()
        };
        if excepted.is_empty() {
            principals.push(me);
        } else {
            let mut ids = vec![me];
            ids.extend(excepted);
            principals.push(json!({ "and_ids": { "ids": ids } }));
        }
    }
    let mut rules = serde_json::Map::new();
    if default_allow {
        rules.insert("action".into(), json!("DENY"));
    }
    if !principals.is_empty() {
        rules.insert(
            "policies".into(),
            json!({ "consul-intentions-layer4": {
                "permissions": [ { "any": true } ],
                "principals": principals,
            } }),
        );
    }
    Value::Object(rules)
}

/// Consul's RBAC for a destination with no intentions under default allow:
/// nobody is denied.
pub fn allow_all() -> Value {
    json!({ "action": "DENY" })
}

// ---------------------------------------------------------------------------
// What a bootstrap is made of.

/// The highest TLS version one side of Envoy may negotiate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMax {
    /// Consul's empty TLS parameters: Envoy's defaults (a client stops at
    /// TLS 1.2, a server goes to 1.3).
    Default,
    /// `tls_maximum_protocol_version: TLSv1_2`.
    V12,
    /// `tls_maximum_protocol_version: TLSv1_3`.
    V13,
}

impl TlsMax {
    fn params(self) -> Value {
        match self {
            TlsMax::Default => json!({}),
            TlsMax::V12 => json!({ "tls_maximum_protocol_version": "TLSv1_2" }),
            TlsMax::V13 => json!({ "tls_maximum_protocol_version": "TLSv1_3" }),
        }
    }
}

/// The files one identity's TLS context reads: chain (leaf then
/// intermediates, Consul's `CertPEM`), key, and the trusted roots.
#[derive(Clone, Debug)]
pub struct Certs {
    pub chain: PathBuf,
    pub key: PathBuf,
    pub roots: PathBuf,
}

impl Certs {
    /// Writes `leaf` and `roots_pem` as `<name>.pem`, `<name>-key.pem` and
    /// `<name>-roots.pem` in `dir`.
    pub fn write(dir: &Path, name: &str, leaf: &Leaf, roots_pem: &str) -> Certs {
        let certs = Certs {
            chain: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
            roots: dir.join(format!("{name}-roots.pem")),
        };
        std::fs::write(&certs.chain, &leaf.cert_pem).expect("write chain");
        std::fs::write(&certs.key, &leaf.key_pem).expect("write key");
        std::fs::write(&certs.roots, roots_pem).expect("write roots");
        certs
    }

    /// The files `ferry certs` lays out: `<service>.pem`, `<service>-key.pem`
    /// and `ca.pem` in `dir`.
    pub fn in_certs_dir(dir: &Path, service: &str) -> Certs {
        Certs {
            chain: dir.join(format!("{service}.pem")),
            key: dir.join(format!("{service}-key.pem")),
            roots: dir.join("ca.pem"),
        }
    }
}

fn path_value(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

/// The name Consul gives a service's upstream cluster (its SNI):
/// `<svc>.default.<dc>.internal.<trust-domain>`.
pub fn sni(service: &str, dc: &str, trust_domain: &str) -> String {
    format!("{service}.default.{dc}.internal.{trust_domain}")
}

/// An upstream of the Envoy sidecar: a loopback listener and the cluster
/// that reaches `instances` over mesh TLS.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The destination service.
    pub service: String,
    pub datacenter: String,
    pub trust_domain: String,
    /// Where its instances listen (ferry's inbound, usually).
    pub instances: Vec<SocketAddr>,
    /// Our side's TLS files.
    pub certs: Certs,
    pub tls: TlsMax,
}

impl Upstream {
    /// `service` in dc1 of `trust_domain` at `instance`, Consul's TLS defaults.
    pub fn new(service: &str, trust_domain: &str, instance: SocketAddr, certs: &Certs) -> Upstream {
        Upstream {
            service: service.into(),
            datacenter: "dc1".into(),
            trust_domain: trust_domain.into(),
            instances: vec![instance],
            certs: certs.clone(),
            tls: TlsMax::Default,
        }
    }

    pub fn tls(mut self, tls: TlsMax) -> Upstream {
        self.tls = tls;
        self
    }

    /// The listener's name: `<svc>:127.0.0.1:0`, as Consul names it by bind address.
    pub fn listener_name(&self) -> String {
        format!("{}:127.0.0.1:0", self.service)
    }

    fn cluster(&self) -> String {
        sni(&self.service, &self.datacenter, &self.trust_domain)
    }
}

/// One service behind the SNI-routing listener.
#[derive(Clone, Debug)]
pub struct SniRoute {
    /// The SNI this chain matches (Consul's for the service).
    pub server_name: String,
    /// The service's own TLS files: the chain presents its leaf.
    pub certs: Certs,
    pub rbac: Value,
    /// The service's plain-TCP address.
    pub app: SocketAddr,
}

#[derive(Clone, Debug)]
struct Public {
    certs: Certs,
    rbac: Value,
    tls: TlsMax,
    app: SocketAddr,
}

/// The static resources of one Envoy: a sidecar's public listener and
/// upstreams, and optionally an SNI-routing listener.
#[derive(Clone, Debug)]
pub struct EnvoyConfig {
    service: String,
    public: Option<Public>,
    upstreams: Vec<Upstream>,
    sni_routes: Vec<SniRoute>,
}

/// The public listener's name, as Consul names it by bind address.
pub const PUBLIC_LISTENER_NAME: &str = "public_listener:127.0.0.1:0";
/// The SNI-routing listener's name (a terminating gateway's is `default:<addr>`).
pub const SNI_LISTENER_NAME: &str = "default:127.0.0.1:0";

impl EnvoyConfig {
    /// An empty configuration for the sidecar of `service`.
    pub fn sidecar(service: &str) -> EnvoyConfig {
        EnvoyConfig {
            service: service.into(),
            public: None,
            upstreams: Vec::new(),
            sni_routes: Vec::new(),
        }
    }

    /// The public listener: mTLS with `certs`, intentions as `rbac` (see
    /// [`rbac_rules`]), then the local app at `app`.
    pub fn public_listener(
        mut self,
        certs: &Certs,
        rbac: Value,
        tls: TlsMax,
        app: SocketAddr,
    ) -> Self {
        self.public = Some(Public {
            certs: certs.clone(),
            rbac,
            tls,
            app,
        });
        self
    }

    /// Adds an upstream listener and its cluster.
    pub fn upstream(mut self, upstream: Upstream) -> Self {
        self.upstreams.push(upstream);
        self
    }

    /// Adds a listener that picks a filter chain per SNI.
    pub fn sni_listener(mut self, routes: Vec<SniRoute>) -> Self {
        self.sni_routes = routes;
        self
    }

    fn listener_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.public.is_some() {
            names.push(PUBLIC_LISTENER_NAME.to_string());
        }
        names.extend(self.upstreams.iter().map(Upstream::listener_name));
        if !self.sni_routes.is_empty() {
            names.push(SNI_LISTENER_NAME.to_string());
        }
        names
    }

    /// The bootstrap, with the access log at `access_log`.
    pub fn render(&self, access_log: &Path) -> String {
        let log = path_value(access_log);
        let mut listeners = String::new();
        let mut clusters = String::new();
        if let Some(p) = &self.public {
            listeners.push_str(&render(
                PUBLIC_LISTENER,
                &[
                    ("NAME", val(PUBLIC_LISTENER_NAME)),
                    ("STAT_PREFIX", val("public_listener")),
                    ("RBAC_RULES", Fill::Value(p.rbac.clone())),
                    ("ACCESS_LOG", Fill::Value(log.clone())),
                    ("TLS_PARAMS", Fill::Value(p.tls.params())),
                    ("CHAIN", Fill::Value(path_value(&p.certs.chain))),
                    ("KEY", Fill::Value(path_value(&p.certs.key))),
                    ("ROOTS", Fill::Value(path_value(&p.certs.roots))),
                ],
            ));
            clusters.push_str(&render(
                LOCAL_APP_CLUSTER,
                &[("APP_PORT", val(p.app.port()))],
            ));
        }
        for u in &self.upstreams {
            let name = u.listener_name();
            listeners.push_str(&render(
                UPSTREAM_LISTENER,
                &[
                    ("NAME", val(name.clone())),
                    ("STAT_PREFIX", val(format!("upstream_{}", u.service))),
                    (
                        "TCP_STAT_PREFIX",
                        val(format!(
                            "upstream.{}.default.default.{}",
                            u.service, u.datacenter
                        )),
                    ),
                    ("CLUSTER", val(u.cluster())),
                    ("ACCESS_LOG", Fill::Value(log.clone())),
                ],
            ));
            let endpoints: String = u
                .instances
                .iter()
                .map(|a| render(ENDPOINT, &[("PORT", val(a.port()))]))
                .collect();
            // The server must be the destination, exactly (Consul's SAN match).
            let expect = format!(
                "spiffe://{}/ns/default/dc/{}/svc/{}",
                u.trust_domain, u.datacenter, u.service
            );
            clusters.push_str(&render(
                UPSTREAM_CLUSTER,
                &[
                    ("NAME", val(u.cluster())),
                    ("ENDPOINTS", Fill::Block(endpoints)),
                    ("SNI", val(u.cluster())),
                    ("TLS_PARAMS", Fill::Value(u.tls.params())),
                    ("CHAIN", Fill::Value(path_value(&u.certs.chain))),
                    ("KEY", Fill::Value(path_value(&u.certs.key))),
                    ("ROOTS", Fill::Value(path_value(&u.certs.roots))),
                    ("EXPECTED_URI", val(expect)),
                ],
            ));
        }
        if !self.sni_routes.is_empty() {
            let mut chains = String::new();
            for r in &self.sni_routes {
                chains.push_str(&render(
                    SNI_FILTER_CHAIN,
                    &[
                        ("SERVER_NAME", val(r.server_name.clone())),
                        ("RBAC_RULES", Fill::Value(r.rbac.clone())),
                        ("TCP_STAT_PREFIX", val(format!("gateway.{}", r.server_name))),
                        ("CLUSTER", val(r.server_name.clone())),
                        ("ACCESS_LOG", Fill::Value(log.clone())),
                        ("LISTENER", val(SNI_LISTENER_NAME)),
                        ("TLS_PARAMS", Fill::Value(TlsMax::Default.params())),
                        ("CHAIN", Fill::Value(path_value(&r.certs.chain))),
                        ("KEY", Fill::Value(path_value(&r.certs.key))),
                        ("ROOTS", Fill::Value(path_value(&r.certs.roots))),
                    ],
                ));
                clusters.push_str(&render(
                    APP_CLUSTER,
                    &[
                        ("NAME", val(r.server_name.clone())),
                        ("APP_PORT", val(r.app.port())),
                    ],
                ));
            }
            listeners.push_str(&render(
                SNI_LISTENER,
                &[
                    ("NAME", val(SNI_LISTENER_NAME)),
                    ("STAT_PREFIX", val("gateway")),
                    ("FILTER_CHAINS", Fill::Block(chains)),
                ],
            ));
        }
        // An empty static list must still be a list.
        let empty = |s: String| if s.is_empty() { "[]\n".to_string() } else { s };
        render(
            BOOTSTRAP,
            &[
                ("NODE_ID", val(format!("{}-sidecar-proxy", self.service))),
                ("SERVICE", val(self.service.clone())),
                ("LISTENERS", Fill::Block(empty(listeners))),
                ("CLUSTERS", Fill::Block(empty(clusters))),
            ],
        )
    }
}

// ---------------------------------------------------------------------------
// The process.

/// Everything a child wrote to stderr so far.
#[derive(Default)]
struct Captured(Mutex<String>);

impl Captured {
    fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One Envoy process started by a test, with its bootstrap in a temp dir.
/// Dropping it kills that process (by its own handle) and nothing else.
pub struct Envoy {
    child: Child,
    dir: tempfile::TempDir,
    admin: SocketAddr,
    listeners: BTreeMap<String, SocketAddr>,
    stderr: Arc<Captured>,
    http: reqwest::Client,
}

impl Envoy {
    /// Renders `config`, starts Envoy on it and waits until it is ready:
    /// admin `/ready` says LIVE and every listener is bound. Panics with
    /// Envoy's stderr when it exits or is not ready within the deadline.
    pub async fn start(config: &EnvoyConfig) -> Envoy {
        let bin = binary();
        let dir = tempfile::tempdir().expect("tempdir");
        let bootstrap = dir.path().join("bootstrap.yaml");
        let admin_path = dir.path().join("admin-address");
        let access_log = dir.path().join("access.log");
        std::fs::write(&bootstrap, config.render(&access_log)).expect("write bootstrap");
        std::fs::write(&access_log, "").expect("create access log");
        let mut child = Command::new(&bin)
            .arg("-c")
            .arg(&bootstrap)
            .args(["--concurrency", "1", "--disable-hot-restart"])
            // Each process picks its own shared-memory base id.
            .arg("--use-dynamic-base-id")
            .args(["-l", "warning"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            // Access log lines reach the file within milliseconds.
            .args(["--file-flush-interval-msec", "10"])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = Arc::new(Captured::default());
        let pipe = child.stderr.take().expect("stderr is piped");
        let sink = stderr.clone();
        std::thread::spawn(move || drain(pipe, &sink));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("http client");
        let mut envoy = Envoy {
            child,
            dir,
            admin: "127.0.0.1:0".parse().expect("addr"),
            listeners: BTreeMap::new(),
            stderr,
            http,
        };
        envoy
            .wait_ready(&admin_path, &config.listener_names())
            .await;
        envoy
    }

    async fn wait_ready(&mut self, admin_path: &Path, names: &[String]) {
        let deadline = Instant::now() + DEADLINE;
        let mut last = String::from("no admin address yet");
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "envoy exited ({status}) before it was ready.\nbootstrap:\n{}\nstderr:\n{}",
                    self.bootstrap(),
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "envoy not ready after {DEADLINE:?} ({last}).\nstderr:\n{}",
                    self.stderr()
                );
            }
            if let Some(admin) = std::fs::read_to_string(admin_path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                self.admin = admin;
                match self.try_ready(names).await {
                    Ok(listeners) => {
                        self.listeners = listeners;
                        return;
                    }
                    Err(why) => last = why,
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The bound listeners once `/ready` is LIVE and all `names` have a port.
    async fn try_ready(&self, names: &[String]) -> Result<BTreeMap<String, SocketAddr>, String> {
        let (status, body) = self.try_get("/ready").await?;
        if status != 200 || body.trim() != "LIVE" {
            return Err(format!("/ready: {status} {}", body.trim()));
        }
        let (_, body) = self.try_get("/listeners?format=json").await?;
        let parsed: Value = serde_json::from_str(&body).map_err(|e| format!("/listeners: {e}"))?;
        let mut bound = BTreeMap::new();
        for l in parsed["listener_statuses"].as_array().into_iter().flatten() {
            let sock = &l["local_address"]["socket_address"];
            let port = sock["port_value"].as_u64().unwrap_or(0);
            if let (Some(name), Some(ip), true) =
                (l["name"].as_str(), sock["address"].as_str(), port != 0)
            {
                if let Ok(addr) = format!("{ip}:{port}").parse() {
                    bound.insert(name.to_string(), addr);
                }
            }
        }
        match names.iter().find(|n| !bound.contains_key(*n)) {
            Some(missing) => Err(format!("listener {missing} not bound yet")),
            None => Ok(bound),
        }
    }

    async fn try_get(&self, path: &str) -> Result<(u16, String), String> {
        let url = format!("http://{}{path}", self.admin);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(|e| format!("GET {url}: {e}"))?;
        Ok((status, body))
    }

    /// `GET <admin><path>`; panics (with Envoy's stderr) if it fails.
    pub async fn get(&self, path: &str) -> String {
        match within(&format!("envoy admin {path}"), self.try_get(path)).await {
            Ok((200, body)) => body,
            Ok((status, body)) => panic!("envoy admin {path}: {status}: {body}"),
            Err(e) => panic!("{e}\nstderr:\n{}", self.stderr()),
        }
    }

    /// The address of listener `name`.
    pub fn listener(&self, name: &str) -> SocketAddr {
        *self
            .listeners
            .get(name)
            .unwrap_or_else(|| panic!("envoy has no listener {name}; it has {:?}", self.listeners))
    }

    /// The public listener's address.
    pub fn public(&self) -> SocketAddr {
        self.listener(PUBLIC_LISTENER_NAME)
    }

    /// The local listener for upstream `service`.
    pub fn upstream(&self, service: &str) -> SocketAddr {
        self.listener(&format!("{service}:127.0.0.1:0"))
    }

    /// The SNI-routing listener's address.
    pub fn sni_listener(&self) -> SocketAddr {
        self.listener(SNI_LISTENER_NAME)
    }

    /// Every counter and gauge, from `/stats` (`name: value` lines).
    pub async fn stats(&self) -> BTreeMap<String, u64> {
        self.get("/stats")
            .await
            .lines()
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(": ")?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// One counter or gauge; 0 when Envoy has not created it.
    pub async fn stat(&self, name: &str) -> u64 {
        self.stats().await.get(name).copied().unwrap_or(0)
    }

    /// Polls `stat` until `want(value)`; panics with the stats after DEADLINE.
    pub async fn wait_stat(&self, name: &str, want: impl Fn(u64) -> bool) -> u64 {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let v = self.stat(name).await;
            if want(v) {
                return v;
            }
            if Instant::now() > deadline {
                let stats = self.stats().await;
                let related: Vec<String> = stats
                    .iter()
                    .filter(|(k, v)| {
                        **v != 0 && (k.contains("ssl") || k.contains("rbac") || k.contains("cx"))
                    })
                    .map(|(k, v)| format!("  {k}: {v}"))
                    .collect();
                panic!(
                    "envoy stat {name} = {v} after {DEADLINE:?}; non-zero related stats:\n{}\nstderr:\n{}",
                    related.join("\n"),
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The access log so far, one JSON object per connection Envoy closed.
    pub fn access_log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until the access log has at least `n` entries for listener
    /// `listener`, and returns them.
    pub async fn wait_access_log(&self, listener: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let entries: Vec<Value> = self
                .access_log()
                .into_iter()
                .filter(|e| e["listener"] == listener)
                .collect();
            if entries.len() >= n {
                return entries;
            }
            if Instant::now() > deadline {
                panic!(
                    "envoy logged {} of {n} connections on {listener} after {DEADLINE:?}: {entries:?}",
                    entries.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything Envoy wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.get()
    }

    /// The rendered bootstrap, for failure messages.
    pub fn bootstrap(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bootstrap.yaml")).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drain(mut pipe: impl Read, sink: &Captured) {
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => sink
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
}

// ---------------------------------------------------------------------------
// Apps that count what reaches them.

/// How a [`CountingApp`] answers.
#[derive(Clone, Copy, Debug)]
pub enum Answer {
    /// Echoes bytes as they come, shuts down its write side after EOF.
    Echo,
    /// Reads until EOF, then writes `got <n> bytes` and closes: a reply
    /// that only comes once the client half-closed.
    AfterEof,
    /// Speaks first: writes [`BANNER`] and shuts down its write side at
    /// once, then reads (and counts) until the client's EOF.
    BannerFirst,
}

/// What a [`Answer::BannerFirst`] app says on every connection.
pub const BANNER: &[u8] = b"hello from the app";

/// A plain-TCP local app that counts accepted connections and every byte
/// a client managed to send it: Envoy's tcp_proxy connects to its app
/// before RBAC decides, so "the app was never reached" means no bytes, not
/// no connections, when Envoy is the one refusing.
pub struct CountingApp {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    received: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl CountingApp {
    pub async fn start(answer: Answer) -> CountingApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let (a, r) = (accepted.clone(), received.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s, answer, r.clone()));
            }
        });
        CountingApp {
            addr,
            accepted,
            received,
            task,
        }
    }

    pub fn addr_arg(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Bytes received from clients so far, over all connections.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for CountingApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut s: TcpStream, answer: Answer, received: Arc<AtomicU64>) {
    if let Answer::BannerFirst = answer {
        if s.write_all(BANNER).await.is_err() || s.shutdown().await.is_err() {
            return;
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                received.fetch_add(n as u64, Ordering::SeqCst);
                total += n as u64;
                if let Answer::Echo = answer {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    match answer {
        Answer::AfterEof => {
            let _ = s.write_all(format!("got {total} bytes").as_bytes()).await;
            let _ = s.shutdown().await;
        }
        Answer::Echo => {
            let _ = s.shutdown().await;
        }
        Answer::BannerFirst => {}
    }
}

// ---------------------------------------------------------------------------
// Certificates as Envoy reports them.

/// The leaf's serial as Envoy's access log prints it: lower-case hex, no
/// separators.
pub fn envoy_serial(leaf: &Leaf) -> String {
    let der = first_der(&leaf.cert_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse leaf");
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn first_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("a PEM certificate")
        .to_vec()
}

/// True when `logged` (Envoy's URL-encoded PEM of a peer certificate)
/// is the first certificate of `leaf`.
pub fn is_logged_cert(logged: &str, leaf: &Leaf) -> bool {
    let mut bytes = Vec::new();
    let raw = logged.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 3 <= raw.len() {
            let hex = std::str::from_utf8(&raw[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                bytes.push(b);
                i += 3;
                continue;
            }
        }
        bytes.push(raw[i]);
        i += 1;
    }
    let pem = String::from_utf8_lossy(&bytes);
    use rustls::pki_types::pem::PemObject;
    match rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()) {
        Ok(der) => der.as_ref() == first_der(&leaf.cert_pem).as_slice(),
        Err(_) => false,
    }
}
