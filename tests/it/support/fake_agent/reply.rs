//! How the agent answers: plain-text errors as Consul words them, JSON, and
//! the blocking headers.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

pub(super) type Reply = Result<Response, Refusal>;

pub(super) fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let content_type = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    (status, content_type, body.into()).into_response()
}

/// An error answer; Consul's error bodies are plain text.
#[derive(Debug)]
pub(super) struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        text(self.0, self.1)
    }
}

pub(super) fn refuse(status: StatusCode, body: impl Into<String>) -> Refusal {
    Refusal(status, body.into())
}

pub(super) fn bad(body: impl Into<String>) -> Refusal {
    refuse(StatusCode::BAD_REQUEST, body)
}

pub(super) fn json_reply(v: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// A JSON answer with the blocking headers; the index is never 0.
pub(super) fn indexed(index: u64, v: &Value) -> Response {
    let mut resp = json_reply(v);
    let h = resp.headers_mut();
    h.insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    h.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    h.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    resp
}
