//! The HTTP server of `/metrics`, `/health` and `/api/v1/reading`, on hyper's HTTP/1 server.
//!
//! hyper parses the requests and writes the responses; this module sets the limits around it
//! and routes:
//!
//! - one request per connection: hyper answers with `Connection: close` and closes, so a
//!   pipelined second request is never read as a request;
//! - the request head (request line and headers) is at most [`MAX_HEAD`] bytes (else hyper
//!   answers `431` and closes) and must arrive within [`HEAD_TIMEOUT`] (else the connection is
//!   closed without an answer);
//! - request bodies are never read: no route takes one, and the connection ends with the
//!   answer; the whole connection, from accept to the last byte of the answer, is cut off
//!   after [`CONNECTION_TIMEOUT`], which bounds slow readers and slow bodies alike;
//! - at most [`MAX_CONNECTIONS`] connections are served at once; further clients wait in the
//!   kernel's accept queue.
//!
//! It runs beside the counter and never holds the meter's lock for longer than it takes to
//! copy the figures ([`Shared::reading`]); the text is rendered after the lock is released.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::clock;
use crate::metrics;
use crate::shared::{Beat, Shared};

/// Largest request head (request line plus headers) accepted; hyper answers 431 beyond it.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head, from the first read on.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may last in all, head and answer included (a slow reader or a slow
/// body is cut off by it).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once. Each holds hyper's read and write buffers (8 KiB each, ~17 KiB
/// of RSS per connection measured), and the daemon's RSS budget is 4 MiB; a few scrapers
/// need one connection each, for milliseconds.
pub const MAX_CONNECTIONS: usize = 8;
/// hyper's read buffer, at most: the head limit (also hyper's smallest buffer).
const READ_BUFFER: usize = MAX_HEAD;
/// The methods every route allows.
const ALLOWED: &str = "GET, HEAD";
/// The routes.
const PATHS: [&str; 3] = ["/metrics", "/health", "/api/v1/reading"];

/// An answer: status, content type, body, and the `Allow` header of a 405.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// Content-Type.
    pub content_type: &'static str,
    /// The body (hyper leaves it out for HEAD, keeping its length).
    pub body: String,
    /// An `Allow` header, for 405.
    pub allow: Option<&'static str>,
}

impl Reply {
    fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            allow: None,
        }
    }

    /// The hyper response, with `Cache-Control: no-store`.
    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(allow) = self.allow {
            headers.insert(ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// Routes a request by method and path (the request target as sent: origin form `/x?q`, or
/// absolute form `http://host/x`). `input` names the pulse source for the build info.
pub fn route(method: &Method, path: &str, shared: &Shared, input: &str) -> Reply {
    if !path.starts_with('/') {
        // authority form (`host:port`) or asterisk form (`*`): not for these resources
        return Reply::text(StatusCode::BAD_REQUEST, "bad request\n");
    }
    if !PATHS.contains(&path) {
        return Reply::text(StatusCode::NOT_FOUND, "not found\n");
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = Reply::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.allow = Some(ALLOWED);
        return r;
    }
    // The lock is held only inside `reading()`, to copy the figures.
    let reading = || shared.reading(clock::monotonic_ns());
    match path {
        "/metrics" => Reply {
            status: StatusCode::OK,
            content_type: metrics::PROMETHEUS_CONTENT_TYPE,
            body: metrics::prometheus(&reading(), input),
            allow: None,
        },
        "/api/v1/reading" => Reply {
            status: StatusCode::OK,
            content_type: metrics::JSON_CONTENT_TYPE,
            body: metrics::json(&reading()),
            allow: None,
        },
        _ => match shared.health() {
            Ok(()) => Reply::text(StatusCode::OK, "ok\n"),
            Err(why) => Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unhealthy: {}\n", why.join("; ")),
            ),
        },
    }
}

/// Why a connection ended without a complete exchange.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The request head did not arrive within [`HEAD_TIMEOUT`].
    #[error("no complete request head within {HEAD_TIMEOUT:?}")]
    HeadTimeout,
    /// The connection outlived [`CONNECTION_TIMEOUT`] (a slow reader or a slow body).
    #[error("connection still open after {CONNECTION_TIMEOUT:?}")]
    Deadline,
    /// The request head was larger than [`MAX_HEAD`] (answered 431).
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The request was malformed (answered 400) or the client went away early.
    #[error("{0}")]
    Http(#[source] hyper::Error),
}

/// Serves one connection on any byte stream: a TCP stream, or an in-memory pipe in the tests
/// and the fuzzer. Returns when the answer is written or the connection was cut off.
pub async fn serve_connection<S>(
    stream: S,
    shared: Arc<Shared>,
    input: &'static str,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let reply = route(req.method(), request_path(&req), &shared, input);
        shared.net.http_requests.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok::<_, Infallible>(reply.into_response()))
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .keep_alive(false)
        // a client may shut its sending side once its request is out (`printf ... | nc`)
        .half_close(true)
        .max_buf_size(READ_BUFFER)
        .max_header_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
        Err(_) => Err(ConnectionError::Deadline),
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.is_timeout() => Err(ConnectionError::HeadTimeout),
        Ok(Err(e)) if e.is_parse_too_large() => Err(ConnectionError::HeadTooLarge),
        Ok(Err(e)) => Err(ConnectionError::Http(e)),
    }
}

/// The path of the request target; the target as sent when it has no path (`*`, `host:port`),
/// which [`route`] refuses.
fn request_path(req: &Request<Incoming>) -> &str {
    let uri = req.uri();
    if uri.scheme().is_none() && uri.authority().is_some() {
        return ""; // authority form
    }
    uri.path()
}

/// Accepts on `listener` until `stop` turns true; beats `beat` at least every `tick`, also
/// while every connection slot is taken (the loop is idle then, not stalled).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    input: &'static str,
    beat: Arc<Beat>,
    tick: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        beat.beat();
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = tokio::time::sleep(tick) => continue,
            _ = stop.changed() => return,
        };
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _peer)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Err(e) = serve_connection(stream, shared.clone(), input).await {
                            tracing::debug!(error = %e, "http: connection cut off");
                            shared.net.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::{EnergyRegister, Meter, MeterSettings};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn shared() -> Shared {
        let settings = MeterSettings {
            pulses_per_kwh: 800,
            debounce_ns: 0,
            zero_after_ns: 300_000_000_000,
        };
        Shared::new(Meter::new(settings, 800, EnergyRegister::default()))
    }

    /// Sends `raw` on an in-memory connection, closes the sending side, returns the answer.
    async fn exchange(raw: &[u8]) -> (String, Result<(), ConnectionError>) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(serve_connection(server, Arc::new(shared()), "sim"));
        client.write_all(raw).await.unwrap();
        client.shutdown().await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        (
            String::from_utf8_lossy(&out).into_owned(),
            served.await.unwrap(),
        )
    }

    #[test]
    fn routes() {
        let s = shared();
        let get = |path| route(&Method::GET, path, &s, "sim");
        assert_eq!(get("/nope").status, 404);
        assert_eq!(get("/").status, 404);
        assert_eq!(get("*").status, 400);
        let m = get("/metrics");
        assert_eq!(m.status, 200);
        assert!(m.body.contains("powermeter_pulses_total 800\n"));
        assert!(m.body.contains("powermeter_energy_kwh_total 1\n"));
        assert!(get("/api/v1/reading").body.contains("\"pulses_total\":800"));
        let post = route(&Method::POST, "/metrics", &s, "sim");
        assert_eq!(
            (post.status, post.allow),
            (StatusCode::METHOD_NOT_ALLOWED, Some(ALLOWED))
        );
        let head = route(&Method::HEAD, "/metrics", &s, "sim");
        assert_eq!(head.status, 200);
    }

    #[test]
    fn health_reflects_input_and_saves() {
        let s = shared();
        let health = |s: &Shared| route(&Method::GET, "/health", s, "sim");
        let r = health(&s);
        assert_eq!(r.status, 503);
        assert!(r.body.contains("input not armed") && r.body.contains("no state save yet"));
        s.input_armed.store(true, Ordering::Relaxed);
        s.record_save(Ok(0));
        assert_eq!(health(&s).status, 200);
        s.record_save(Err("disk full".into()));
        let r = health(&s);
        assert_eq!(r.status, 503);
        assert!(r.body.contains("disk full"), "{}", r.body);
    }

    #[tokio::test]
    async fn one_request_per_connection_with_the_headers() {
        let (out, r) = exchange(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(r.is_ok(), "{r:?}");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        let head = out.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        assert!(head.contains("\r\ncache-control: no-store"), "{head}");
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert!(
            head.contains("\r\ncontent-type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(out.contains("powermeter_pulses_total 800\n"));
        // a pipelined second request is not answered: the connection closes after the first
        let two = b"GET /health HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n";
        let (out, _) = exchange(two).await;
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
        assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
    }

    #[tokio::test]
    async fn head_has_the_length_but_no_body() {
        let (get, _) = exchange(b"GET /health HTTP/1.1\r\n\r\n").await;
        let (head, _) = exchange(b"HEAD /health HTTP/1.1\r\n\r\n").await;
        let length = |s: &str| {
            s.to_ascii_lowercase()
                .lines()
                .find_map(|l| l.strip_prefix("content-length: ").map(str::to_owned))
        };
        assert!(length(&get).is_some());
        assert_eq!(length(&get), length(&head));
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }

    #[tokio::test]
    async fn refusals() {
        let status = |out: &str| out.split(' ').nth(1).unwrap_or("").to_owned();
        let (out, _) = exchange(b"BLAH\r\n\r\n").await;
        assert_eq!(status(&out), "400", "{out}");
        let (out, _) = exchange(b"GET metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&out), "400", "{out}");
        let (out, _) = exchange(b"DELETE /health HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&out), "405", "{out}");
        assert!(
            out.to_ascii_lowercase()
                .contains("\r\nallow: get, head\r\n"),
            "{out}"
        );
        let (out, _) = exchange(b"GET http://x/api/v1/reading HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&out), "200", "{out}");
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let (out, r) = exchange(huge.as_bytes()).await;
        assert_eq!(status(&out), "431", "{out}");
        assert!(matches!(r, Err(ConnectionError::HeadTooLarge)), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_cut_off_by_the_head_timeout() {
        let (mut client, server) = tokio::io::duplex(1024);
        let served = tokio::spawn(serve_connection(server, Arc::new(shared()), "sim"));
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .unwrap();
        let r = served.await.unwrap();
        assert!(matches!(r, Err(ConnectionError::HeadTimeout)), "{r:?}");
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        assert!(out.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_is_cut_off_by_the_deadline() {
        // a tiny pipe that the client never drains: the answer cannot be written
        let (mut client, server) = tokio::io::duplex(16);
        let served = tokio::spawn(serve_connection(server, Arc::new(shared()), "sim"));
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let r = served.await.unwrap();
        assert!(matches!(r, Err(ConnectionError::Deadline)), "{r:?}");
    }
}
