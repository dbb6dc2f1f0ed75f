//! The metering core: debounced counting on edge timestamps, power estimation, the energy
//! register. Pure and deterministic: it never reads a clock itself, every call takes the
//! timestamp (nanoseconds of `CLOCK_MONOTONIC`) it is about.

/// Settings of the meter that can change at run time (SIGHUP).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeterSettings {
    /// Pulses the meter emits per kWh (`meter.pulses_per_kwh`), > 0.
    pub pulses_per_kwh: u32,
    /// Minimum time between two counted edges, in ns (`input.debounce_ms`).
    pub debounce_ns: u64,
    /// Power reads 0 after this long without a pulse, in ns (`input.zero_after_s`).
    pub zero_after_ns: u64,
}

/// What happened to one edge offered to [`Meter::on_edge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeOutcome {
    /// The edge was counted as a pulse.
    Counted,
    /// The edge came closer than the debounce time to the last counted edge.
    Debounced,
}

/// The energy register: the meter's reading in kWh at a given lifetime pulse count.
///
/// Energy = `base_kwh + (pulses_total - base_pulses) / pulses_per_kwh`. Setting the register to
/// the meter's display (`powermeterd --set-reading`) moves the base, never the pulse count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EnergyRegister {
    /// kWh at `base_pulses`.
    pub base_kwh: f64,
    /// The lifetime pulse count at which `base_kwh` was true.
    pub base_pulses: u64,
}

impl Default for EnergyRegister {
    fn default() -> Self {
        Self {
            base_kwh: 0.0,
            base_pulses: 0,
        }
    }
}

/// Counter state of a meter: the lifetime pulse count and what is derived from edges.
#[derive(Debug, Clone)]
pub struct Meter {
    settings: MeterSettings,
    pulses_total: u64,
    rejected_debounce: u64,
    edges_lost: u64,
    last_counted_ns: Option<u64>,
    last_interval_ns: Option<u64>,
    register: EnergyRegister,
}

impl Meter {
    /// A meter that starts at a persisted lifetime count and energy register.
    pub fn new(settings: MeterSettings, pulses_total: u64, register: EnergyRegister) -> Self {
        Self {
            settings,
            pulses_total,
            rejected_debounce: 0,
            edges_lost: 0,
            last_counted_ns: None,
            last_interval_ns: None,
            register,
        }
    }

    /// Offers one edge, stamped `ts_ns`, to the counter.
    ///
    /// An edge closer than the debounce time to the last counted edge (or stamped before it)
    /// is rejected and counted as such; otherwise the lifetime count grows by one.
    pub fn on_edge(&mut self, ts_ns: u64) -> EdgeOutcome {
        if let Some(last) = self.last_counted_ns {
            if ts_ns < last || ts_ns - last < self.settings.debounce_ns {
                self.rejected_debounce += 1;
                return EdgeOutcome::Debounced;
            }
            self.last_interval_ns = Some(ts_ns - last);
        }
        self.last_counted_ns = Some(ts_ns);
        self.pulses_total = self.pulses_total.saturating_add(1);
        EdgeOutcome::Counted
    }

    /// Records edges the kernel reported lost (gaps in its sequence numbers). They are not
    /// counted as pulses (their time is unknown) but are exported so that a user sees them.
    pub fn on_lost_edges(&mut self, n: u64) {
        self.edges_lost = self.edges_lost.saturating_add(n);
    }

    /// Estimated power in W at time `now_ns`.
    ///
    /// From the interval between the last two counted pulses; once the time since the last
    /// pulse exceeds that interval, the estimate decays as `energy_per_pulse / elapsed` (the
    /// highest power consistent with no pulse since), and it is 0 after `zero_after`.
    /// Before the second pulse after start the interval is unknown and the power reads 0.
    pub fn power_w(&self, now_ns: u64) -> f64 {
        let Some(last) = self.last_counted_ns else {
            return 0.0;
        };
        let elapsed = now_ns.saturating_sub(last);
        if elapsed >= self.settings.zero_after_ns {
            return 0.0;
        }
        let Some(interval) = self.last_interval_ns.filter(|i| *i > 0) else {
            return 0.0;
        };
        let watt_ns = self.joules_per_pulse() * 1e9;
        watt_ns / interval.max(elapsed) as f64
    }

    /// Energy in J that one pulse stands for.
    fn joules_per_pulse(&self) -> f64 {
        3.6e6 / f64::from(self.settings.pulses_per_kwh)
    }

    /// The meter's energy register in kWh.
    pub fn energy_kwh(&self) -> f64 {
        let since_base = self.pulses_total.saturating_sub(self.register.base_pulses);
        self.register.base_kwh + since_base as f64 / f64::from(self.settings.pulses_per_kwh)
    }

    /// Sets the energy register to `kwh` at the current pulse count.
    pub fn set_reading(&mut self, kwh: f64) {
        self.register = EnergyRegister {
            base_kwh: kwh,
            base_pulses: self.pulses_total,
        };
    }

    /// Applies new settings. A change of `pulses_per_kwh` re-bases the energy register so the
    /// energy already metered keeps its value.
    pub fn apply_settings(&mut self, settings: MeterSettings) {
        if settings.pulses_per_kwh != self.settings.pulses_per_kwh {
            let kwh = self.energy_kwh();
            self.set_reading(kwh);
        }
        self.settings = settings;
    }

    /// Lifetime number of counted pulses.
    pub fn pulses_total(&self) -> u64 {
        self.pulses_total
    }

    /// Edges rejected by the debounce since start.
    pub fn rejected_debounce(&self) -> u64 {
        self.rejected_debounce
    }

    /// Edges the kernel reported lost since start.
    pub fn edges_lost(&self) -> u64 {
        self.edges_lost
    }

    /// Monotonic timestamp of the last counted pulse since start.
    pub fn last_pulse_ns(&self) -> Option<u64> {
        self.last_counted_ns
    }

    /// The energy register.
    pub fn register(&self) -> EnergyRegister {
        self.register
    }

    /// The settings in force.
    pub fn settings(&self) -> MeterSettings {
        self.settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    fn settings() -> MeterSettings {
        MeterSettings {
            pulses_per_kwh: 800,
            debounce_ns: 20 * MS,
            zero_after_ns: 300 * S,
        }
    }

    #[test]
    fn counts_edges_and_rejects_bounces() {
        let mut m = Meter::new(settings(), 0, EnergyRegister::default());
        assert_eq!(m.on_edge(S), EdgeOutcome::Counted);
        assert_eq!(m.on_edge(S + 5 * MS), EdgeOutcome::Debounced);
        assert_eq!(m.on_edge(S + 19 * MS), EdgeOutcome::Debounced);
        assert_eq!(m.on_edge(S + 20 * MS), EdgeOutcome::Counted);
        assert_eq!(m.on_edge(S + 10 * MS), EdgeOutcome::Debounced, "backwards");
        assert_eq!(m.pulses_total(), 2);
        assert_eq!(m.rejected_debounce(), 3);
    }

    #[test]
    fn debounce_is_measured_from_the_last_counted_edge() {
        // A chatter of edges every 15 ms: each is rejected relative to the counted one,
        // so the second counted edge is the first at or after 20 ms.
        let mut m = Meter::new(settings(), 0, EnergyRegister::default());
        for i in 0..4 {
            m.on_edge(i * 15 * MS);
        }
        assert_eq!(m.pulses_total(), 2); // 0 ms and 30 ms
        assert_eq!(m.last_pulse_ns(), Some(30 * MS));
    }

    #[test]
    fn power_from_interval_then_decays_then_zero() {
        let mut m = Meter::new(settings(), 0, EnergyRegister::default());
        assert_eq!(m.power_w(S), 0.0);
        // 800 pulses/kWh, 3 s apart: 4500 J per pulse / 3 s = 1500 W.
        m.on_edge(10 * S);
        m.on_edge(13 * S);
        assert!((m.power_w(13 * S) - 1500.0).abs() < 1e-9);
        assert!(
            (m.power_w(15 * S) - 1500.0).abs() < 1e-9,
            "within the interval"
        );
        assert!(
            (m.power_w(19 * S) - 750.0).abs() < 1e-9,
            "6 s without pulse: 1/elapsed"
        );
        assert!(m.power_w(13 * S + 299 * S) > 0.0);
        assert_eq!(m.power_w(13 * S + 300 * S), 0.0);
    }

    #[test]
    fn power_is_unknown_until_the_second_pulse() {
        let mut m = Meter::new(settings(), 7, EnergyRegister::default());
        m.on_edge(100 * S);
        assert_eq!(m.power_w(100 * S), 0.0);
        assert_eq!(m.power_w(109 * S), 0.0);
        m.on_edge(109 * S);
        assert!((m.power_w(109 * S) - 500.0).abs() < 1e-9);
    }

    #[test]
    fn energy_register_and_rebase() {
        let mut m = Meter::new(settings(), 1600, EnergyRegister::default());
        assert!((m.energy_kwh() - 2.0).abs() < 1e-12);
        m.set_reading(12_345.5);
        m.on_edge(S);
        assert!((m.energy_kwh() - 12_345.501_25).abs() < 1e-9);
        let mut s = settings();
        s.pulses_per_kwh = 1000;
        let before = m.energy_kwh();
        m.apply_settings(s);
        assert!((m.energy_kwh() - before).abs() < 1e-9);
        m.on_edge(2 * S);
        assert!((m.energy_kwh() - before - 0.001).abs() < 1e-9);
        assert_eq!(m.pulses_total(), 1602);
    }

    #[test]
    fn lost_edges_are_tracked_not_counted() {
        let mut m = Meter::new(settings(), 0, EnergyRegister::default());
        m.on_lost_edges(3);
        assert_eq!(m.edges_lost(), 3);
        assert_eq!(m.pulses_total(), 0);
    }

    proptest! {
        #[test]
        fn counted_edges_respect_debounce(mut gaps in proptest::collection::vec(0u64..100 * MS, 1..300),
                                          debounce_ms in 0u64..50) {
            let mut s = settings();
            s.debounce_ns = debounce_ms * MS;
            let mut m = Meter::new(s, 42, EnergyRegister::default());
            let mut t = 0u64;
            let mut counted = Vec::new();
            gaps.sort_unstable_by(|a, b| b.cmp(a)); // any order works; sorted is a stress shape
            for g in &gaps {
                t += g;
                let before = m.pulses_total();
                if m.on_edge(t) == EdgeOutcome::Counted {
                    counted.push(t);
                    prop_assert_eq!(m.pulses_total(), before + 1);
                } else {
                    prop_assert_eq!(m.pulses_total(), before);
                }
            }
            for w in counted.windows(2) {
                prop_assert!(w[1] - w[0] >= s.debounce_ns);
            }
            prop_assert_eq!(m.pulses_total(), 42 + counted.len() as u64);
            prop_assert_eq!(counted.len() as u64 + m.rejected_debounce(), gaps.len() as u64);
        }

        #[test]
        // Intervals from the debounce time up: a shorter one is rejected and gives no power.
        fn power_never_increases_without_pulses(interval_ms in 20u64..100_000, step_ms in 1u64..10_000) {
            let mut m = Meter::new(settings(), 0, EnergyRegister::default());
            prop_assert_eq!(settings().debounce_ns, 20 * MS);
            m.on_edge(S);
            prop_assert_eq!(m.on_edge(S + interval_ms * MS), EdgeOutcome::Counted);
            let mut now = S + interval_ms * MS;
            let mut last = m.power_w(now);
            prop_assert!(last > 0.0);
            for _ in 0..50 {
                now += step_ms * MS;
                let p = m.power_w(now);
                prop_assert!(p <= last);
                prop_assert!(p >= 0.0);
                last = p;
            }
        }
    }
}
