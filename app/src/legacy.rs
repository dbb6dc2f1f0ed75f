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

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::shared::{Beat, Shared};

/// Connections served at once.
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
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
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
                    let count = shared.pulses_total();
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        if !reply(stream, count).await {
                            shared.net.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        shared.net.legacy_served.fetch_add(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "port 9001: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => return,
        }
    }
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
