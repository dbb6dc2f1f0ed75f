//! The running daemon: opens the state and the input, binds or adopts the listeners, runs
//! the tasks (input, listeners, saver, status, watchdog) and handles signals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::clock;
use crate::config::{self, Config};
use crate::input::{EdgeEvent, PulseSource, Source};
use crate::meter::Meter;
use crate::shared::{Beat, Shared};
use crate::state::{Snapshot, Store};
use crate::systemd::{self, PassedSockets};
use crate::{http, legacy, reading};

/// Environment variable for fault injection in tests: `stall-input-after=SECONDS` makes the
/// simulated input task stop making progress after that many seconds (the process stays up),
/// which must stop the watchdog pings. Honoured only with `source = "sim"`.
pub const FAULT_ENV: &str = "POWERMETERD_FAULT";

/// Everything the daemon needs to start.
pub struct Options {
    /// The configuration file (re-read on SIGHUP).
    pub config_path: PathBuf,
    /// The configuration, already validated.
    pub config: Config,
    /// Sockets passed by systemd.
    pub passed: PassedSockets,
    /// The watchdog interval systemd asked for.
    pub watchdog: Option<Duration>,
    /// The injected fault, if any.
    pub fault: Option<Fault>,
}

/// An injected fault (tests only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The input task stalls after this long.
    StallInputAfter(Duration),
}

impl Fault {
    /// Parses the value of [`FAULT_ENV`].
    pub fn parse(v: &str) -> Result<Self> {
        let secs = v
            .strip_prefix("stall-input-after=")
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .with_context(|| format!("{FAULT_ENV}={v:?}: expected stall-input-after=SECONDS"))?;
        Ok(Fault::StallInputAfter(Duration::from_secs_f64(secs)))
    }
}

/// Runs the daemon until SIGTERM/SIGINT, on a single-threaded runtime.
pub fn run(opts: Options) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .thread_name("powermeterd-io")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(opts))
}

/// Sets the energy register to `kwh` in the state directory of `config` (daemon stopped).
/// Returns the energy before and after.
pub fn set_reading(config: &Config, kwh: f64) -> Result<(f64, f64)> {
    let dir = &config.state.dir;
    let loaded = Store::open(dir).with_context(|| format!("opening state in {}", dir.display()))?;
    let snapshot = loaded.snapshot.unwrap_or(Snapshot {
        pulses_total: 0,
        register: Default::default(),
    });
    let mut meter = Meter::new(
        config.meter_settings(),
        snapshot.pulses_total,
        snapshot.register,
    );
    let before = meter.energy_kwh();
    meter.set_reading(kwh);
    let mut store = loaded.store;
    store
        .save(snapshot_of(&meter), clock::unix_now_s() as u64)
        .context("saving the new reading")?;
    Ok((before, meter.energy_kwh()))
}

fn snapshot_of(m: &Meter) -> Snapshot {
    Snapshot {
        pulses_total: m.pulses_total(),
        register: m.register(),
    }
}

/// The state store and the last count written, shared by the saver and the stop path.
struct Saver {
    store: Mutex<Store>,
    shared: Arc<Shared>,
    saved_pulses: AtomicU64,
}

impl Saver {
    /// Saves the current count off the runtime thread (fsync can take a while on an SD card).
    async fn save(self: &Arc<Self>, why: &'static str) -> bool {
        let this = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            let snapshot = snapshot_of(&this.shared.meter());
            let mut store = this.store.lock().unwrap_or_else(PoisonError::into_inner);
            store
                .save(snapshot, clock::unix_now_s() as u64)
                .map(|()| snapshot.pulses_total)
        })
        .await;
        match result {
            Ok(Ok(pulses)) => {
                self.saved_pulses.store(pulses, Ordering::Relaxed);
                self.shared.record_save(Ok(pulses));
                tracing::debug!(pulses_total = pulses, reason = why, "state saved");
                true
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, reason = why, "state save failed");
                self.shared.record_save(Err(e.to_string()));
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "state save task failed");
                self.shared.record_save(Err(e.to_string()));
                false
            }
        }
    }

    fn dirty(&self) -> bool {
        self.shared.pulses_total() != self.saved_pulses.load(Ordering::Relaxed)
    }
}

async fn run_async(opts: Options) -> Result<()> {
    let Options {
        config_path,
        mut config,
        passed,
        watchdog,
        fault,
    } = opts;

    // Signal handlers before anything is reachable: a SIGHUP or SIGTERM that arrives once a
    // port answers must not hit the default action (terminate without saving).
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;

    // State first: a damaged state directory must stop us before anything is counted.
    let dir = config.state.dir.clone();
    let loaded =
        Store::open(&dir).with_context(|| format!("opening state in {}", dir.display()))?;
    for (path, why) in &loaded.corrupt {
        tracing::error!(
            file = %path.display(),
            problem = %why,
            "damaged state file not trusted; kept as .corrupt, using the older valid copy"
        );
    }
    let snapshot = loaded.snapshot.unwrap_or(Snapshot {
        pulses_total: 0,
        register: Default::default(),
    });
    if loaded.snapshot.is_none() {
        tracing::info!(dir = %dir.display(), "no saved state yet: starting at 0 pulses");
    }
    let meter = Meter::new(
        config.meter_settings(),
        snapshot.pulses_total,
        snapshot.register,
    );
    let shared = Arc::new(Shared::new(meter));
    let saver = Arc::new(Saver {
        store: Mutex::new(loaded.store),
        shared: shared.clone(),
        saved_pulses: AtomicU64::new(snapshot.pulses_total),
    });

    // Input: armed now, or retried in the background until it appears (a missing chip or
    // line, a line held by another process). The count is served meanwhile; /health says why.
    let input_kind = config.input.source.name();
    let source = match Source::open(&config) {
        Ok(s) => {
            shared.set_input(Ok(()));
            tracing::info!(input = %s.describe(), pulses_total = snapshot.pulses_total, "input armed");
            Some(s)
        }
        Err(e) => {
            input_unavailable(&shared, &mut None, e.to_string());
            None
        }
    };
    let fault = match fault {
        Some(f) if input_kind == "sim" => {
            tracing::warn!(?f, "fault injection active ({FAULT_ENV}): for tests only");
            Some(f)
        }
        Some(_) => {
            tracing::warn!("{FAULT_ENV} ignored: only the sim input takes faults");
            None
        }
        None => None,
    };

    // Listeners: passed by systemd, else bound from the configuration.
    let legacy = listeners("legacy", passed.legacy, &config.legacy.listen).await?;
    let http = listeners("http", passed.http, &config.http.listen).await?;
    // The local reading socket for the MQTT publisher: only when systemd passes it.
    let readers = passed
        .reading
        .into_iter()
        .map(reading::adopt)
        .collect::<Result<Vec<_>>>()?;
    if !readers.is_empty() {
        tracing::info!(listener = "reading", "using socket passed by systemd");
    }

    // A first save proves the state directory is writable before we report ready.
    if !saver.save("start").await {
        tracing::warn!("starting with a failing state directory: /health reports it");
    }

    let tick = watchdog.map_or(Duration::from_secs(1), |w| {
        (w / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut beats: Vec<(String, Arc<Beat>)> = Vec::new();

    let input_beat = Arc::new(Beat::default());
    beats.push(("input".into(), input_beat.clone()));
    tasks.spawn(supervise_input(
        source,
        config.clone(),
        shared.clone(),
        input_beat,
        tick,
        fault,
        stop_rx.clone(),
    ));
    for (i, l) in legacy.into_iter().enumerate() {
        let beat = Arc::new(Beat::default());
        beats.push((format!("legacy listener {i}"), beat.clone()));
        tasks.spawn(legacy::serve(
            l,
            shared.clone(),
            beat,
            tick,
            stop_rx.clone(),
        ));
    }
    for (i, l) in http.into_iter().enumerate() {
        let beat = Arc::new(Beat::default());
        beats.push((format!("http listener {i}"), beat.clone()));
        tasks.spawn(http::serve(
            l,
            shared.clone(),
            input_kind,
            beat,
            tick,
            stop_rx.clone(),
        ));
    }
    for (i, l) in readers.into_iter().enumerate() {
        let beat = Arc::new(Beat::default());
        beats.push((format!("reading socket {i}"), beat.clone()));
        tasks.spawn(reading::serve(
            l,
            shared.clone(),
            beat,
            tick,
            stop_rx.clone(),
        ));
    }
    let save_interval = Arc::new(AtomicU64::new(config.state.save_interval_s));
    tasks.spawn(saver_task(
        saver.clone(),
        save_interval.clone(),
        stop_rx.clone(),
    ));
    tasks.spawn(status_task(shared.clone(), stop_rx.clone()));
    if let Some(interval) = watchdog {
        tasks.spawn(watchdog_task(interval, beats, stop_rx.clone()));
    }

    systemd::ready(&status_line(&shared));
    tracing::info!(version = crate::VERSION, "ready");

    let outcome: Result<()> = loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break Ok(()); }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break Ok(()); }
            _ = sighup.recv() => {
                systemd::reloading();
                reload(&config_path, &mut config, &shared, &save_interval);
                saver.save("reload").await;
                systemd::reloaded();
            }
        }
    };

    systemd::stopping();
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let saved = saver.save("stop").await;
    tracing::info!(pulses_total = shared.pulses_total(), saved, "stopped");
    outcome?;
    if !saved {
        bail!(
            "the final state save failed (see the log); the count of the last successful save is kept"
        );
    }
    Ok(())
}

async fn listeners(
    what: &str,
    passed: Vec<std::net::TcpListener>,
    configured: &[SocketAddr],
) -> Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    if !passed.is_empty() {
        for l in passed {
            l.set_nonblocking(true)
                .with_context(|| format!("{what}: preparing a passed socket"))?;
            let addr = l.local_addr().ok();
            out.push(
                TcpListener::from_std(l)
                    .with_context(|| format!("{what}: adopting a passed socket"))?,
            );
            tracing::info!(listener = what, address = ?addr, "using socket passed by systemd");
        }
        return Ok(out);
    }
    for addr in configured {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("{what}: binding {addr}"))?;
        tracing::info!(listener = what, address = %addr, "listening");
        out.push(l);
    }
    Ok(out)
}

/// How often a missing or failed input is opened again.
const INPUT_RETRY: Duration = Duration::from_secs(2);

/// Records that the input is not armed and why; logs it once per distinct problem (`last`),
/// so a retry loop does not flood the journal.
fn input_unavailable(shared: &Shared, last: &mut Option<String>, problem: String) {
    if last.as_deref() != Some(problem.as_str()) {
        tracing::error!(
            problem = %problem,
            retry_s = INPUT_RETRY.as_secs(),
            "input not armed: counting resumes when it can be opened; /health reports it"
        );
    } else {
        tracing::debug!(problem = %problem, "input still not available");
    }
    shared.set_input(Err(problem.clone()));
    *last = Some(problem);
}

/// Keeps the input armed for the daemon's life: reads edges from the open source; when it is
/// missing or fails (no chip, no such line, line busy, chip removed) it reports why and opens
/// it again every `INPUT_RETRY`, beating all the while (retrying is this task's progress).
async fn supervise_input(
    mut source: Option<Source>,
    config: Config,
    shared: Arc<Shared>,
    beat: Arc<Beat>,
    tick: Duration,
    fault: Option<Fault>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_problem = shared.input_problem();
    loop {
        match source.as_mut() {
            Some(src) => {
                match input_task(src, &shared, &beat, tick, fault, stop.clone()).await {
                    Ok(()) => return,
                    Err(e) => input_unavailable(&shared, &mut last_problem, e),
                }
                source = None;
            }
            None => {
                let next_try = tokio::time::Instant::now() + INPUT_RETRY;
                while tokio::time::Instant::now() < next_try {
                    beat.beat();
                    tokio::select! {
                        _ = tokio::time::sleep(tick.min(INPUT_RETRY)) => {}
                        _ = stop.changed() => return,
                    }
                }
                match Source::open(&config) {
                    Ok(s) => {
                        tracing::info!(input = %s.describe(), pulses_total = shared.pulses_total(), "input armed");
                        shared.set_input(Ok(()));
                        last_problem = None;
                        source = Some(s);
                    }
                    Err(e) => input_unavailable(&shared, &mut last_problem, e.to_string()),
                }
            }
        }
    }
}

async fn input_task(
    source: &mut Source,
    shared: &Shared,
    beat: &Beat,
    tick: Duration,
    fault: Option<Fault>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let stall_at = fault.map(|Fault::StallInputAfter(d)| tokio::time::Instant::now() + d);
    let mut edges: Vec<EdgeEvent> = Vec::with_capacity(64);
    loop {
        beat.beat();
        if stall_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
            tracing::warn!("fault injection: input task stalls now");
            let _ = stop.changed().await;
            return Ok(());
        }
        tokio::select! {
            r = source.next_edges(&mut edges) => r.map_err(|e| e.to_string())?,
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => return Ok(()),
        }
        if edges.is_empty() {
            continue;
        }
        let mut m = shared.meter();
        for e in edges.drain(..) {
            if e.lost_before > 0 {
                m.on_lost_edges(e.lost_before);
                tracing::warn!(
                    lost = e.lost_before,
                    "edges lost by the kernel (event buffer overflow)"
                );
            }
            let outcome = m.on_edge(e.timestamp_ns);
            tracing::trace!(?outcome, ts_ns = e.timestamp_ns, "edge");
        }
    }
}

async fn saver_task(
    saver: Arc<Saver>,
    interval_s: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let every = Duration::from_secs(interval_s.load(Ordering::Relaxed).max(1));
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        // Saves only when the count moved, or to retry after a failure: bounded SD writes.
        if saver.dirty() || !saver.shared.saves.last_ok.load(Ordering::Relaxed) {
            saver.save("interval").await;
        }
    }
}

fn status_line(shared: &Shared) -> String {
    let r = shared.reading(clock::monotonic_ns());
    format!(
        "{} pulses, {:.3} kWh, {:.0} W",
        r.pulses_total, r.energy_kwh, r.power_w
    )
}

async fn status_task(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => systemd::status(&status_line(&shared)),
            _ = stop.changed() => return,
        }
    }
}

/// Pings the watchdog every half interval, but only while every task beat within the last
/// half interval: a stalled task (or a blocked runtime) stops the pings and systemd acts.
async fn watchdog_task(
    interval: Duration,
    beats: Vec<(String, Arc<Beat>)>,
    mut stop: watch::Receiver<bool>,
) {
    let period = interval / 2;
    let limit_ns = period.as_nanos() as u64;
    let mut reported = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
        let now = clock::monotonic_ns();
        let stalled: Vec<&str> = beats
            .iter()
            .filter(|(_, b)| now.saturating_sub(b.last()) > limit_ns)
            .map(|(n, _)| n.as_str())
            .collect();
        if stalled.is_empty() {
            systemd::watchdog();
            reported = false;
        } else if !reported {
            tracing::error!(stalled = ?stalled, "tasks stopped making progress: withholding watchdog pings");
            systemd::status(&format!("stalled: {}", stalled.join(", ")));
            reported = true;
        }
    }
}

/// SIGHUP: re-reads the configuration. Meter settings and the save interval apply at once;
/// changes to the input, the listeners or the state directory need a restart (logged).
fn reload(path: &Path, config: &mut Config, shared: &Shared, save_interval: &AtomicU64) {
    let new = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: configuration invalid, keeping the running one");
            return;
        }
    };
    shared.meter().apply_settings(new.meter_settings());
    save_interval.store(new.state.save_interval_s, Ordering::Relaxed);
    let mut restart = Vec::new();
    if new.input.source != config.input.source
        || new.input.pin != config.input.pin
        || new.input.chip != config.input.chip
        || new.input.edge != config.input.edge
        || new.input.bias != config.input.bias
        || new.input.sim != config.input.sim
    {
        restart.push("input");
    }
    if new.legacy != config.legacy {
        restart.push("legacy");
    }
    if new.http != config.http {
        restart.push("http");
    }
    if new.state.dir != config.state.dir {
        restart.push("state.dir");
    }
    if !restart.is_empty() {
        tracing::warn!(sections = ?restart, "SIGHUP: these changes take effect at the next restart");
    }
    tracing::info!("SIGHUP: configuration reloaded");
    // Keep the running input, listeners and directory in `config` so that the next reload
    // compares against what really runs.
    config.meter = new.meter;
    config.input.debounce_ms = new.input.debounce_ms;
    config.input.zero_after_s = new.input.zero_after_s;
    config.state.save_interval_s = new.state.save_interval_s;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_parsing() {
        assert_eq!(
            Fault::parse("stall-input-after=2.5").unwrap(),
            Fault::StallInputAfter(Duration::from_millis(2500))
        );
        assert!(Fault::parse("stall").is_err());
        assert!(Fault::parse("stall-input-after=-1").is_err());
    }
}
