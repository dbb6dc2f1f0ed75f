//! A simulated meter under a steady load: deterministic edge timestamps, no hardware.

use std::time::Duration;

use tokio::time::Instant;

use super::{EdgeEvent, InputError, PulseSource};
use crate::clock;

/// At most this many edges are handed out per call (a very fast simulation catches up in
/// batches instead of starving the runtime).
const MAX_BATCH: u64 = 4096;

/// Edges at exact multiples of the pulse interval `3.6e15 / (pulses_per_kwh * watts)` ns (3.6e6 J per kWh)
/// after the moment the source was created.
#[derive(Debug)]
pub struct SimSource {
    watts: f64,
    interval_ns: f64,
    start_ns: u64,
    start: Instant,
    next_k: u64,
}

impl SimSource {
    /// A simulated load of `watts` on a meter of `pulses_per_kwh`.
    pub fn new(watts: f64, pulses_per_kwh: u32) -> Self {
        Self {
            watts,
            interval_ns: 3.6e15 / (f64::from(pulses_per_kwh) * watts),
            start_ns: clock::monotonic_ns(),
            start: Instant::now(),
            next_k: 1,
        }
    }

    fn offset_ns(&self, k: u64) -> u64 {
        (k as f64 * self.interval_ns) as u64
    }
}

impl PulseSource for SimSource {
    async fn next_edges(&mut self, out: &mut Vec<EdgeEvent>) -> Result<(), InputError> {
        let due = self.start + Duration::from_nanos(self.offset_ns(self.next_k));
        tokio::time::sleep_until(due).await;
        let elapsed = self.start.elapsed().as_nanos() as u64;
        let first = self.next_k;
        while self.next_k - first < MAX_BATCH && self.offset_ns(self.next_k) <= elapsed {
            out.push(EdgeEvent {
                timestamp_ns: self.start_ns + self.offset_ns(self.next_k),
                lost_before: 0,
            });
            self.next_k += 1;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "simulated meter, steady {} W (one pulse every {:.3} s)",
            self.watts,
            self.interval_ns / 1e9
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn steady_load_gives_exact_intervals() {
        // 1500 W at 800 pulses/kWh: one pulse every 3 s.
        let mut s = SimSource::new(1500.0, 800);
        let mut out = Vec::new();
        for _ in 0..3 {
            s.next_edges(&mut out).await.unwrap();
        }
        assert_eq!(out.len(), 3);
        assert_eq!(out[1].timestamp_ns - out[0].timestamp_ns, 3_000_000_000);
        assert_eq!(out[2].timestamp_ns - out[1].timestamp_ns, 3_000_000_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_caller_gets_the_missed_edges_in_one_batch() {
        let mut s = SimSource::new(1500.0, 800);
        tokio::time::advance(Duration::from_secs(30)).await;
        let mut out = Vec::new();
        s.next_edges(&mut out).await.unwrap();
        assert_eq!(out.len(), 10);
    }
}
