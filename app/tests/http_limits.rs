//! Hostile HTTP clients against the real binary: each is cut off by the limit meant for it,
//! and port 9001 keeps answering meanwhile.
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use powermeterd::http::{CONNECTION_TIMEOUT, HEAD_TIMEOUT, MAX_CONNECTIONS, MAX_HEAD};

/// One pulse every 200 ms.
const LOAD_W: f64 = 22_500.0;

fn connect(port: u16) -> TcpStream {
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c
}

/// Everything the server sends until it closes.
fn read_all(c: &mut TcpStream) -> String {
    let mut out = Vec::new();
    match c.read_to_end(&mut out) {
        Ok(_) => {}
        // the server closed with our bytes unread: a reset, after what it sent
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("reading the answer: {e}"),
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Port 9001 answers with the count (the harness's query has a 5 s read timeout).
fn legacy_answers(d: &Daemon) {
    let raw = d.legacy_raw();
    assert!(
        !raw.is_empty() && raw.iter().all(u8::is_ascii_digit),
        "port 9001 answered {raw:?}"
    );
}

fn dropped(d: &Daemon) -> u64 {
    let (_, m) = d.get("/metrics");
    m.lines()
        .find_map(|l| l.strip_prefix("powermeter_connections_dropped_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no dropped counter in\n{m}"))
}

/// Sockets the daemon holds open (listeners included).
fn sockets(d: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count()
}

#[test]
fn slowloris_is_cut_off_by_the_head_timeout() {
    let s = Setup::new(LOAD_W, 0, 60);
    let d = s.start();
    let before = dropped(&d);
    // taken before connecting: the server's head timeout cannot start earlier
    let started = Instant::now();
    let mut c = connect(d.http);
    c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n\r\n";
    let mut closed = None;
    for &byte in request {
        if c.write_all(&[byte]).is_err() {
            closed = Some(started.elapsed());
            break;
        }
        legacy_answers(&d);
        std::thread::sleep(Duration::from_secs(1));
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(0) => {
                closed = Some(started.elapsed());
                break;
            }
            Ok(n) => panic!("slowloris got an answer: {:?}", &buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = Some(started.elapsed());
                break;
            }
        }
    }
    let closed = closed.expect("the slowloris client was never cut off");
    // The head timeout, not the connection deadline, and not before the head timeout.
    assert!(
        closed >= HEAD_TIMEOUT && closed < CONNECTION_TIMEOUT,
        "closed after {closed:?}"
    );
    assert!(dropped(&d) > before);
    assert!(d.stop().0.success());
}

#[test]
fn oversized_head_is_refused_with_431() {
    let s = Setup::new(LOAD_W, 0, 60);
    let d = s.start();
    let before = dropped(&d);
    let mut c = connect(d.http);
    let head = format!(
        "GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(MAX_HEAD)
    );
    let _ = c.write_all(head.as_bytes()); // the server may close before taking it all
    let out = read_all(&mut c);
    assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    legacy_answers(&d);
    // A head just under the limit is served.
    let fits = format!(
        "GET /health HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(MAX_HEAD - 200)
    );
    assert_eq!(http_request(d.http, &fits).0, 200);
    assert!(dropped(&d) > before);
    assert!(d.stop().0.success());
}

#[test]
fn pipelined_second_request_is_not_answered() {
    let s = Setup::new(LOAD_W, 0, 60);
    let d = s.start();
    let mut c = connect(d.http);
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let out = read_all(&mut c);
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{out}"
    );
    assert!(
        !out.contains("powermeter_"),
        "the second request was served: {out}"
    );
    legacy_answers(&d);
    assert!(d.stop().0.success());
}

#[test]
fn half_closed_client() {
    let s = Setup::new(LOAD_W, 0, 60);
    let d = s.start();
    // A complete request, then the client shuts its sending side: it still gets the answer.
    let mut c = connect(d.http);
    c.write_all(b"GET /api/v1/reading HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let out = read_all(&mut c);
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    assert!(out.contains("{\"pulses_total\":"), "{out}");
    // Half a head, then the sending side shut: closed at once, without an answer, not left
    // waiting for the head timeout.
    let mut c = connect(d.http);
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let started = Instant::now();
    let out = read_all(&mut c);
    assert!(!out.starts_with("HTTP/1.1 2"), "{out}");
    assert!(started.elapsed() < HEAD_TIMEOUT, "{:?}", started.elapsed());
    legacy_answers(&d);
    assert!(d.stop().0.success());
}

/// Raises this process's open-file limit to what 1,000 client sockets need.
fn allow_files(n: libc::rlim_t) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < n {
            assert!(lim.rlim_max >= n, "open-file limit {} < {n}", lim.rlim_max);
            lim.rlim_cur = n;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

#[test]
fn a_thousand_clients_are_served_at_most_max_connections_at_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    allow_files(2048);
    let s = Setup::new(LOAD_W, 0, 60);
    let d = s.start();
    let baseline = sockets(&d);
    // 1,000 clients connect at once and send nothing. The daemon takes MAX_CONNECTIONS of
    // them, the kernel's accept queue holds some more, the rest wait in their connect.
    let (closed, answered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let hold = HEAD_TIMEOUT + Duration::from_secs(2);
    let port = d.http;
    let clients = {
        let (closed, answered) = (closed.clone(), answered.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                for _ in 0..1000 {
                    let (closed, answered) = (closed.clone(), answered.clone());
                    tokio::spawn(async move {
                        let Ok(mut c) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                        else {
                            return;
                        };
                        let mut b = [0u8; 1];
                        match c.read(&mut b).await {
                            Ok(0) | Err(_) => closed.fetch_add(1, Ordering::Relaxed),
                            Ok(_) => answered.fetch_add(1, Ordering::Relaxed),
                        };
                    });
                }
                tokio::time::sleep(hold).await;
            });
            // dropping the runtime closes every client socket
        })
    };
    // Meanwhile the daemon holds at most MAX_CONNECTIONS of them, and port 9001 answers.
    let until = Instant::now() + hold;
    let mut most = 0;
    while Instant::now() < until {
        most = most.max(sockets(&d));
        legacy_answers(&d);
        std::thread::sleep(Duration::from_millis(100));
    }
    clients.join().unwrap();
    assert!(
        most > baseline + MAX_CONNECTIONS / 2 && most <= baseline + MAX_CONNECTIONS,
        "the daemon held {most} sockets ({baseline} at rest)"
    );
    // The first ones taken were cut off by the head timeout, without an answer.
    let (closed, answered) = (
        closed.load(Ordering::Relaxed),
        answered.load(Ordering::Relaxed),
    );
    assert_eq!(answered, 0);
    assert!(
        (1..1000).contains(&closed),
        "{closed} of 1000 silent clients were cut off"
    );
    wait_until("http back", Duration::from_secs(30), || {
        d.get("/health").0 == 200
    });
    assert!(dropped(&d) >= closed as u64);
    assert!(d.stop().0.success());
}
