//! The Nomad jobs in `nomad-jobs/` start ferry with command lines ferry
//! accepts. Every task that runs ferry (a `task`, or a `sidecar_task` of a
//! `connect` block) has its `args` and `env` taken from the job file,
//! Nomad's runtime interpolations (`${NOMAD_PORT_http}`, ...) filled in with
//! plausible values, and goes through ferry's own flag parser and
//! configuration checks, as the binary does at startup. Nomad is not needed.
//!
//! On top of that: a sidecar's `-sidecar-for`/`-proxy-id` names the service
//! ID Nomad registers, a ferry in a bridge namespace is told where the agent
//! is, and every mesh call the jobs make is allowed by the intention files.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ferry::config::agent::{Env, ProxyIdentity};
use ferry::config::Config;
use hcl::{Block, Body, Expression};

/// Each job file, with the groups that must have a ferry task, so that a
/// walk that finds nothing cannot pass.
const EXPECTED: &[(&str, &[&str])] = &[
    (
        "calculator-host.nomad.hcl",
        &["add-svc", "sub-svc", "frontend"],
    ),
    (
        "calculator-bridge.nomad.hcl",
        &["add-svc", "sub-svc", "frontend"],
    ),
    (
        "calculator-xds.nomad.hcl",
        &["add-svc", "sub-svc", "frontend"],
    ),
];

/// The values given to `${meta.connect.log_level}` and
/// `${meta.connect.proxy_concurrency}`: Nomad's node meta defaults.
const CONNECT_LOG_LEVEL: &str = "info";
const CONNECT_PROXY_CONCURRENCY: &str = "1";

/// The value given to `${NOMAD_ALLOC_ID}`.
const ALLOC_ID: &str = "5f2b7c1e-9a4d-4e8b-b0c3-2d6f1a8e9b70";

/// The value given to `${attr.unique.network.ip-address}`.
const HOST_IP: &str = "127.0.0.1";

/// The first value given to `${NOMAD_PORT_<label>}`; each label of a group
/// gets the next number, so no two ports of a group collide.
const FIRST_PORT: u16 = 23000;

/// One task that runs ferry, as written in a job file.
#[derive(Debug)]
struct FerryTask {
    /// Where it is, for failure messages.
    place: String,
    /// The enclosing group's name (`${NOMAD_GROUP_NAME}`).
    group: String,
    /// The group's network mode (`host` when not set).
    network_mode: String,
    /// The labels of the group's `port` blocks (`${NOMAD_PORT_<label>}`).
    port_labels: Vec<String>,
    /// For a `sidecar_task`: the service it is the sidecar of.
    sidecar_of: Option<SidecarService>,
    /// `config.args`, uninterpolated.
    args: Vec<Expression>,
    /// The `env` block, uninterpolated.
    env: Vec<(String, Expression)>,
}

/// The `service` block around a `sidecar_task`: what Nomad registers.
#[derive(Debug)]
struct SidecarService {
    /// `name`.
    name: String,
    /// `port`: a number or a port label, the last part of the service ID.
    port: String,
    /// `destination_name` of each `sidecar_service.proxy.upstreams`.
    upstreams: Vec<String>,
}

/// A ferry task whose command line ferry accepted.
struct Checked {
    /// The task as found in the job file.
    task: FerryTask,
    /// The interpolated arguments, as ferry received them.
    argv: Vec<String>,
    /// The interpolated environment.
    env: TaskEnv,
    /// What ferry's parser made of `argv`.
    cli: ferry::cli::Cli,
    /// What ferry's configuration checks made of it.
    config: Config,
}

/// A task's environment as ferry's [`Env`] sees it: the task's `env` block
/// only (Nomad sets no Consul variable for these tasks).
struct TaskEnv(HashMap<String, String>);

impl Env for TaskEnv {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// `nomad-jobs/` in the source tree.
fn jobs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("nomad-jobs")
}

/// Reads and parses one HCL file of `nomad-jobs/`.
fn parse_file(name: &str) -> Body {
    let path = jobs_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    hcl::parse(&text).unwrap_or_else(|e| panic!("{name} is not valid HCL: {e}"))
}

/// The names of the files in `nomad-jobs/` that end with `suffix`, sorted.
fn files_ending_with(suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(jobs_dir())
        .expect("nomad-jobs/ exists")
        .map(|entry| entry.expect("readable entry").file_name())
        .filter_map(|name| name.to_str().map(str::to_string))
        .filter(|name| name.ends_with(suffix))
        .collect();
    names.sort();
    names
}

/// The blocks called `ident` directly inside `body`.
fn blocks<'a>(body: &'a Body, ident: &'a str) -> impl Iterator<Item = &'a Block> + 'a {
    body.blocks().filter(move |b| b.identifier() == ident)
}

/// The one block called `ident` inside `body`, if there is one.
fn block<'a>(body: &'a Body, ident: &'a str) -> Option<&'a Block> {
    blocks(body, ident).next()
}

/// The expression of attribute `key` directly inside `body`.
fn attr<'a>(body: &'a Body, key: &str) -> Option<&'a Expression> {
    body.attributes().find(|a| a.key() == key).map(|a| a.expr())
}

/// Attribute `key` of `body` when it is a plain string (no interpolation).
fn string_attr(body: &Body, key: &str) -> Option<String> {
    match attr(body, key)? {
        Expression::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// A block's first label (`group "web"` gives `web`).
fn label(block: &Block) -> String {
    block
        .labels()
        .first()
        .map(|l| l.as_str().to_string())
        .unwrap_or_default()
}

/// Whether a task-like block (`task` or `sidecar_task`) runs ferry: its
/// `config.command` ends with `/ferry`.
fn runs_ferry(task: &Block) -> bool {
    block(task.body(), "config")
        .and_then(|config| string_attr(config.body(), "command"))
        .is_some_and(|command| command.ends_with("/ferry"))
}

/// Counts the `command` attributes ending with `/ferry` anywhere in `body`,
/// however deeply nested, to make sure the walk in [`ferry_tasks`] missed
/// none.
fn count_ferry_commands(body: &Body) -> usize {
    let here = string_attr(body, "command").is_some_and(|c| c.ends_with("/ferry"));
    usize::from(here)
        + body
            .blocks()
            .map(|b| count_ferry_commands(b.body()))
            .sum::<usize>()
}

/// Every task that runs ferry in a job file: `job > group > task`, and
/// `job > group > service > connect > sidecar_task`.
fn ferry_tasks(file: &str, body: &Body) -> Vec<FerryTask> {
    let mut found = Vec::new();
    for job in blocks(body, "job") {
        for group in blocks(job.body(), "group") {
            let network = block(group.body(), "network");
            let network_mode = network
                .and_then(|n| string_attr(n.body(), "mode"))
                .unwrap_or_else(|| "host".to_string());
            let port_labels: Vec<String> = network
                .map(|n| blocks(n.body(), "port").map(label).collect())
                .unwrap_or_default();
            let new_task = |place: String, task: &Block, sidecar_of| FerryTask {
                place: format!("{file}: group {:?}, {place}", label(group)),
                group: label(group),
                network_mode: network_mode.clone(),
                port_labels: port_labels.clone(),
                sidecar_of,
                args: task_args(task),
                env: task_env(task),
            };
            for task in blocks(group.body(), "task").filter(|t| runs_ferry(t)) {
                found.push(new_task(format!("task {:?}", label(task)), task, None));
            }
            for service in blocks(group.body(), "service") {
                let Some(connect) = block(service.body(), "connect") else {
                    continue;
                };
                for task in blocks(connect.body(), "sidecar_task").filter(|t| runs_ferry(t)) {
                    let sidecar = sidecar_service(service);
                    let place = format!("sidecar_task of service {:?}", sidecar.name);
                    found.push(new_task(place, task, Some(sidecar)));
                }
            }
        }
    }
    found
}

/// A task's `config.args`, each element as written.
fn task_args(task: &Block) -> Vec<Expression> {
    let args = block(task.body(), "config").and_then(|c| attr(c.body(), "args"));
    match args {
        Some(Expression::Array(items)) => items.clone(),
        None => Vec::new(),
        Some(other) => panic!("args is not a list: {other}"),
    }
}

/// A task's `env` block, as (name, value as written).
fn task_env(task: &Block) -> Vec<(String, Expression)> {
    block(task.body(), "env")
        .map(|env| {
            env.body()
                .attributes()
                .map(|a| (a.key().to_string(), a.expr().clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// Name, port and upstreams of the `service` block a `sidecar_task` is in.
fn sidecar_service(service: &Block) -> SidecarService {
    let body = service.body();
    let proxy = block(body, "connect")
        .and_then(|c| block(c.body(), "sidecar_service"))
        .and_then(|s| block(s.body(), "proxy"));
    let upstreams = proxy
        .map(|p| {
            blocks(p.body(), "upstreams")
                .filter_map(|u| string_attr(u.body(), "destination_name"))
                .collect()
        })
        .unwrap_or_default();
    SidecarService {
        name: string_attr(body, "name").expect("a connect service has a plain string name"),
        port: string_attr(body, "port").expect("a connect service has a plain string port"),
        upstreams,
    }
}

/// Nomad's runtime values for one task's interpolations.
struct Interpolation<'a> {
    task: &'a FerryTask,
    /// `${NOMAD_SECRETS_DIR}`: a temporary directory holding `si_token`.
    secrets_dir: &'a Path,
}

impl Interpolation<'_> {
    /// The value of one `${...}` expression (`NOMAD_PORT_http`,
    /// `attr.unique.network.ip-address`), or an error for one this test
    /// does not know, so that a new one gets noticed and given a value here.
    fn value(&self, name: &str) -> Result<String, String> {
        if let Some(label) = name.strip_prefix("NOMAD_PORT_") {
            // Nomad writes a label's characters other than [A-Za-z0-9_] as `_`.
            let env_name = |l: &str| l.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
            let index = self
                .task
                .port_labels
                .iter()
                .position(|l| env_name(l) == label)
                .ok_or_else(|| format!("${{{name}}}: the group has no port {label:?}"))?;
            return Ok((FIRST_PORT + index as u16).to_string());
        }
        match name {
            "NOMAD_ALLOC_ID" => Ok(ALLOC_ID.to_string()),
            "NOMAD_GROUP_NAME" => Ok(self.task.group.clone()),
            "NOMAD_SECRETS_DIR" => Ok(self.secrets_dir.display().to_string()),
            "attr.unique.network.ip-address" => Ok(HOST_IP.to_string()),
            "meta.connect.log_level" => Ok(CONNECT_LOG_LEVEL.to_string()),
            "meta.connect.proxy_concurrency" => Ok(CONNECT_PROXY_CONCURRENCY.to_string()),
            _ => Err(format!(
                "${{{name}}}: an interpolation this test does not know; give it a value in Interpolation::value"
            )),
        }
    }

    /// A string as Nomad hands it to the task: every `${...}` replaced.
    /// Only plain strings and quoted templates of literals and
    /// interpolations are expected in a ferry task.
    fn fill(&self, expr: &Expression) -> Result<String, String> {
        let raw = match expr {
            Expression::String(s) => return Ok(s.clone()),
            Expression::TemplateExpr(t) => match t.as_ref() {
                hcl::expr::TemplateExpr::QuotedString(raw) => raw,
                heredoc => return Err(format!("unexpected heredoc: {heredoc:?}")),
            },
            other => return Err(format!("expected a string, found {other}")),
        };
        let template: hcl::Template = raw.parse().map_err(|e| format!("{raw:?}: {e}"))?;
        let mut out = String::new();
        for element in template.elements() {
            match element {
                hcl::template::Element::Literal(s) => out.push_str(s),
                hcl::template::Element::Interpolation(i) => {
                    out.push_str(&self.value(&i.expr.to_string())?);
                }
                hcl::template::Element::Directive(_) => {
                    return Err(format!("{raw:?}: template directives are not expected"));
                }
            }
        }
        Ok(out)
    }
}

/// Runs one ferry task's command line through ferry's parser and
/// configuration checks, as `ferry` does at startup (`src/main.rs`).
/// Warnings count as failures: a job should not start ferry with flags it
/// ignores.
fn check(task: FerryTask, secrets_dir: &Path) -> Result<Checked, String> {
    let values = Interpolation {
        task: &task,
        secrets_dir,
    };
    let argv: Vec<String> = std::iter::once(Ok("ferry".to_string()))
        .chain(task.args.iter().map(|a| values.fill(a)))
        .collect::<Result<_, _>>()?;
    let env = task
        .env
        .iter()
        .map(|(k, v)| Ok((k.clone(), values.fill(v)?)))
        .collect::<Result<HashMap<_, _>, String>>()?;
    let env = TaskEnv(env);
    if argv.get(1).map(String::as_str) == Some("envoy") {
        return check_envoy(task, argv, env, secrets_dir);
    }

    let cli = ferry::cli::parse(&argv).map_err(|e| format!("{argv:?}: {e}"))?;
    if cli.command.is_some() {
        return Err(format!("{argv:?}: runs a helper command, not the proxy"));
    }
    if ferry::cli::log_level(&cli.proxy.log_level).is_none() {
        return Err(format!("{argv:?}: bad -log-level"));
    }
    let (config, warnings) =
        Config::from_args(&cli.proxy, &env).map_err(|e| format!("{argv:?}: {e}"))?;
    if !warnings.is_empty() {
        return Err(format!("{argv:?}: warnings {warnings:?}"));
    }
    Ok(Checked {
        task,
        argv,
        env,
        cli,
        config,
    })
}

/// `ferry envoy ARGS...` (xDS mode): Envoy's arguments through ferry's
/// Envoy-compatible parser, the bootstrap where Nomad writes it, ferry's
/// own flags after `--` through its usual parser. Warnings for the Envoy
/// flags ferry ignores are expected (Nomad passes them).
fn check_envoy(
    task: FerryTask,
    argv: Vec<String>,
    env: TaskEnv,
    secrets_dir: &Path,
) -> Result<Checked, String> {
    let envoy = ferry::cli::envoy::EnvoyArgs::parse_from_args(&argv[2..])
        .map_err(|e| format!("{argv:?}: {e}"))?;
    if envoy.level().is_none() {
        return Err(format!("{argv:?}: bad -l"));
    }
    if envoy.config_path.as_deref() != Some(&secrets_dir.join("envoy_bootstrap.json")) {
        return Err(format!(
            "{argv:?}: -c must name ${{NOMAD_SECRETS_DIR}}/envoy_bootstrap.json"
        ));
    }
    let ferry_argv = std::iter::once("ferry".to_string()).chain(envoy.ferry_args.clone());
    let cli = ferry::cli::parse(ferry_argv).map_err(|e| format!("{argv:?}: {e}"))?;
    let config = Config::for_control_plane(&cli.proxy, "from-the-bootstrap")
        .map_err(|e| format!("{argv:?}: {e}"))?;
    Ok(Checked {
        task,
        argv,
        env,
        cli,
        config,
    })
}

/// Every ferry task of every job file, checked; panics with every failure.
/// Also holds each file to its [`EXPECTED`] groups, and makes sure no
/// `*.nomad.hcl` file goes unchecked.
fn check_all_jobs(secrets_dir: &Path) -> Vec<Checked> {
    let files = files_ending_with(".nomad.hcl");
    let expected: Vec<&str> = EXPECTED.iter().map(|(f, _)| *f).collect();
    let mut sorted = expected.clone();
    sorted.sort();
    assert_eq!(files, sorted, "job files in nomad-jobs/ vs EXPECTED");

    let mut checked = Vec::new();
    let mut failures = Vec::new();
    for (file, groups) in EXPECTED {
        let body = parse_file(file);
        let tasks = ferry_tasks(file, &body);
        assert_eq!(
            tasks.len(),
            count_ferry_commands(&body),
            "{file}: a ferry command outside job > group > task or sidecar_task"
        );
        // Tasks come group by group, so dedup leaves each group once.
        let mut found: Vec<&str> = tasks.iter().map(|t| t.group.as_str()).collect();
        found.dedup();
        assert_eq!(&found, groups, "{file}: groups with a ferry task");
        for task in tasks {
            let place = task.place.clone();
            match check(task, secrets_dir) {
                Ok(c) => checked.push(c),
                Err(e) => failures.push(format!("{place}: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    checked
}

/// A temporary `${NOMAD_SECRETS_DIR}` with the `si_token` file Nomad writes
/// there when Consul ACLs are on.
fn secrets_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("si_token"),
        "0f6e4b6c-4a1f-4c8e-9d55-3b2a1c0d9e8f\n",
    )
    .expect("write si_token");
    dir
}

#[test]
fn every_ferry_command_line_in_the_jobs_is_accepted() {
    let secrets = secrets_dir();
    for c in check_all_jobs(secrets.path()) {
        let place = &c.task.place;
        if c.argv.get(1).map(String::as_str) == Some("envoy") {
            // xDS mode: identity, agent and token come from the bootstrap.
            assert!(
                c.task.sidecar_of.is_some(),
                "{place}: ferry envoy outside a sidecar_task"
            );
            continue;
        }
        if let Some(service) = &c.task.sidecar_of {
            // Nomad's service ID scheme (spec §5.2): ferry must name the
            // registration Nomad actually makes.
            let service_id = format!(
                "_nomad-task-{ALLOC_ID}-group-{}-{}-{}",
                c.task.group, service.name, service.port
            );
            let ok = [
                ProxyIdentity::SidecarFor(service_id.clone()),
                ProxyIdentity::ProxyId(format!("{service_id}-sidecar-proxy")),
            ];
            assert!(
                c.config.sidecar.as_ref().is_some_and(|id| ok.contains(id)),
                "{place}: {:?} does not name {service_id} or its sidecar: {:?}",
                c.argv,
                c.config.sidecar
            );
        }
        if c.task.network_mode == "bridge" {
            // 127.0.0.1:8500 inside the namespace is not the host's agent,
            // and Nomad sets no CONSUL_HTTP_ADDR for sidecars (spec §5.4).
            let told =
                c.env.get("CONSUL_HTTP_ADDR").is_some() || c.cli.proxy.agent.http_addr.is_some();
            assert!(
                told,
                "{place}: in a bridge namespace, set the agent address"
            );
        }
    }
}

/// The `Kind`, `Name` and `Sources` (source name, action) of an intentions
/// file, which must hold exactly one config entry: `consul config write`
/// takes one per file.
fn read_intentions(file: &str) -> (String, String, Vec<(String, String)>) {
    let body = parse_file(file);
    let kinds = body.attributes().filter(|a| a.key() == "Kind").count();
    assert_eq!(kinds, 1, "{file}: one config entry per file");
    let field = |body: &Body, key: &str| {
        string_attr(body, key).unwrap_or_else(|| panic!("{file}: {key} is not a plain string"))
    };
    let sources = match attr(&body, "Sources") {
        Some(Expression::Array(items)) => items
            .iter()
            .map(|item| {
                let Expression::Object(object) = item else {
                    panic!("{file}: a source is not an object: {item}");
                };
                let get = |key: &str| {
                    object
                        .iter()
                        .find(|(k, _)| k.to_string() == key)
                        .and_then(|(_, v)| match v {
                            Expression::String(s) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_else(|| panic!("{file}: a source without {key}"))
                };
                (get("Name"), get("Action"))
            })
            .collect(),
        _ => panic!("{file}: Sources is not a list"),
    };
    (field(&body, "Kind"), field(&body, "Name"), sources)
}

#[test]
fn every_mesh_call_in_the_jobs_is_allowed_by_an_intention() {
    // destination -> (source -> action), from intentions-*.hcl.
    let mut intentions: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let files = files_ending_with(".hcl");
    let intention_files: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("intentions-"))
        .collect();
    assert!(!intention_files.is_empty(), "no intentions-*.hcl");
    for file in intention_files {
        let (kind, name, sources) = read_intentions(file);
        assert_eq!(kind, "service-intentions", "{file}");
        intentions.entry(name).or_default().extend(sources);
    }
    assert_eq!(
        intentions
            .get("*")
            .and_then(|s| s.get("*"))
            .map(String::as_str),
        Some("deny"),
        "deny by default: Name = \"*\" with source \"*\" denied"
    );

    // (source, destination) of each call: -upstream flags in flags mode,
    // the sidecar_service upstreams for a Nomad sidecar.
    let secrets = secrets_dir();
    let mut calls = Vec::new();
    for c in check_all_jobs(secrets.path()) {
        match &c.task.sidecar_of {
            Some(s) => calls.extend(s.upstreams.iter().map(|u| (s.name.clone(), u.clone()))),
            None => calls.extend(
                c.config
                    .upstreams
                    .iter()
                    .map(|u| (c.config.service.clone(), u.name.clone())),
            ),
        }
    }
    assert!(!calls.is_empty(), "no mesh calls found in the jobs");
    for (source, destination) in calls {
        let action = intentions.get(&destination).and_then(|s| s.get(&source));
        assert_eq!(
            action.map(String::as_str),
            Some("allow"),
            "{source} -> {destination} needs an allow intention"
        );
    }
}

/// The blocks `job > group > service` of a job file, with their group.
fn services(body: &Body) -> Vec<(&Block, &Block)> {
    let mut out = Vec::new();
    for job in blocks(body, "job") {
        for group in blocks(job.body(), "group") {
            for service in blocks(group.body(), "service") {
                out.push((group, service));
            }
        }
    }
    out
}

/// The bridge job exposes add-svc's and sub-svc's HTTP checks through
/// their sidecars (`expose = true`), and the frontend reaches sub-svc
/// through a Unix socket upstream whose path its app is given. What Nomad
/// registers for those (an explicit `Proxy.Expose.Paths` entry, the
/// socket path and mode) is what ferry derives listeners from.
#[test]
fn the_bridge_job_exposes_its_checks_and_has_a_socket_upstream() {
    let file = "calculator-bridge.nomad.hcl";
    let body = parse_file(file);
    let text = std::fs::read_to_string(jobs_dir().join(file)).expect("read");
    assert!(
        text.contains(r#"urlparse(self.path).path == "/health""#),
        "the calculator app answers /health"
    );
    let mut exposed = Vec::new();
    let mut socket = None;
    for (group, service) in services(&body) {
        let name = string_attr(service.body(), "name").unwrap_or_default();
        for check in blocks(service.body(), "check") {
            let b = check.body();
            if matches!(attr(b, "expose"), Some(Expression::Bool(true))) {
                assert_eq!(string_attr(b, "type").as_deref(), Some("http"), "{name}");
                assert_eq!(string_attr(b, "path").as_deref(), Some("/health"), "{name}");
                exposed.push(name.clone());
            }
        }
        let proxy = block(service.body(), "connect")
            .and_then(|c| block(c.body(), "sidecar_service"))
            .and_then(|s| block(s.body(), "proxy"));
        for u in proxy.iter().flat_map(|p| blocks(p.body(), "upstreams")) {
            if let Some(path) = string_attr(u.body(), "local_bind_socket_path") {
                let mode = string_attr(u.body(), "local_bind_socket_mode").unwrap_or_default();
                let dest = string_attr(u.body(), "destination_name").unwrap_or_default();
                socket = Some((label(group), dest, path, mode));
            }
        }
    }
    assert_eq!(exposed, ["add-svc", "sub-svc"]);
    let (group, dest, path, mode) = socket.expect("one socket upstream");
    assert_eq!((group.as_str(), dest.as_str()), ("frontend", "sub-svc"));
    assert!(
        text.contains(&format!(r#"SUB_SVC_SOCK = "{path}""#)),
        "the frontend app is told the socket path {path}"
    );

    // What Nomad registers for them, through ferry's derivation.
    let registration = serde_json::json!({
        "Kind": "connect-proxy", "ID": "frontend-sidecar", "Port": 23000,
        "Proxy": {
            "DestinationServiceName": "frontend", "LocalServicePort": 8080,
            "Config": { "bind_address": "0.0.0.0", "bind_port": 23000 },
            "Upstreams": [{ "DestinationName": dest, "LocalBindSocketPath": path, "LocalBindSocketMode": mode }],
            "Expose": { "Paths": [{ "Path": "/health", "LocalPathPort": 8080, "ListenerPort": 23001, "Protocol": "http" }] }
        }
    });
    let svc: ferry::control::agent::api::AgentService =
        serde_json::from_value(registration).expect("agent service");
    let set = ferry::control::agent::registration::derive(&svc).expect("usable");
    assert_eq!(
        set.upstreams[0].bind,
        ferry::config::BindAddr::Unix(ferry::config::UnixBind {
            path: path.into(),
            mode: Some(0o600)
        })
    );
    assert_eq!(set.expose.len(), 1);
    assert_eq!(set.expose[0].path, "/health");
}
