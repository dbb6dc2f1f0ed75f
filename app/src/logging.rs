//! Logging: structured entries to journald when the daemon runs under systemd (its stderr
//! is the journal stream), readable lines on stderr otherwise. `POWERMETERD_LOG` takes a
//! `tracing` filter (default `info`; per-pulse lines are at `trace`).

use std::io::IsTerminal;
use std::os::fd::AsRawFd;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// Installs the global subscriber. Returns `true` when logging goes to journald.
pub fn init() -> bool {
    let filter =
        || EnvFilter::try_from_env("POWERMETERD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if stderr_is_journal()
        && let Ok(journald) = tracing_journald::layer()
    {
        tracing_subscriber::registry()
            .with(filter())
            .with(journald.with_syslog_identifier("powermeterd".to_owned()))
            .init();
        return true;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter())
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    false
}

/// True when `JOURNAL_STREAM` names the device and inode of our stderr.
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat on stderr into a zeroed stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstat(std::io::stderr().as_raw_fd(), &mut st) };
    rc == 0 && st.st_dev as u64 == dev && st.st_ino as u64 == ino
}
