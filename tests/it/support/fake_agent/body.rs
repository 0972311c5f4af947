//! Request bodies: Go's JSON decoder with DisallowUnknownFields, field
//! names matched as Consul matches them, and typed reads of what decoded.

use std::time::Duration;

use serde_json::Value;

use super::blocking::go_duration;
use super::reply::{bad, Refusal};

#[derive(Clone, Copy)]
pub(super) enum Ty {
    Str,
    Int,
    Bool,
    /// A Go duration string, or nanoseconds.
    Dur,
    Strs,
    /// Opaque (maps like `Config`, `Meta`).
    Any,
    Obj(&'static [Field]),
    Objs(&'static [Field]),
}

pub(super) type Field = (&'static str, Ty);

pub(super) const AUTHORIZE: &[Field] = &[
    ("Target", Ty::Str),
    ("ClientCertURI", Ty::Str),
    ("ClientCertSerial", Ty::Str),
];

pub(super) const CHECK_UPDATE: &[Field] = &[("Status", Ty::Str), ("Output", Ty::Str)];

/// `structs.ServiceDefinition` on CE: no `Namespace`/`Partition`.
pub(super) const SERVICE: &[Field] = &[
    ("Kind", Ty::Str),
    ("ID", Ty::Str),
    ("Name", Ty::Str),
    ("Tags", Ty::Strs),
    ("Address", Ty::Str),
    ("TaggedAddresses", Ty::Any),
    ("Meta", Ty::Any),
    ("Port", Ty::Int),
    ("SocketPath", Ty::Str),
    ("Check", Ty::Obj(CHECK)),
    ("Checks", Ty::Objs(CHECK)),
    (
        "Weights",
        Ty::Obj(&[("Passing", Ty::Int), ("Warning", Ty::Int)]),
    ),
    ("Token", Ty::Str),
    ("EnableTagOverride", Ty::Bool),
    ("Proxy", Ty::Obj(PROXY)),
    (
        "Connect",
        Ty::Obj(&[("Native", Ty::Bool), ("SidecarService", Ty::Any)]),
    ),
    ("Locality", Ty::Any),
];

const PROXY: &[Field] = &[
    ("DestinationServiceName", Ty::Str),
    ("DestinationServiceID", Ty::Str),
    ("LocalServiceAddress", Ty::Str),
    ("LocalServicePort", Ty::Int),
    ("LocalServiceSocketPath", Ty::Str),
    ("Mode", Ty::Str),
    ("TransparentProxy", Ty::Any),
    ("Config", Ty::Any),
    ("Upstreams", Ty::Objs(UPSTREAM)),
    ("MeshGateway", Ty::Any),
    ("Expose", Ty::Any),
    ("AccessLogs", Ty::Any),
    ("EnvoyExtensions", Ty::Any),
];

const UPSTREAM: &[Field] = &[
    ("DestinationType", Ty::Str),
    ("DestinationNamespace", Ty::Str),
    ("DestinationPartition", Ty::Str),
    ("DestinationPeer", Ty::Str),
    ("DestinationName", Ty::Str),
    ("Datacenter", Ty::Str),
    ("LocalBindAddress", Ty::Str),
    ("LocalBindPort", Ty::Int),
    ("LocalBindSocketPath", Ty::Str),
    ("LocalBindSocketMode", Ty::Str),
    ("Config", Ty::Any),
    ("MeshGateway", Ty::Any),
    ("CentrallyConfigured", Ty::Bool),
];

const CHECK: &[Field] = &[
    ("CheckID", Ty::Str),
    ("Name", Ty::Str),
    ("Notes", Ty::Str),
    ("Status", Ty::Str),
    ("TTL", Ty::Dur),
    ("Interval", Ty::Dur),
    ("Timeout", Ty::Dur),
    ("DeregisterCriticalServiceAfter", Ty::Dur),
    ("TCP", Ty::Str),
    ("TCPUseTLS", Ty::Bool),
    ("UDP", Ty::Str),
    ("HTTP", Ty::Str),
    ("Header", Ty::Any),
    ("Method", Ty::Str),
    ("Body", Ty::Str),
    ("DisableRedirects", Ty::Bool),
    ("TLSServerName", Ty::Str),
    ("TLSSkipVerify", Ty::Bool),
    ("GRPC", Ty::Str),
    ("GRPCUseTLS", Ty::Bool),
    ("H2PING", Ty::Str),
    ("H2PingUseTLS", Ty::Bool),
    ("OSService", Ty::Str),
    ("AliasNode", Ty::Str),
    ("AliasService", Ty::Str),
    ("Args", Ty::Any),
    ("ScriptArgs", Ty::Any),
    ("DockerContainerID", Ty::Str),
    ("Shell", Ty::Str),
    ("SuccessBeforePassing", Ty::Int),
    ("FailuresBeforeWarning", Ty::Int),
    ("FailuresBeforeCritical", Ty::Int),
    ("OutputMaxSize", Ty::Int),
];

/// Field names match as Go and Consul match them: case-insensitively, and
/// snake_case for PascalCase.
fn norm(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Parses a request body and checks it against `fields`; errors read as
/// Consul's `Request decode failed: ...` (400).
pub(super) fn decode_body(body: &[u8], fields: &[Field], go_type: &str) -> Result<Value, Refusal> {
    let failed = |why: String| bad(format!("Request decode failed: {why}"));
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(failed("EOF".into()));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| failed(e.to_string()))?;
    check_fields(&value, fields, go_type).map_err(failed)?;
    Ok(value)
}

fn check_fields(v: &Value, fields: &[Field], path: &str) -> Result<(), String> {
    let Value::Object(map) = v else {
        return Err(type_error(v, path, "struct"));
    };
    for (key, value) in map {
        let Some((name, ty)) = fields.iter().find(|(n, _)| norm(n) == norm(key)) else {
            return Err(format!("json: unknown field {key:?}"));
        };
        check_type(value, *ty, &format!("{path}.{name}"))?;
    }
    Ok(())
}

fn check_type(v: &Value, ty: Ty, path: &str) -> Result<(), String> {
    let ok = match (ty, v) {
        (_, Value::Null) | (Ty::Any, _) => true,
        (Ty::Str, Value::String(_)) | (Ty::Bool, Value::Bool(_)) => true,
        (Ty::Int, Value::Number(n)) => n.is_i64() || n.is_u64(),
        (Ty::Dur, Value::String(s)) => {
            return match go_duration(s) {
                Some(_) => Ok(()),
                None => Err(format!("time: invalid duration {s:?}")),
            }
        }
        (Ty::Dur, Value::Number(_)) => true,
        (Ty::Strs, Value::Array(items)) => items.iter().all(Value::is_string),
        (Ty::Obj(fields), _) => return check_fields(v, fields, path),
        (Ty::Objs(fields), Value::Array(items)) => {
            return items.iter().try_for_each(|i| check_fields(i, fields, path));
        }
        _ => false,
    };
    let go = match ty {
        Ty::Str => "string",
        Ty::Int => "int",
        Ty::Bool => "bool",
        Ty::Dur => "time.Duration",
        Ty::Strs => "[]string",
        _ => "[]struct",
    };
    if ok {
        Ok(())
    } else {
        Err(type_error(v, path, go))
    }
}

fn type_error(v: &Value, path: &str, go: &str) -> String {
    let json = match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    format!("json: cannot unmarshal {json} into Go struct field {path} of type {go}")
}

/// A field by Go's matching rules; `null` counts as absent.
pub(super) fn field<'a>(obj: &'a Value, name: &str) -> Option<&'a Value> {
    let map = obj.as_object()?;
    let found = map.iter().find(|(k, _)| norm(k) == norm(name));
    found.map(|(_, v)| v).filter(|v| !v.is_null())
}

pub(super) fn str_of(obj: &Value, name: &str) -> String {
    field(obj, name)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

pub(super) fn u64_of(obj: &Value, name: &str) -> u64 {
    field(obj, name).and_then(Value::as_u64).unwrap_or(0)
}

pub(super) fn bool_of(obj: &Value, name: &str) -> bool {
    field(obj, name).and_then(Value::as_bool).unwrap_or(false)
}

pub(super) fn duration_of(obj: &Value, name: &str) -> Option<Duration> {
    match field(obj, name)? {
        Value::String(s) => go_duration(s),
        Value::Number(n) => n.as_u64().map(Duration::from_nanos),
        _ => None,
    }
    .filter(|d| !d.is_zero())
}
