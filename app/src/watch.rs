//! `powermeterd --watch-input SECONDS`: the wiring check for installers. Opens the configured
//! input exactly as the daemon does, prints every edge (time, interval, counted or rejected
//! and why) and a summary, and never touches the state directory.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::{Config, Edge};
use crate::input::{EdgeEvent, PulseSource, Source};
use crate::meter::{EdgeOutcome, EnergyRegister, Meter};

/// What a watch saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Edges the input delivered.
    pub edges: u64,
    /// Of those, counted as pulses.
    pub counted: u64,
    /// Of those, rejected by the debounce.
    pub rejected: u64,
    /// Edges the kernel reported lost (not delivered).
    pub lost: u64,
}

/// Watches the input of `config` for `duration`, writing one line per edge and a summary to
/// `out`. Fails when the input cannot be opened (with a hint when the daemon holds it).
pub fn run(config: &Config, duration: Duration, out: &mut impl Write) -> Result<Summary> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // the GPIO source registers with the runtime's reactor when it is opened
    let _in_runtime = runtime.enter();
    let mut source = Source::open(config).map_err(|e| {
        let busy = e.detail.to_lowercase().contains("busy");
        anyhow::anyhow!(
            "{e}{}",
            if busy {
                " (powermeter.service holds the line while it runs: `systemctl stop powermeter` first)"
            } else {
                ""
            }
        )
    })?;
    let settings = config.meter_settings();
    let mut meter = Meter::new(settings, 0, EnergyRegister::default());
    writeln!(
        out,
        "watching {} for {:.0} s: {} edges, debounce {} ms, {} pulses/kWh (the state is not touched)",
        source.describe(),
        duration.as_secs_f64(),
        match config.input.edge {
            Edge::Rising => "rising",
            Edge::Falling => "falling",
        },
        config.input.debounce_ms,
        settings.pulses_per_kwh
    )?;
    let mut summary = Summary::default();
    let mut first_ns: Option<u64> = None;
    let mut prev_ns: Option<u64> = None;
    let mut last_counted_ns: Option<u64> = None;
    let mut counted_span = (None::<u64>, 0u64); // (first counted ns, last counted ns)
    let start = tokio::time::Instant::now();
    let deadline = start + duration;
    let mut edges: Vec<EdgeEvent> = Vec::with_capacity(64);
    runtime.block_on(async {
        loop {
            tokio::select! {
                r = source.next_edges(&mut edges) => r.map_err(|e| anyhow::anyhow!("{e}"))?,
                _ = tokio::time::sleep_until(deadline) => return Ok::<(), anyhow::Error>(()),
            }
            for e in edges.drain(..) {
                if e.lost_before > 0 {
                    summary.lost += e.lost_before;
                    meter.on_lost_edges(e.lost_before);
                    writeln!(out, "  kernel lost {} edge(s) here (event buffer overflow)", e.lost_before)?;
                }
                summary.edges += 1;
                let t0 = *first_ns.get_or_insert(e.timestamp_ns);
                let at = (e.timestamp_ns.saturating_sub(t0)) as f64 / 1e9;
                let interval = prev_ns
                    .map(|p| format!("interval {:>9.1} ms", e.timestamp_ns.saturating_sub(p) as f64 / 1e6))
                    .unwrap_or_else(|| format!("{:<21}", "first edge"));
                prev_ns = Some(e.timestamp_ns);
                let verdict = match meter.on_edge(e.timestamp_ns) {
                    EdgeOutcome::Counted => {
                        summary.counted += 1;
                        let power = last_counted_ns.map(|l| {
                            let s = e.timestamp_ns.saturating_sub(l) as f64 / 1e9;
                            3.6e6 / f64::from(settings.pulses_per_kwh) / s
                        });
                        last_counted_ns = Some(e.timestamp_ns);
                        counted_span = (counted_span.0.or(Some(e.timestamp_ns)), e.timestamp_ns);
                        match power {
                            Some(w) => format!("counted   {w:.0} W"),
                            None => "counted".to_owned(),
                        }
                    }
                    EdgeOutcome::Debounced => {
                        summary.rejected += 1;
                        let since = last_counted_ns
                            .map(|l| e.timestamp_ns.saturating_sub(l) as f64 / 1e6)
                            .unwrap_or(0.0);
                        format!(
                            "rejected: debounce ({since:.1} ms after the last counted edge, < {} ms)",
                            config.input.debounce_ms
                        )
                    }
                };
                writeln!(out, "  {at:>9.3} s  {interval}  {verdict}")?;
            }
        }
    })?;
    let mut line = format!(
        "summary: {} edges in {:.1} s: {} counted, {} rejected (debounce), {} lost",
        summary.edges,
        duration.as_secs_f64(),
        summary.counted,
        summary.rejected,
        summary.lost
    );
    if let (Some(first), last) = counted_span
        && summary.counted > 1
    {
        let mean = (last - first) as f64 / 1e9 / (summary.counted - 1) as f64;
        let w = 3.6e6 / f64::from(settings.pulses_per_kwh) / mean;
        line.push_str(&format!("; mean interval {mean:.3} s ({w:.0} W)"));
    }
    writeln!(out, "{line}")?;
    if summary.edges == 0 {
        writeln!(
            out,
            "no edges: check the wiring, input.pin, input.edge and input.bias (an S0 output needs a pull-up or pull-down)"
        )?;
    }
    Ok(summary)
}
