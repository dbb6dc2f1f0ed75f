//! Pulse sources behind one small trait: the GPIO character device, `rppal`, a simulator.

use std::future::Future;

use crate::config::{Config, SourceKind};

#[cfg(feature = "gpio")]
pub mod gpio;
#[cfg(feature = "rppal")]
pub mod rppal;
pub mod sim;

/// One edge as the source saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeEvent {
    /// When the edge happened: ns of `CLOCK_MONOTONIC` (the kernel's stamp where there is one).
    pub timestamp_ns: u64,
    /// Edges the source lost just before this one (kernel sequence-number gap).
    pub lost_before: u64,
}

/// An error of a pulse source.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct InputError {
    /// What was being done, e.g. "requesting line GPIO27 on /dev/gpiochip0".
    pub what: String,
    /// The cause.
    pub detail: String,
}

/// A source of pulse edges.
pub trait PulseSource: Send {
    /// Waits for edges and appends at least one to `out` (more when several are pending).
    /// Cancel-safe: a cancelled call loses no edge.
    fn next_edges(
        &mut self,
        out: &mut Vec<EdgeEvent>,
    ) -> impl Future<Output = Result<(), InputError>> + Send;

    /// What the source reads, for logs (e.g. "GPIO27 (/dev/gpiochip0 line 27)").
    fn describe(&self) -> String;
}

/// The source the configuration selects, opened and armed.
pub enum Source {
    /// Simulated steady load.
    Sim(sim::SimSource),
    /// GPIO character device.
    #[cfg(feature = "gpio")]
    Gpio(gpio::GpioSource),
    /// rppal.
    #[cfg(feature = "rppal")]
    Rppal(rppal::RppalSource),
}

impl Source {
    /// Opens the source named by `config.input.source`.
    pub fn open(config: &Config) -> Result<Self, InputError> {
        match config.input.source {
            SourceKind::Sim => Ok(Source::Sim(sim::SimSource::new(
                config.sim().watts,
                config.meter.pulses_per_kwh,
            ))),
            #[cfg(feature = "gpio")]
            SourceKind::Gpio => gpio::GpioSource::open(&config.input).map(Source::Gpio),
            #[cfg(feature = "rppal")]
            SourceKind::Rppal => rppal::RppalSource::open(&config.input).map(Source::Rppal),
            #[allow(unreachable_patterns)]
            other => Err(InputError {
                what: format!("opening input source {other:?}"),
                detail: "this build of powermeterd lacks the cargo feature for it".into(),
            }),
        }
    }

    /// The short name of the source kind, for the build-info metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Sim(_) => "sim",
            #[cfg(feature = "gpio")]
            Source::Gpio(_) => "gpio",
            #[cfg(feature = "rppal")]
            Source::Rppal(_) => "rppal",
        }
    }
}

impl PulseSource for Source {
    async fn next_edges(&mut self, out: &mut Vec<EdgeEvent>) -> Result<(), InputError> {
        match self {
            Source::Sim(s) => s.next_edges(out).await,
            #[cfg(feature = "gpio")]
            Source::Gpio(s) => s.next_edges(out).await,
            #[cfg(feature = "rppal")]
            Source::Rppal(s) => s.next_edges(out).await,
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Sim(s) => s.describe(),
            #[cfg(feature = "gpio")]
            Source::Gpio(s) => s.describe(),
            #[cfg(feature = "rppal")]
            Source::Rppal(s) => s.describe(),
        }
    }
}

/// Tracks a kernel per-line sequence number and returns how many edges went missing.
#[derive(Debug, Default)]
pub struct SeqTracker(Option<u32>);

impl SeqTracker {
    /// Feeds the next sequence number; returns the size of the gap before it.
    pub fn next(&mut self, seqno: u32) -> u64 {
        let lost = match self.0 {
            Some(prev) => u64::from(seqno.wrapping_sub(prev).saturating_sub(1)),
            None => 0,
        };
        self.0 = Some(seqno);
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::SeqTracker;

    #[test]
    fn sequence_gaps_are_lost_edges() {
        let mut t = SeqTracker::default();
        assert_eq!(t.next(5), 0);
        assert_eq!(t.next(6), 0);
        assert_eq!(t.next(9), 2);
        assert_eq!(t.next(u32::MAX), u64::from(u32::MAX - 10));
        assert_eq!(t.next(0), 0, "wraps");
    }
}
