//! The admin listener (`-admin-addr`): what operators and orchestrators ask
//! a sidecar.
//!
//! - `GET /metrics`: every metric, Prometheus/OpenMetrics text format.
//! - `GET /ready`: 200 once certificates are loaded and every listener is
//!   bound; 503 before that and while draining (so a load balancer or
//!   Nomad check stops sending work first).
//! - `GET /live`: 200 while the process serves HTTP at all.
//! - `GET /status`: JSON with the identity, leaf serial and expiry, roots,
//!   listeners and each upstream's instances.
//!
//! It is bound first thing at startup, so `/ready` can say "not yet" while
//! ferry waits for the agent, and it keeps answering through the drain.
//! Plain HTTP: bind it to loopback or a management network.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ops::metrics::Metrics;

/// A `/status` document, built on request.
pub type StatusFn = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the admin endpoints report on.
pub struct Admin {
    metrics: Arc<Metrics>,
    ready: AtomicBool,
    status: OnceLock<StatusFn>,
}

impl Admin {
    /// Not ready, no status yet.
    pub fn new(metrics: Arc<Metrics>) -> Admin {
        Admin {
            metrics,
            ready: AtomicBool::new(false),
            status: OnceLock::new(),
        }
    }

    /// Marks ferry ready (or not: draining).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Installs the `/status` source once everything it reports exists.
    pub fn set_status(&self, f: StatusFn) {
        let _ = self.status.set(f);
    }

    fn respond(&self, req: &Request<Incoming>, metrics_only: bool) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        if metrics_only && req.uri().path() != "/metrics" {
            return text(StatusCode::NOT_FOUND, "not found: try /metrics\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.render())));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            "/ready" if self.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n"),
            "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/live" => text(StatusCode::OK, "live\n"),
            "/status" => match self.status.get() {
                Some(f) => {
                    let mut r = Response::new(Full::new(Bytes::from(f().to_string())));
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    r
                }
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "starting: waiting for certificates\n",
                ),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /ready, /live or /status\n",
            ),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

/// Serves the admin endpoints until `cancel` fires. Each connection must
/// send its request headers within 5 s, so idle sockets cannot pile up.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    serve_paths(listener, admin, tracker, cancel, false).await
}

/// [`serve`] answering `/metrics` only (Envoy's
/// `envoy_prometheus_bind_addr` listener); every other path is 404.
pub async fn serve_metrics(
    listener: TcpListener,
    admin: Arc<Admin>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    serve_paths(listener, admin, tracker, cancel, true).await
}

async fn serve_paths(
    listener: TcpListener,
    admin: Arc<Admin>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    metrics_only: bool,
) {
    while let Some((stream, _)) = crate::proxy::net::accept(&listener, &cancel, "admin").await {
        let admin = admin.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.respond(&req, metrics_only)) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5));
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}
