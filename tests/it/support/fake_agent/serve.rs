//! Serving: a listener whose connections die when the agent pauses, the
//! routes, and the front door every request passes through (call log,
//! stalls, faults, the CE checks, index rewinds).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::blocking::Params;
use super::ca::{leaf, roots};
use super::health::{health_connect, query_execute};
use super::intentions::{authorize, intentions_match};
use super::reply::{bad, text};
use super::services::{
    agent_service, agent_services, catalog_service, check_fail, check_pass, check_update,
    check_warn, deregister, register,
};
use super::state::{AgentState, Shared};
use super::Call;

/// Binds with SO_REUSEADDR so that `resume` can take the port back while
/// connections cut by `pause` linger in TIME_WAIT.
pub(super) async fn bind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    if let Err(e) = socket.bind(addr) {
        panic!("fake agent: cannot bind {addr}: {e}");
    }
    socket.listen(1024).expect("listen")
}

pub(super) fn serve(listener: TcpListener, shared: Arc<Shared>) -> JoinHandle<()> {
    let app = router(shared.clone());
    let listener = AgentListener {
        inner: listener,
        shared,
    };
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

struct AgentListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for AgentListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((io, peer)) => {
                    let alive = self.shared.lock().alive.clone();
                    return (Guarded::new(io, alive), peer);
                }
                // E.g. out of file descriptors: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection that fails every read and write once its agent pauses, so
/// idle keep-alive connections close too and clients see the agent go.
struct Guarded {
    io: TcpStream,
    gone: Pin<Box<WaitForCancellationFutureOwned>>,
    cut: bool,
}

impl Guarded {
    fn new(io: TcpStream, alive: CancellationToken) -> Guarded {
        Guarded {
            io,
            gone: Box::pin(alive.cancelled_owned()),
            cut: false,
        }
    }

    /// Registers for the pause and reports whether it happened.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.cut && self.gone.as_mut().poll(cx).is_ready() {
            self.cut = true;
        }
        if self.cut {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "fake agent paused",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/agent/connect/ca/roots", get(roots))
        .route("/v1/agent/connect/ca/leaf/{service}", get(leaf))
        .route("/v1/agent/connect/authorize", post(authorize))
        .route("/v1/health/connect/{service}", get(health_connect))
        .route("/v1/query/{name}/execute", get(query_execute))
        .route("/v1/agent/services", get(agent_services))
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route("/v1/agent/service/{id}", get(agent_service))
        .route("/v1/agent/check/pass/{id}", put(check_pass))
        .route("/v1/agent/check/warn/{id}", put(check_warn))
        .route("/v1/agent/check/fail/{id}", put(check_fail))
        .route("/v1/agent/check/update/{id}", put(check_update))
        .route("/v1/connect/intentions/match", get(intentions_match))
        .route("/v1/catalog/service/{name}", get(catalog_service))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "404 page not found") })
        .method_not_allowed_fallback(|req: Request| async move {
            let reason = format!("method {} not allowed", req.method());
            text(StatusCode::METHOD_NOT_ALLOWED, reason)
        })
        .layer(middleware::from_fn_with_state(shared.clone(), front_door))
        .with_state(shared)
}

/// Who is calling: the token used, and the pause signal for this connection.
#[derive(Clone)]
pub(super) struct Caller {
    pub(super) token: Option<String>,
    pub(super) alive: CancellationToken,
}

/// The shared state as handlers extract it.
pub(super) type Sh = State<Arc<Shared>>;

/// Logs the call, then applies stalls, faults and the CE checks, in that
/// order; after the handler, rewinds the index if asked to.
async fn front_door(State(sh): Sh, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return text(StatusCode::BAD_REQUEST, "Request body too large");
    };
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let params = Query::<Params>::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let token = token_of(&parts.headers, &params);
    let call = Call {
        method: parts.method.to_string(),
        path: path.clone(),
        query,
        token: token.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
        at: Instant::now(),
    };
    let alive = sh.change(|s| {
        s.calls.push(call);
        s.alive.clone()
    });
    let released = |s: &AgentState| !s.stalled.iter().any(|p| path.starts_with(p));
    if let Err(refusal) = sh.wait_until(&alive, None, released).await {
        return refusal.into_response();
    }
    if let Some(resp) = sh.lock().take_fault(&path) {
        return resp;
    }
    if let Some(resp) = enterprise_only(&parts.headers, &params) {
        return resp;
    }
    parts.extensions.insert(Caller { token, alive });
    let resp = next.run(Request::from_parts(parts, Body::from(body))).await;
    rewind_index(&sh, &path, resp)
}

/// The token Consul would use: `?token=`, then `X-Consul-Token`, then
/// `Authorization: Bearer`.
fn token_of(headers: &HeaderMap, q: &Params) -> Option<String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = header("authorization").and_then(|v| {
        let (scheme, value) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then_some(value)
    });
    [q.get("token"), header("x-consul-token"), bearer]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|t| !t.is_empty())
        .map(String::from)
}

/// Consul CE answers any namespace or partition, even `default`, with 400.
fn enterprise_only(headers: &HeaderMap, q: &Params) -> Option<Response> {
    let header = |name: &str| headers.get(name).is_some_and(|v| !v.is_empty());
    let param = |name: &str| q.get(name).is_some_and(|v| !v.is_empty());
    let (what, feature) = if header("x-consul-namespace") {
        ("header: \"X-Consul-Namespace\"", "Namespaces")
    } else if param("ns") {
        ("query parameter: \"ns\"", "Namespaces")
    } else if header("x-consul-partition") {
        ("header: \"X-Consul-Partition\"", "Partitions")
    } else if param("partition") {
        ("query parameter: \"partition\"", "Partitions")
    } else {
        return None;
    };
    let reason = format!("Invalid {what} - {feature} are a Consul Enterprise feature");
    Some(bad(reason).into_response())
}

/// Applies a pending `set_index_backwards` to a response that has an index.
fn rewind_index(sh: &Shared, path: &str, mut resp: Response) -> Response {
    let index = resp
        .headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let Some(index) = index else { return resp };
    let armed = sh.change(|s| {
        let i = s.backwards.iter().position(|p| path.starts_with(p))?;
        Some(s.backwards.remove(i))
    });
    if armed.is_some() {
        let lower = HeaderValue::from((index / 2).max(1));
        resp.headers_mut().insert("X-Consul-Index", lower);
    }
    resp
}
