//! The local reading socket (`powermeter-reading.socket`, fd name `reading`): on each
//! connection the daemon writes one JSON reading (the document of `GET /api/v1/reading`) and
//! closes. Input is never read, so a client (the MQTT publisher) cannot change anything.
//!
//! Only a socket passed by systemd is served; a daemon run by hand has none.

use std::os::unix::net::UnixListener as StdUnixListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::shared::{Beat, Shared};
use crate::{clock, metrics};

/// Adopts a passed listening socket for the runtime.
pub fn adopt(l: StdUnixListener) -> Result<UnixListener> {
    l.set_nonblocking(true)
        .context("reading socket: preparing the passed socket")?;
    UnixListener::from_std(l).context("reading socket: adopting the passed socket")
}

/// Serves readings until `stop`, beating at least every `tick`.
pub async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    beat: Arc<Beat>,
    tick: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // The last accept error, so that a persistent one (EMFILE) is logged once, not 10 times a second.
    let mut last_error: Option<String> = None;
    loop {
        beat.beat();
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    last_error = None;
                    s
                }
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    let problem = e.to_string();
                    if last_error.as_deref() != Some(problem.as_str()) {
                        tracing::warn!(error = %problem, "reading socket: accept failed");
                    } else {
                        tracing::debug!(error = %problem, "reading socket: accept failed again");
                    }
                    last_error = Some(problem);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tokio::time::sleep(tick) => continue,
            _ = stop.changed() => return,
        };
        let body = metrics::json(&shared.reading(clock::monotonic_ns()));
        // A fresh AF_UNIX stream takes a document this size (< 1 KiB) at once; a short write
        // just truncates one reading, which the client rejects as invalid JSON.
        if let Err(e) = stream.try_write(body.as_bytes()) {
            tracing::debug!(error = %e, "reading socket: write failed");
        }
        drop(stream);
    }
}
