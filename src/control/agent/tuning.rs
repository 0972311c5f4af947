//! The opaque `Config` maps of a proxy registration (`Proxy.Config` and each
//! `Proxy.Upstreams[].Config`), read the way the agent may deliver them.
//!
//! Two shapes reach a proxy for the same setting:
//! - **as registered**: snake_case keys, numbers as JSON floats or quoted
//!   strings, durations as Go duration strings (`"30s"`);
//! - **merged from a `service-defaults` entry** (its `UpstreamConfig`): the
//!   agent stores the Go structs themselves under the snake_case key, so the
//!   nested fields arrive with Go's field names (`MaxConnections`,
//!   `BaseEjectionTime`) and durations as integer **nanoseconds**.
//!
//! Keys are therefore matched as Consul's decoder does: case-insensitively,
//! underscores ignored. A value that is present but malformed is reported
//! as a note and that one setting keeps its default; nothing else of the
//! registration is affected.
//!
//! Passive health (`passive_health_check`) maps onto ferry's ejection:
//! `max_failures` consecutive connect/handshake failures eject an instance
//! for `base_ejection_time` (absent: Envoy's defaults, 5 and 30 s).
//! `interval` is accepted but not used: ferry, like Envoy for consecutive
//! failures, ejects on the failure that crosses the threshold (Envoy's
//! sweeps every `interval` only return hosts to service).
//! `max_ejection_percent` is accepted but not used: ejected instances stay
//! candidates of last resort, so ejection alone never leaves an upstream
//! without instances. `enforcing_consecutive_5xx` (Envoy's chance, in
//! percent, of acting on such a run of failures; for TCP they are
//! connection failures) is ignored with a note: ferry always acts.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::proxy::balancer::EjectionPolicy;

/// Envoy's `consecutive_5xx` default, used when `max_failures` is absent.
pub const DEFAULT_MAX_FAILURES: u32 = 5;
/// Envoy's `base_ejection_time` default.
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);

/// What one upstream's `Config` changes from the global flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTuning {
    /// `connect_timeout_ms`.
    pub deadline: Option<Duration>,
    /// `limits.max_connections`.
    pub max_conns: Option<usize>,
    /// `passive_health_check`.
    pub ejection: Option<EjectionPolicy>,
}

/// Consul's key matching: case-insensitive, underscores ignored.
fn same_key(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        s.chars()
            .filter(|c| *c != '_')
            .map(|c| c.to_ascii_lowercase())
            .collect::<String>()
    };
    norm(a) == norm(b)
}

/// `key` in a registration's top-level map: the exact key first.
pub fn lookup<'a>(map: &'a HashMap<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key)
        .or_else(|| map.iter().find(|(k, _)| same_key(k, key)).map(|(_, v)| v))
}

/// `key` in a nested JSON object.
fn field<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key)
        .or_else(|| obj.iter().find(|(k, _)| same_key(k, key)).map(|(_, v)| v))
}

/// A whole non-negative number: a JSON number or a numeric string.
pub fn count(v: &Value) -> Result<u64, String> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n.is_finite() && n >= 0.0 && n.fract() == 0.0 && n <= u32::MAX as f64 => {
            Ok(n as u64)
        }
        _ => Err(format!("{v} is not a whole number")),
    }
}

/// Milliseconds, more than 0: a JSON number or a numeric string.
pub fn millis(v: &Value) -> Result<Duration, String> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n.is_finite() && n > 0.0 && n < 1e12 => Ok(Duration::from_millis(n as u64)),
        _ => Err(format!("{v} is not a positive number of milliseconds")),
    }
}

/// A duration: a Go duration string, or a number of nanoseconds (a Go
/// `time.Duration` the agent marshalled).
pub fn duration(v: &Value) -> Result<Duration, String> {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(ns) if (0.0..1e18).contains(&ns) => Ok(Duration::from_nanos(ns as u64)),
            _ => Err(format!("{v} is not a duration in nanoseconds")),
        },
        Value::String(s) => go_duration(s.trim())
            .ok_or_else(|| format!("{s:?} is not a duration (examples: 500ms, 30s, 1m)")),
        _ => Err(format!("{v} is not a duration")),
    }
}

/// Go's `time.ParseDuration` for the non-negative values a setting takes.
fn go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..num_len].parse().ok()?;
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
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Reads `key` with `parse`; a malformed value becomes a note and `None`.
pub fn read<T>(
    map: &HashMap<String, Value>,
    key: &str,
    what: &str,
    parse: impl Fn(&Value) -> Result<T, String>,
    notes: &mut Vec<String>,
) -> Option<T> {
    match lookup(map, key)? {
        Value::Null => None,
        v => match parse(v) {
            Ok(t) => Some(t),
            Err(e) => {
                notes.push(format!("{what}.{key}: {e}; the default is kept"));
                None
            }
        },
    }
}

/// One upstream's `Config`. `what` names it in notes.
pub fn upstream(
    cfg: &HashMap<String, Value>,
    what: &str,
    notes: &mut Vec<String>,
) -> UpstreamTuning {
    let deadline = read(cfg, "connect_timeout_ms", what, millis, notes);
    let max_conns = match lookup(cfg, "limits") {
        None | Some(Value::Null) => None,
        Some(Value::Object(limits)) => match field(limits, "max_connections") {
            None | Some(Value::Null) => None,
            Some(v) => match count(v) {
                Ok(0) => {
                    notes.push(format!(
                        "{what}.limits.max_connections: 0 would refuse every connection; the default is kept"
                    ));
                    None
                }
                Ok(n) => Some(n as usize),
                Err(e) => {
                    notes.push(format!(
                        "{what}.limits.max_connections: {e}; the default is kept"
                    ));
                    None
                }
            },
        },
        Some(v) => {
            notes.push(format!(
                "{what}.limits: {v} is not an object; the defaults are kept"
            ));
            None
        }
    };
    let ejection = match lookup(cfg, "passive_health_check") {
        None | Some(Value::Null) => None,
        Some(Value::Object(p)) => passive_health_check(p, what, notes),
        Some(v) => {
            notes.push(format!(
                "{what}.passive_health_check: {v} is not an object; the defaults are kept"
            ));
            None
        }
    };
    UpstreamTuning {
        deadline,
        max_conns,
        ejection,
    }
}

/// `passive_health_check`, either shape. Any malformed field discards the
/// whole block (its fields only make sense together).
fn passive_health_check(
    p: &serde_json::Map<String, Value>,
    what: &str,
    notes: &mut Vec<String>,
) -> Option<EjectionPolicy> {
    let what = format!("{what}.passive_health_check");
    let mut bad = Vec::new();
    let mut get = |key: &str, parse: &dyn Fn(&Value) -> Result<u64, String>| match field(p, key) {
        None | Some(Value::Null) => None,
        Some(v) => parse(v).map_err(|e| bad.push(format!("{key}: {e}"))).ok(),
    };
    let max_failures = get("max_failures", &count);
    let percent = |v: &Value| {
        count(v).and_then(|n| {
            if n <= 100 {
                Ok(n)
            } else {
                Err(format!("{n} is not a percentage"))
            }
        })
    };
    let enforcing = get("enforcing_consecutive_5xx", &percent);
    let _max_ejection_percent = get("max_ejection_percent", &percent);
    let nanos = |v: &Value| duration(v).map(|d| d.as_nanos() as u64);
    let _interval = get("interval", &nanos);
    let base = get("base_ejection_time", &nanos);
    if !bad.is_empty() {
        notes.push(format!(
            "{what}: {}; ejection keeps the global -eject-after/-eject-for",
            bad.join(", ")
        ));
        return None;
    }
    if enforcing.is_some() {
        notes.push(format!(
            "{what}.enforcing_consecutive_5xx is ignored: ferry ejects after every max_failures consecutive failures"
        ));
    }
    let after_failures = match max_failures {
        Some(0) | None => DEFAULT_MAX_FAILURES,
        Some(n) => n as u32,
    };
    Some(EjectionPolicy {
        after_failures,
        duration: base
            .map(Duration::from_nanos)
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_BASE_EJECTION),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> HashMap<String, Value> {
        serde_json::from_value(v).expect("object")
    }

    #[test]
    fn registered_snake_case_shape() {
        let mut notes = Vec::new();
        let t = upstream(
            &map(json!({
                "connect_timeout_ms": "2500",
                "limits": {"max_connections": 3.0, "max_pending_requests": 9},
                "passive_health_check": {"interval": "10s", "max_failures": 2, "base_ejection_time": "45s", "max_ejection_percent": 50}
            })),
            "db",
            &mut notes,
        );
        assert_eq!(t.deadline, Some(Duration::from_millis(2500)));
        assert_eq!(t.max_conns, Some(3));
        assert_eq!(
            t.ejection,
            Some(EjectionPolicy {
                after_failures: 2,
                duration: Duration::from_secs(45)
            })
        );
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn merged_service_defaults_shape_uses_go_names_and_nanoseconds() {
        let mut notes = Vec::new();
        let t = upstream(
            &map(json!({
                "connect_timeout_ms": 750,
                "limits": {"MaxConnections": 1, "MaxPendingRequests": 2},
                "passive_health_check": {"Interval": 10_000_000_000u64, "MaxFailures": 1, "EnforcingConsecutive5xx": 100, "BaseEjectionTime": 2_000_000_000u64}
            })),
            "db",
            &mut notes,
        );
        assert_eq!(t.deadline, Some(Duration::from_millis(750)));
        assert_eq!(t.max_conns, Some(1));
        assert_eq!(
            t.ejection,
            Some(EjectionPolicy {
                after_failures: 1,
                duration: Duration::from_secs(2)
            })
        );
        assert_eq!(notes.len(), 1, "5xx is noted as ignored: {notes:?}");
        assert!(notes[0].contains("enforcing_consecutive_5xx"));
    }

    #[test]
    fn absent_fields_take_envoys_defaults() {
        let mut notes = Vec::new();
        let t = upstream(
            &map(json!({"passive_health_check": {"interval": "1s"}})),
            "db",
            &mut notes,
        );
        assert_eq!(
            t.ejection,
            Some(EjectionPolicy {
                after_failures: DEFAULT_MAX_FAILURES,
                duration: DEFAULT_BASE_EJECTION
            })
        );
        assert_eq!(
            upstream(&map(json!({})), "db", &mut notes),
            UpstreamTuning::default()
        );
    }

    #[test]
    fn malformed_values_are_noted_and_keep_their_default() {
        let mut notes = Vec::new();
        let t = upstream(
            &map(json!({
                "connect_timeout_ms": "soon",
                "limits": {"max_connections": -1},
                "passive_health_check": {"max_failures": 2, "base_ejection_time": "forever"}
            })),
            "db",
            &mut notes,
        );
        assert_eq!(t, UpstreamTuning::default());
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[0].contains("connect_timeout_ms"), "{notes:?}");
        assert!(notes[1].contains("max_connections"), "{notes:?}");
        assert!(notes[2].contains("base_ejection_time"), "{notes:?}");
        let mut notes = Vec::new();
        upstream(
            &map(
                json!({"limits": {"max_connections": 0}, "passive_health_check": {"max_ejection_percent": 101}}),
            ),
            "db",
            &mut notes,
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("30"), None, "a unit is required");
        assert_eq!(go_duration("-1s"), None);
    }
}
