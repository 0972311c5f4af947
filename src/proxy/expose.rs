//! Exposed paths (`Proxy.Expose`): plain-HTTP listeners that let something
//! outside the mesh (the agent's HTTP checks, a metrics scraper) reach one
//! exact path of the local app, without mTLS.
//!
//! Each listener answers HTTP/1.1 and h2c (HTTP/2 with prior knowledge) and
//! forwards a request only when its path equals an exposed path (the query
//! string goes along) and its method is GET or HEAD; any other path is 404
//! and any other method 405, and neither ever reaches the app. The app is
//! dialed on `127.0.0.1:LocalPathPort` for each request, over HTTP/1.1
//! (`http`) or h2c (`http2`), and its answer is relayed whole.
//!
//! Bounded: connections per listener, requests in flight per listener,
//! request header size, the time to send the request head, the time the
//! app has to answer, and the size of its answer. Requests are counted per
//! path and status (`ferry_expose_requests`).

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ops::metrics::Metrics;

/// Runs the tasks hyper spawns for HTTP/2 (streams, connection drivers)
/// on the listener's tracker, so they have an owner, and ends them at
/// `stop` like everything else of the listener.
#[derive(Clone)]
struct Tracked(TaskTracker, CancellationToken);

impl<F> hyper::rt::Executor<F> for Tracked
where
    F: std::future::Future + Send + 'static,
{
    fn execute(&self, fut: F) {
        let stop = self.1.clone();
        self.0.spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// How the app is spoken to on an exposed path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1.
    Http,
    /// HTTP/2 with prior knowledge (h2c), e.g. gRPC health checks.
    Http2,
}

/// One exposed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposePath {
    /// Where its listener binds (the public listener's IP, `ListenerPort`).
    pub listen: SocketAddr,
    /// The exact path forwarded, starting with `/`.
    pub path: String,
    /// The app's port on 127.0.0.1.
    pub local_port: u16,
    pub protocol: Protocol,
}

/// What one listener may hold.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Open connections per listener; more are closed at accept.
    pub conns: usize,
    /// Requests being forwarded at once per listener; more get 503.
    pub in_flight: usize,
    /// Request header bytes (HTTP/1.1 buffer, HTTP/2 header list).
    pub header_bytes: usize,
    /// Time to send the first byte, and (HTTP/1.1) the whole request head.
    pub header_timeout: Duration,
    /// Time the app has to connect and answer completely.
    pub response_timeout: Duration,
    /// Largest answer relayed from the app.
    pub body_bytes: usize,
    /// A connection is closed this long after it opened.
    pub lifetime: Duration,
}

impl Default for Bounds {
    fn default() -> Bounds {
        Bounds {
            conns: 64,
            in_flight: 16,
            header_bytes: 16 * 1024,
            header_timeout: Duration::from_secs(3),
            response_timeout: Duration::from_secs(10),
            body_bytes: 1024 * 1024,
            lifetime: Duration::from_secs(60),
        }
    }
}

/// One exposed path as the listener routes it.
struct Route {
    path: String,
    target: SocketAddr,
    protocol: Protocol,
}

/// One listener's routes, limits and counters.
pub struct Exposed {
    routes: Vec<Route>,
    bounds: Bounds,
    conns: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Exposed {
    /// The listener for `paths` (all with the same `listen`).
    pub fn new(paths: &[ExposePath], bounds: Bounds, metrics: Arc<Metrics>) -> Exposed {
        Exposed {
            routes: paths
                .iter()
                .map(|p| Route {
                    path: p.path.clone(),
                    target: SocketAddr::from((Ipv4Addr::LOCALHOST, p.local_port)),
                    protocol: p.protocol,
                })
                .collect(),
            conns: Arc::new(Semaphore::new(bounds.conns)),
            in_flight: Arc::new(Semaphore::new(bounds.in_flight)),
            bounds,
            metrics,
        }
    }

    async fn respond(&self, req: Request<Incoming>, exec: &Tracked) -> Response<Full<Bytes>> {
        let Some(route) = self.routes.iter().find(|r| r.path == req.uri().path()) else {
            self.metrics.exposed("other", 404);
            return text(StatusCode::NOT_FOUND, "not an exposed path\n");
        };
        if req.method() != Method::GET && req.method() != Method::HEAD {
            self.metrics.exposed(&route.path, 405);
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
            r.headers_mut()
                .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let Ok(_slot) = self.in_flight.clone().try_acquire_owned() else {
            self.metrics.exposed(&route.path, 503);
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many requests in flight\n",
            );
        };
        let limit = self.bounds.body_bytes;
        let r = match tokio::time::timeout(
            self.bounds.response_timeout,
            forward(route, req, limit, exec),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(why)) => {
                tracing::debug!(path = %route.path, app = %route.target, error = %why, "exposed path: app unreachable");
                text(StatusCode::BAD_GATEWAY, "the app did not answer\n")
            }
            Err(_) => text(
                StatusCode::GATEWAY_TIMEOUT,
                "the app did not answer in time\n",
            ),
        };
        self.metrics.exposed(&route.path, r.status().as_u16());
        r
    }
}

/// Why a request could not be relayed.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
}

/// Headers that describe one hop, never relayed.
fn hop_by_hop(name: &hyper::header::HeaderName) -> bool {
    use hyper::header as h;
    name == h::CONNECTION
        || name == h::TE
        || name == h::TRAILER
        || name == h::TRANSFER_ENCODING
        || name == h::UPGRADE
        || name == h::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if !hop_by_hop(k) {
            to.append(k.clone(), v.clone());
        }
    }
}

/// Dials the app and relays one request (without its body: GET and HEAD
/// carry none that matters) and the whole answer.
async fn forward(
    route: &Route,
    req: Request<Incoming>,
    limit: usize,
    exec: &Tracked,
) -> Result<Response<Full<Bytes>>, ForwardError> {
    let (parts, _body) = req.into_parts();
    let head = parts.method == Method::HEAD;
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or(route.path.as_str(), |p| p.as_str())
        .to_string();
    let stream = TcpStream::connect(route.target)
        .await
        .map_err(ForwardError::Connect)?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    let mut out = Request::builder().method(parts.method.clone());
    let host = parts.headers.get(hyper::header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    match route.protocol {
        Protocol::Http => out = out.uri(path_and_query.as_str()),
        Protocol::Http2 => {
            let uri: Uri = format!("http://{}{}", route.target, path_and_query)
                .parse()
                .map_err(hyper::http::Error::from)?;
            out = out.uri(uri);
        }
    }
    let mut out = out.body(http_body_util::Empty::<Bytes>::new())?;
    copy_headers(&parts.headers, out.headers_mut());
    if route.protocol == Protocol::Http {
        if let Some(h) = host {
            out.headers_mut().insert(hyper::header::HOST, h);
        }
    } else {
        out.headers_mut().remove(hyper::header::HOST);
    }
    let (status, headers, body) = match route.protocol {
        Protocol::Http => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            let send = async move {
                let resp = sender.send_request(out).await?;
                read_answer(resp, limit, head).await
            };
            let (answer, _) = tokio::join!(send, conn);
            answer?
        }
        Protocol::Http2 => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(exec.clone(), io).await?;
            let send = async move {
                let resp = sender.send_request(out).await?;
                read_answer(resp, limit, head).await
            };
            let (answer, _) = tokio::join!(send, conn);
            answer?
        }
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    copy_headers(&headers, r.headers_mut());
    Ok(r)
}

async fn read_answer(
    resp: Response<Incoming>,
    limit: usize,
    head: bool,
) -> Result<(StatusCode, HeaderMap, Bytes), ForwardError> {
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(h) => ForwardError::Http(*h),
            Err(_) => ForwardError::TooLarge(limit),
        })?
        .to_bytes();
    let mut headers = parts.headers;
    // The body is relayed whole, so its length is set again from it; a
    // HEAD answer keeps the app's (it describes a body never sent).
    if !head {
        headers.remove(hyper::header::CONTENT_LENGTH);
    }
    Ok((parts.status, headers, body))
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

/// Serves one exposed listener until `stop` fires; connections run on
/// `tracker` and end at `stop` too (these are checks and scrapes, nothing
/// to drain).
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Exposed>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    while let Some((stream, _)) = super::net::accept(&listener, &stop, "expose").await {
        let Ok(permit) = ctx.conns.clone().try_acquire_owned() else {
            continue;
        };
        let ctx = ctx.clone();
        let stop = stop.clone();
        let exec = Tracked(tracker.clone(), stop.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let b = ctx.bounds;
            // The first byte, bounded: otherwise a silent connection would
            // wait in protocol detection.
            if tokio::time::timeout(b.header_timeout, stream.readable())
                .await
                .is_err()
            {
                return;
            }
            let _ = stream.set_nodelay(true);
            let handler = ctx.clone();
            let for_requests = exec.clone();
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                let exec = for_requests.clone();
                async move { Ok::<_, Infallible>(handler.respond(req, &exec).await) }
            });
            let mut builder = auto::Builder::new(exec);
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(b.header_timeout)
                .max_buf_size(b.header_bytes.max(8192));
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(b.header_bytes as u32)
                .max_concurrent_streams(b.in_flight as u32);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(b.lifetime) => {}
            }
        });
    }
}
