//! Nomad bridge mode: exposed paths and checks (`Proxy.Expose`) as the
//! agent shows and runs them, and upstream settings merged in from a
//! `service-defaults` entry.

use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::net::TcpStream;

use super::blocking::go_duration;
use super::body::{bool_of, field, str_of, u64_of};
use super::registration::omit_empty;
use super::Health;

/// `Proxy.Expose` as the agent returns it: PascalCase whatever the
/// registration's spelling, each path's `Protocol` defaulted to `http`
/// (`ExposeConfig.Finalize`), `omitempty` gaps.
pub(super) fn api_expose(expose: Option<&Value>) -> Value {
    let Some(e) = expose else {
        return json!({});
    };
    let paths: Vec<Value> = field(e, "Paths")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let protocol = Some(str_of(p, "Protocol"))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "http".into());
            omit_empty(json!({
                "ListenerPort": u64_of(p, "ListenerPort"),
                "Path": str_of(p, "Path"),
                "LocalPathPort": u64_of(p, "LocalPathPort"),
                "Protocol": protocol,
                "ParsedFromCheck": bool_of(p, "ParsedFromCheck"),
            }))
        })
        .collect();
    omit_empty(json!({ "Checks": bool_of(e, "Checks"), "Paths": paths }))
}

/// The first port the agent assigns to an exposed check
/// (`expose_min_port`); `expose_max_port` is 21755.
const EXPOSE_MIN_PORT: u16 = 21500;

/// What `Expose.Checks` makes the agent do with a service's HTTP check
/// (`http://HOST:PORT/PATH`): the check now targets `proxy_ip` on a port
/// from the expose range, and the path it implies is
/// `{Path, LocalPathPort: PORT, ListenerPort, ParsedFromCheck}`. Returns
/// the rewritten check URL and that path; the agent's HTTP API shows the
/// proxy neither (the check's Definition comes back empty), which is why
/// ferry needs the paths listed.
pub fn expose_check(check_url: &str, proxy_ip: &str, nth: u16) -> Option<(String, Value)> {
    let rest = check_url.strip_prefix("http://")?;
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let local_port: u16 = hostport.rsplit_once(':')?.1.parse().ok()?;
    let listener_port = EXPOSE_MIN_PORT.checked_add(nth)?;
    let path = if path.is_empty() { "/" } else { path };
    let url = format!("http://{proxy_ip}:{listener_port}{path}");
    let exposed = json!({
        "ListenerPort": listener_port,
        "Path": path,
        "LocalPathPort": local_port,
        "Protocol": "http",
        "ParsedFromCheck": true,
    });
    Some((url, exposed))
}

/// One run of an agent HTTP check against `url` (`checks.CheckHTTP`): a
/// GET with the agent's User-Agent and Accept headers and a timeout; 2xx
/// is passing, 429 warning, anything else or no answer critical.
pub async fn http_check(url: &str, timeout: Duration) -> Health {
    let Some(rest) = url.strip_prefix("http://") else {
        return Health::Critical;
    };
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let run = async {
        let mut s = TcpStream::connect(hostport).await.ok()?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: Consul Health Check\r\nAccept: text/plain, text/*, */*\r\nConnection: close\r\n\r\n"
        );
        tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
            .await
            .ok()?;
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut got)
            .await
            .ok()?;
        let head = String::from_utf8_lossy(&got);
        head.split_whitespace().nth(1)?.parse::<u16>().ok()
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Some(code)) if (200..300).contains(&code) => Health::Passing,
        Ok(Some(429)) => Health::Warning,
        _ => Health::Critical,
    }
}

/// An upstream's settings from a `service-defaults` entry
/// (`UpstreamConfig.Overrides[]`/`Defaults`, as `consul config write`
/// takes them: `connect_timeout_ms`, `limits`, `passive_health_check`,
/// durations as strings), in the shape the agent stores after
/// `UpstreamConfig.MergeInto`: the top-level keys in snake_case, the
/// structs under them with Go field names, durations as nanoseconds,
/// unset fields left out.
pub(super) fn merged_upstream_config(entry: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    let ns = |v: &Value| match v {
        Value::String(s) => go_duration(s).map(|d| json!(d.as_nanos() as u64)),
        Value::Number(_) => Some(v.clone()),
        _ => None,
    };
    if let Some(ms) = field(entry, "ConnectTimeoutMs").and_then(Value::as_u64) {
        out.insert("connect_timeout_ms".into(), json!(ms));
    }
    if let Some(l) = field(entry, "Limits") {
        let mut limits = Map::new();
        for key in [
            "MaxConnections",
            "MaxPendingRequests",
            "MaxConcurrentRequests",
        ] {
            if let Some(v) = field(l, key) {
                limits.insert(key.into(), v.clone());
            }
        }
        out.insert("limits".into(), Value::Object(limits));
    }
    if let Some(p) = field(entry, "PassiveHealthCheck") {
        let mut phc = Map::new();
        for key in [
            "MaxFailures",
            "EnforcingConsecutive5xx",
            "MaxEjectionPercent",
        ] {
            if let Some(v) = field(p, key) {
                phc.insert(key.into(), v.clone());
            }
        }
        for key in ["Interval", "BaseEjectionTime"] {
            if let Some(v) = field(p, key).and_then(ns) {
                phc.insert(key.into(), v);
            }
        }
        out.insert("passive_health_check".into(), Value::Object(phc));
    }
    out
}
