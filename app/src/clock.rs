//! Clocks: the monotonic clock that GPIO edge timestamps use, and wall-clock conversion.

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds of `CLOCK_MONOTONIC`, the clock the GPIO character device stamps edges with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Seconds since the Unix epoch (wall clock), as a float.
pub fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Converts a monotonic timestamp into Unix seconds, using the current offset between the
/// two clocks. Good to the millisecond, which is all a "last pulse" gauge needs.
pub fn monotonic_to_unix_s(ts_ns: u64) -> f64 {
    let now_mono = monotonic_ns();
    let now_unix = unix_now_s();
    now_unix - (now_mono.saturating_sub(ts_ns) as f64) / 1e9
}
