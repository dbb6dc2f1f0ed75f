//! Port 9001, the old protocol, byte for byte: on accept, the lifetime pulse count as ASCII
//! decimal digits, no newline, then close. What the client sends is ignored.
//!
//! Hardening the old tool lacked: at most [`MAX_CONNECTIONS`] connections are served at
//! once (more wait in the listen backlog), a client that does not take the answer within
//! [`WRITE_TIMEOUT`] is dropped, and input is drained for at most [`DRAIN_TIMEOUT`] /
//! [`DRAIN_LIMIT`] bytes so that closing does not reset the connection under a client that
//! sent something.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::shared::{Beat, Shared};

/// Slow connections served at once.
pub const MAX_CONNECTIONS: usize = 512;
/// Time a client has to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time spent discarding what a client sent, after the answer.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Bytes discarded at most, after the answer.
pub const DRAIN_LIMIT: usize = 64 * 1024;

/// The answer for a count: its decimal digits.
pub fn answer(count: u64) -> Vec<u8> {
    count.to_string().into_bytes()
}

/// Accepts on `listener` until `stop` turns true; beats `beat` at least every `tick`.
///
/// The fast path answers on the accepting task without registering the connection with
/// the runtime: a fresh socket's send buffer always takes a few digits, so the answer is
/// written with one non-blocking `write`, followed by `shutdown`, a non-blocking drain of
/// whatever the client already sent, and `close`. A connection that cannot be answered at
/// once (a full send buffer, a client still sending) goes to a task with timeouts.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    beat: Arc<Beat>,
    tick: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let slow_limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let registered = listener.into_std().map(|l| {
        // SAFETY: the std listener owns its fd and keeps it for the AsyncFd's lifetime.
        unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))
    });
    let listener = match registered.and_then(|r| r) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "port 9001: cannot poll the listener");
            return;
        }
    };
    loop {
        beat.beat();
        let mut ready = tokio::select! {
            r = listener.readable() => match r {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "port 9001: listener failed");
                    return;
                }
            },
            _ = tokio::time::sleep(tick) => continue,
            _ = stop.changed() => return,
        };
        // Drain the accept queue in bounded batches, then yield.
        for _ in 0..256 {
            match accept_nonblocking(listener.get_ref()) {
                Ok(stream) => {
                    let count = shared.pulses_total();
                    shared.net.legacy_served.fetch_add(1, Ordering::Relaxed);
                    if let Some(stream) = reply_now(stream, count) {
                        slow_path(stream, count, &shared, &slow_limit);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "port 9001: accept failed");
                    ready.clear_ready();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

/// `accept4` with `SOCK_NONBLOCK | SOCK_CLOEXEC`.
fn accept_nonblocking(listener: &std::net::TcpListener) -> io::Result<std::net::TcpStream> {
    // SAFETY: accept4 on a valid listening fd with null address pointers.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new fd that we own.
    Ok(unsafe { std::net::TcpStream::from_raw_fd(fd) })
}

/// Answers without waiting. Returns the stream when it needs the slow path.
fn reply_now(mut stream: std::net::TcpStream, count: u64) -> Option<std::net::TcpStream> {
    let bytes = answer(count);
    match stream.write(&bytes) {
        Ok(n) if n == bytes.len() => {}
        Ok(_) | Err(_) => return Some(stream),
    }
    if stream.shutdown(std::net::Shutdown::Write).is_err() {
        return None;
    }
    // Discard what the client already sent (bounded: a flooding client gets a reset).
    let mut sink = [0u8; 1024];
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => drained += n,
            _ => break,
        }
    }
    None
}

/// Hands a connection that could not be answered at once to a task with timeouts.
fn slow_path(
    stream: std::net::TcpStream,
    count: u64,
    shared: &Arc<Shared>,
    limit: &Arc<Semaphore>,
) {
    let Ok(permit) = limit.clone().try_acquire_owned() else {
        shared.net.dropped.fetch_add(1, Ordering::Relaxed);
        return; // too many slow clients: close this one
    };
    let Ok(stream) = TcpStream::from_std(stream) else {
        shared.net.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let _permit = permit;
        if !reply(stream, count).await {
            shared.net.dropped.fetch_add(1, Ordering::Relaxed);
        }
    });
}

/// Writes the answer, closes our side, drains the client's. False if the client was dropped.
async fn reply(mut stream: TcpStream, count: u64) -> bool {
    let bytes = answer(count);
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&bytes)).await {
        Ok(Ok(())) => {}
        _ => return false,
    }
    if stream.shutdown().await.is_err() {
        return true; // the client is gone; nothing left to do
    }
    let mut sink = [0u8; 1024];
    let mut drained = 0;
    let drain = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => {
                    drained += n;
                    if drained > DRAIN_LIMIT {
                        return false;
                    }
                }
            }
        }
    };
    tokio::time::timeout(DRAIN_TIMEOUT, drain)
        .await
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::answer;

    #[test]
    fn answer_is_bare_digits() {
        assert_eq!(answer(0), b"0");
        assert_eq!(answer(1234567), b"1234567");
        assert_eq!(answer(u64::MAX), b"18446744073709551615");
    }
}
