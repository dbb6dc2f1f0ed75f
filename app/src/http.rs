//! A small HTTP/1.1 server for `/metrics`, `/health` and `/api/v1/reading`.
//!
//! One request per connection (`Connection: close`), GET and HEAD only, the request head is
//! limited to [`MAX_HEAD`] bytes and must arrive within [`READ_TIMEOUT`]; at most
//! [`MAX_CONNECTIONS`] are served at once. It runs beside the counter and never holds the
//! meter's lock for longer than it takes to copy the figures.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::clock;
use crate::metrics;
use crate::shared::{Beat, Shared};

/// Largest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// A response: status, content type, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Content-Type.
    pub content_type: &'static str,
    /// Body (left out for HEAD).
    pub body: String,
    /// An `Allow` header, for 405.
    pub allow: Option<&'static str>,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            allow: None,
        }
    }

    /// The bytes on the wire; `head_only` leaves the body out.
    pub fn encode(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            out.push_str("Allow: ");
            out.push_str(allow);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The method.
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
}

/// Parses a request head (request line plus headers, ending in an empty line).
pub fn parse_head(head: &[u8]) -> Option<Request<'_>> {
    let text = std::str::from_utf8(head).ok()?;
    let line = text.split("\r\n").next()?.trim_end_matches('\n');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || !matches!(version, "HTTP/1.0" | "HTTP/1.1")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
    {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some(Request { method, path })
}

/// Routes a request. `input` names the pulse source for the build info.
pub fn route(req: &Request<'_>, shared: &Shared, input: &str) -> Response {
    const PATHS: [&str; 3] = ["/metrics", "/health", "/api/v1/reading"];
    if !PATHS.contains(&req.path) {
        return Response::text(404, "not found\n");
    }
    if !matches!(req.method, "GET" | "HEAD") {
        let mut r = Response::text(405, "method not allowed\n");
        r.allow = Some("GET, HEAD");
        return r;
    }
    let reading = || shared.reading(clock::monotonic_ns());
    match req.path {
        "/metrics" => Response {
            status: 200,
            content_type: metrics::PROMETHEUS_CONTENT_TYPE,
            body: metrics::prometheus(&reading(), input),
            allow: None,
        },
        "/api/v1/reading" => Response {
            status: 200,
            content_type: "application/json",
            body: metrics::json(&reading()),
            allow: None,
        },
        _ => match shared.health() {
            Ok(()) => Response::text(200, "ok\n"),
            Err(why) => Response::text(503, format!("unhealthy: {}\n", why.join("; "))),
        },
    }
}

/// Accepts on `listener` until `stop` turns true; beats `beat` at least every `tick`.
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
                        if !handle(stream, &shared, input).await {
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

/// Serves one connection. False when the client was dropped (timeout, oversized head).
async fn handle(mut stream: TcpStream, shared: &Shared, input: &str) -> bool {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream, &mut buf)).await;
    let (response, head_only, ok) = match head {
        Err(_) => (Response::text(408, "request timeout\n"), false, false),
        Ok(Err(HeadError::Io)) => return false,
        Ok(Err(HeadError::TooLarge)) => (Response::text(400, "request too large\n"), false, false),
        Ok(Ok(end)) => match parse_head(&buf[..end]) {
            None => (Response::text(400, "bad request\n"), false, true),
            Some(req) => (route(&req, shared, input), req.method == "HEAD", true),
        },
    };
    shared.net.http_requests.fetch_add(1, Ordering::Relaxed);
    let bytes = response.encode(head_only);
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
    ok && matches!(written, Ok(Ok(())))
}

enum HeadError {
    Io,
    TooLarge,
}

/// Reads until the empty line that ends the head; returns the head's length.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, HeadError> {
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find_end(buf) {
            return Ok(end);
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        match stream.read(&mut chunk).await {
            Ok(0) => {
                // EOF before the blank line: accept a bare request line (HTTP/0.9-style
                // clients such as `printf 'GET /metrics HTTP/1.0\n' | nc`).
                return if buf.is_empty() {
                    Err(HeadError::Io)
                } else {
                    Ok(buf.len())
                };
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return Err(HeadError::Io),
        }
    }
}

fn find_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::{EnergyRegister, Meter, MeterSettings};

    fn shared() -> Shared {
        let settings = MeterSettings {
            pulses_per_kwh: 800,
            debounce_ns: 0,
            zero_after_ns: 300_000_000_000,
        };
        Shared::new(Meter::new(settings, 800, EnergyRegister::default()))
    }

    #[test]
    fn parses_request_lines() {
        let r = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!((r.method, r.path), ("GET", "/metrics"));
        assert!(parse_head(b"GET /metrics\r\n\r\n").is_none());
        assert!(parse_head(b"GET metrics HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_head(b"get /metrics HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_head(b"GET /metrics HTTP/2.0\r\n\r\n").is_none());
        assert!(parse_head(b"GET  /metrics HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_head(b"\xff\xfe").is_none());
    }

    #[test]
    fn routes() {
        let s = shared();
        let get = |path| {
            route(
                &Request {
                    method: "GET",
                    path,
                },
                &s,
                "sim",
            )
        };
        assert_eq!(get("/nope").status, 404);
        assert_eq!(get("/").status, 404);
        let m = get("/metrics");
        assert_eq!(m.status, 200);
        assert!(m.body.contains("powermeter_pulses_total 800\n"));
        assert!(m.body.contains("powermeter_energy_kwh_total 1\n"));
        assert!(get("/api/v1/reading").body.contains("\"pulses_total\":800"));
        let post = route(
            &Request {
                method: "POST",
                path: "/metrics",
            },
            &s,
            "sim",
        );
        assert_eq!((post.status, post.allow), (405, Some("GET, HEAD")));
    }

    #[test]
    fn health_reflects_input_and_saves() {
        let s = shared();
        let health = |s: &Shared| {
            route(
                &Request {
                    method: "GET",
                    path: "/health",
                },
                s,
                "sim",
            )
        };
        let r = health(&s);
        assert_eq!(r.status, 503);
        assert!(r.body.contains("input not armed") && r.body.contains("no state save yet"));
        s.input_armed.store(true, Ordering::Relaxed);
        s.record_save(Ok(()));
        assert_eq!(health(&s).status, 200);
        s.record_save(Err("disk full".into()));
        let r = health(&s);
        assert_eq!(r.status, 503);
        assert!(r.body.contains("disk full"), "{}", r.body);
    }

    #[test]
    fn head_has_no_body_but_the_length() {
        let r = Response::text(200, "ok\n");
        let bytes = String::from_utf8(r.encode(true)).unwrap();
        assert!(bytes.contains("Content-Length: 3\r\n") && bytes.ends_with("\r\n\r\n"));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_are_rejected_without_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Some(r) = parse_head(&bytes) {
                proptest::prop_assert!(r.path.starts_with('/'));
            }
            let _ = find_end(&bytes);
        }
    }

    #[test]
    fn head_end_detection() {
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(find_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
