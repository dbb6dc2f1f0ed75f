//! The systemd interfaces: readiness and status notifications, the watchdog, and sockets
//! passed by socket activation (`LISTEN_FDS` / `LISTEN_FDNAMES`).
//!
//! Outside systemd (no `NOTIFY_SOCKET`, no `LISTEN_PID`) every function here is a no-op.

use std::net::TcpListener;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use sd_notify::NotifyState;

/// File descriptor name of the port-9001 socket (`FileDescriptorName=legacy`).
pub const FD_LEGACY: &str = "legacy";
/// File descriptor name of the HTTP socket (`FileDescriptorName=http`).
pub const FD_HTTP: &str = "http";
/// File descriptor name of the local reading socket (`FileDescriptorName=reading`), an
/// `AF_UNIX` stream socket the MQTT publisher reads the figures from.
pub const FD_READING: &str = "reading";

/// Listening sockets handed over by systemd, sorted by their names.
#[derive(Debug, Default)]
pub struct PassedSockets {
    /// Sockets named `legacy`.
    pub legacy: Vec<TcpListener>,
    /// Sockets named `http`.
    pub http: Vec<TcpListener>,
    /// Sockets named `reading` (`AF_UNIX`).
    pub reading: Vec<UnixListener>,
}

/// An unusable passed socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The environment is malformed.
    #[error("socket activation: {0}")]
    Env(std::io::Error),
    /// A passed fd is not a listening stream socket of the family its name wants.
    #[error("socket activation: fd {fd} ({name}) is not a listening {kind} stream socket")]
    NotListening {
        /// `TCP`, or `AF_UNIX` for the reading socket.
        kind: &'static str,
        /// The fd.
        fd: RawFd,
        /// Its name.
        name: String,
    },
}

/// Takes the sockets systemd passed to this process and clears the activation variables so
/// that children do not inherit them. Sockets with other names are closed with a warning.
///
/// # Safety
/// Modifies the environment: call it before any other thread exists (before the runtime).
pub unsafe fn take_passed_sockets() -> Result<PassedSockets, SocketError> {
    // SAFETY: the caller guarantees no other thread runs.
    let fds =
        unsafe { sd_notify::listen_fds_with_names_and_unset_env() }.map_err(SocketError::Env)?;
    let mut passed = PassedSockets::default();
    for (fd, name) in fds {
        let unix = name == FD_READING;
        if !is_listening_stream(fd, unix) {
            let kind = if unix { "AF_UNIX" } else { "TCP" };
            return Err(SocketError::NotListening { kind, fd, name });
        }
        if unix {
            // SAFETY: systemd passed us this fd and nothing else owns it.
            passed
                .reading
                .push(unsafe { UnixListener::from_raw_fd(fd) });
            continue;
        }
        // SAFETY: systemd passed us this fd and nothing else owns it.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        match name.as_str() {
            FD_LEGACY => passed.legacy.push(listener),
            FD_HTTP => passed.http.push(listener),
            other => {
                eprintln!("powermeterd: ignoring passed socket named {other:?} (fd {fd})");
            }
        }
    }
    Ok(passed)
}

/// A listening stream socket: `AF_UNIX` when `unix`, else TCP (`AF_INET`/`AF_INET6`).
fn is_listening_stream(fd: RawFd, unix: bool) -> bool {
    let get = |opt| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid pointers to an int and its length.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(v)
    };
    let family_ok = match get(libc::SO_DOMAIN) {
        Some(libc::AF_UNIX) => unix,
        Some(libc::AF_INET | libc::AF_INET6) => !unix,
        _ => false,
    };
    family_ok
        && get(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && get(libc::SO_ACCEPTCONN) == Some(1)
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=...`
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `RELOADING=1` with the monotonic time systemd wants alongside it.
pub fn reloading() {
    match monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, NotifyState::MonotonicUsec(now)]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `CLOCK_MONOTONIC` in microseconds, as `MONOTONIC_USEC=` wants it.
///
/// Not `sd_notify::NotifyState::monotonic_usec_now()`: sd-notify 0.5.0 multiplies the seconds
/// by 10^6 in `time_t`, which is 32 bits on the 32-bit Pi targets (armv7, ARMv6), so after
/// 36 minutes of uptime it panics in debug builds and sends a wrapped, wrong time in release
/// builds (found by the ARMv6 test suite under qemu-user).
fn monotonic_usec_now() -> std::io::Result<i128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec into the valid, exclusively borrowed `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(timespec_usec(ts.tv_sec, ts.tv_nsec))
}

/// Microseconds of a `timespec`, widened before multiplying (no overflow for any `time_t`).
fn timespec_usec(sec: libc::time_t, nsec: libc::c_long) -> i128 {
    i128::from(sec) * 1_000_000 + i128::from(nsec) / 1_000
}

/// `READY=1` after a reload.
pub fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// `STOPPING=1`
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// `WATCHDOG=1`
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3,000 s of uptime is 3·10^9 µs, past `i32::MAX`: a multiplication in a 32-bit `time_t`
    /// (armv7, ARMv6) overflows there. ci/test runs this on ARMv6 under qemu-user.
    #[test]
    fn monotonic_usec_does_not_overflow_a_32_bit_time_t() {
        assert_eq!(timespec_usec(3_000, 999_999_999), 3_000_999_999);
        assert_eq!(
            timespec_usec(libc::time_t::MAX, 0),
            i128::from(libc::time_t::MAX) * 1_000_000
        );
    }

    #[test]
    fn monotonic_usec_now_reads_the_monotonic_clock() {
        let a = monotonic_usec_now().expect("CLOCK_MONOTONIC");
        std::thread::sleep(Duration::from_millis(20));
        let b = monotonic_usec_now().expect("CLOCK_MONOTONIC");
        assert!(a > 0 && b - a >= 20_000, "{a} then {b}");
    }
}
