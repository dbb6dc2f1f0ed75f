//! What the tasks of the daemon share: the meter, the save status and liveness beats.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;

use crate::clock;
use crate::meter::Meter;

/// A task's liveness: the monotonic time (ns) of its last loop iteration.
///
/// Long-running tasks beat at least every tick, even with nothing to do, so that the
/// watchdog can tell a quiet task from a stalled one.
#[derive(Debug, Default)]
pub struct Beat(AtomicU64);

impl Beat {
    /// Records that the task made progress now.
    pub fn beat(&self) {
        self.0.store(clock::monotonic_ns(), Ordering::Relaxed);
    }

    /// Monotonic ns of the last beat, 0 if never.
    pub fn last(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters of the state saves.
#[derive(Debug, Default)]
pub struct SaveStats {
    /// Successful saves since start.
    pub saves: AtomicU64,
    /// Failed saves since start.
    pub failures: AtomicU64,
    /// Whether the last save attempt succeeded.
    pub last_ok: AtomicBool,
    /// The pulse count in the newest completed save (what a power cut now would restart from).
    pub saved_pulses: AtomicU64,
    /// The error of the last failed save, while the last attempt failed.
    pub last_error: Mutex<Option<String>>,
}

/// Counters of the network front ends.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Port-9001 connections answered.
    pub legacy_served: AtomicU64,
    /// HTTP requests answered (any status).
    pub http_requests: AtomicU64,
    /// Connections closed for a timeout or an oversized request.
    pub dropped: AtomicU64,
}

/// State shared by every task of the daemon.
#[derive(Debug)]
pub struct Shared {
    meter: Mutex<Meter>,
    /// The input is open and its edges are being read.
    pub input_armed: AtomicBool,
    /// Why the input is not armed (while it is not), e.g. "requesting GPIO27 ...: no such
    /// file or directory".
    input_problem: Mutex<Option<String>>,
    /// Save counters and status.
    pub saves: SaveStats,
    /// Network counters.
    pub net: NetStats,
    /// Monotonic ns at start.
    pub started_ns: u64,
}

impl Shared {
    /// Shared state around a meter.
    pub fn new(meter: Meter) -> Self {
        Self {
            meter: Mutex::new(meter),
            input_armed: AtomicBool::new(false),
            input_problem: Mutex::new(Some("not opened yet".to_owned())),
            saves: SaveStats::default(),
            net: NetStats::default(),
            started_ns: clock::monotonic_ns(),
        }
    }

    /// Locks the meter. A panic while holding the lock cannot leave the meter inconsistent
    /// (every mutation is a single field update), so poisoning is ignored.
    pub fn meter(&self) -> MutexGuard<'_, Meter> {
        self.meter.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lifetime pulse count.
    pub fn pulses_total(&self) -> u64 {
        self.meter().pulses_total()
    }

    /// Records whether the input is armed (`Ok`) or why not.
    pub fn set_input(&self, state: Result<(), String>) {
        let mut problem = self
            .input_problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.input_armed.store(state.is_ok(), Ordering::Relaxed);
        *problem = state.err();
    }

    /// Why the input is not armed, while it is not.
    pub fn input_problem(&self) -> Option<String> {
        self.input_problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records the outcome of a save: the pulse count it wrote, or why it failed.
    pub fn record_save(&self, result: Result<u64, String>) {
        match result {
            Ok(pulses) => {
                self.saves.saves.fetch_add(1, Ordering::Relaxed);
                self.saves.saved_pulses.store(pulses, Ordering::Relaxed);
                self.saves.last_ok.store(true, Ordering::Relaxed);
                *self
                    .saves
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
            }
            Err(e) => {
                self.saves.failures.fetch_add(1, Ordering::Relaxed);
                self.saves.last_ok.store(false, Ordering::Relaxed);
                *self
                    .saves
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(e);
            }
        }
    }

    /// `Ok` when healthy (input armed, last save succeeded), else the reasons.
    pub fn health(&self) -> Result<(), Vec<String>> {
        let mut why = Vec::new();
        if !self.input_armed.load(Ordering::Relaxed) {
            why.push(match self.input_problem() {
                Some(p) => format!("input not armed: {p}"),
                None => "input not armed".to_owned(),
            });
        }
        if !self.saves.last_ok.load(Ordering::Relaxed) {
            let err = self
                .saves
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            why.push(match err {
                Some(e) => format!("last state save failed: {e}"),
                None => "no state save yet".to_owned(),
            });
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
    }

    /// A consistent reading of every figure, at time `now_ns`.
    pub fn reading(&self, now_ns: u64) -> Reading {
        let m = self.meter();
        Reading {
            pulses_total: m.pulses_total(),
            energy_kwh: m.energy_kwh(),
            power_w: m.power_w(now_ns),
            last_pulse_unix_s: m.last_pulse_ns().map(clock::monotonic_to_unix_s),
            rejected_debounce: m.rejected_debounce(),
            edges_lost: m.edges_lost(),
            pulses_per_kwh: m.settings().pulses_per_kwh,
            state_saves: self.saves.saves.load(Ordering::Relaxed),
            state_save_failures: self.saves.failures.load(Ordering::Relaxed),
            state_saved_pulses: self.saves.saved_pulses.load(Ordering::Relaxed),
            input_armed: self.input_armed.load(Ordering::Relaxed),
            legacy_served: self.net.legacy_served.load(Ordering::Relaxed),
            http_requests: self.net.http_requests.load(Ordering::Relaxed),
            dropped: self.net.dropped.load(Ordering::Relaxed),
            uptime_s: now_ns.saturating_sub(self.started_ns) as f64 / 1e9,
        }
    }
}

/// Every figure the daemon exports, taken at one instant.
///
/// Its `Serialize` is the JSON of `GET /api/v1/reading` (without the connection counters,
/// which only `/metrics` has); the field order is the document's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reading {
    /// Lifetime pulses.
    pub pulses_total: u64,
    /// The energy register, kWh.
    pub energy_kwh: f64,
    /// Estimated power, W.
    pub power_w: f64,
    /// Unix time of the last pulse since start.
    pub last_pulse_unix_s: Option<f64>,
    /// Edges rejected by debounce since start.
    #[serde(rename = "pulses_rejected_debounce")]
    pub rejected_debounce: u64,
    /// Edges the kernel lost since start.
    pub edges_lost: u64,
    /// The configured pulses per kWh.
    pub pulses_per_kwh: u32,
    /// Successful saves since start.
    pub state_saves: u64,
    /// Failed saves since start.
    pub state_save_failures: u64,
    /// The pulse count in the newest completed save.
    pub state_saved_pulses: u64,
    /// Input armed.
    pub input_armed: bool,
    /// Port-9001 connections answered.
    #[serde(skip)]
    pub legacy_served: u64,
    /// HTTP requests answered.
    #[serde(skip)]
    pub http_requests: u64,
    /// Connections dropped for timeouts or oversized requests.
    #[serde(skip)]
    pub dropped: u64,
    /// Seconds since start.
    pub uptime_s: f64,
}
