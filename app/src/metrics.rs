//! Renders a [`Reading`] as Prometheus text exposition (format 0.0.4, written here: a fixed
//! set of series from one snapshot) and as JSON (serde_json, from `Reading`'s `Serialize`).

use std::fmt::Write as _;

use serde::Serialize;

use crate::shared::Reading;

/// Content type of [`prometheus`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The Prometheus exposition of `r`; `input` names the pulse source for the build info.
pub fn prometheus(r: &Reading, input: &str) -> String {
    let mut out = String::with_capacity(2048);
    let mut metric = |name: &str, kind: &str, help: &str, value: &str| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    };
    metric(
        "powermeter_pulses_total",
        "counter",
        "Pulses counted over the meter's lifetime (persisted).",
        &r.pulses_total.to_string(),
    );
    metric(
        "powermeter_energy_kwh_total",
        "counter",
        "Energy register in kWh (pulses / pulses_per_kwh plus the set reading).",
        &float(r.energy_kwh),
    );
    metric(
        "powermeter_power_watts",
        "gauge",
        "Power estimated from the interval between pulses, decaying when pulses stop.",
        &float(r.power_w),
    );
    metric(
        "powermeter_last_pulse_timestamp_seconds",
        "gauge",
        "Unix time of the last counted pulse since start (0 if none yet).",
        &float(r.last_pulse_unix_s.unwrap_or(0.0)),
    );
    metric(
        "powermeter_edges_lost_total",
        "counter",
        "Edges the kernel reported lost (event sequence gaps) since start.",
        &r.edges_lost.to_string(),
    );
    metric(
        "powermeter_state_saves_total",
        "counter",
        "Successful saves of the counter state since start.",
        &r.state_saves.to_string(),
    );
    metric(
        "powermeter_state_save_failures_total",
        "counter",
        "Failed saves of the counter state since start.",
        &r.state_save_failures.to_string(),
    );
    metric(
        "powermeter_state_saved_pulses",
        "gauge",
        "The pulse count in the newest completed state save (a power cut now restarts from it).",
        &r.state_saved_pulses.to_string(),
    );
    metric(
        "powermeter_input_armed",
        "gauge",
        "1 while the pulse input is open and read.",
        if r.input_armed { "1" } else { "0" },
    );
    metric(
        "powermeter_pulses_per_kwh",
        "gauge",
        "The configured meter constant.",
        &r.pulses_per_kwh.to_string(),
    );
    metric(
        "powermeter_legacy_connections_total",
        "counter",
        "Port-9001 connections answered since start.",
        &r.legacy_served.to_string(),
    );
    metric(
        "powermeter_http_requests_total",
        "counter",
        "HTTP requests answered since start.",
        &r.http_requests.to_string(),
    );
    metric(
        "powermeter_connections_dropped_total",
        "counter",
        "Connections closed for a timeout or an oversized request since start.",
        &r.dropped.to_string(),
    );
    metric(
        "powermeter_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        &float(r.uptime_s),
    );
    let _ = write!(
        out,
        "# HELP powermeter_pulses_rejected_total Edges not counted since start, by reason.\n\
         # TYPE powermeter_pulses_rejected_total counter\n\
         powermeter_pulses_rejected_total{{reason=\"debounce\"}} {}\n\
         # HELP powermeter_build_info Build information.\n\
         # TYPE powermeter_build_info gauge\n\
         powermeter_build_info{{version=\"{}\",input=\"{}\"}} 1\n",
        r.rejected_debounce,
        label(crate::VERSION),
        label(input),
    );
    out
}

/// Content type of [`json`]'s output.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The document of `GET /api/v1/reading`: the reading's figures, then the daemon's version.
#[derive(Serialize)]
struct Document<'a> {
    #[serde(flatten)]
    reading: &'a Reading,
    version: &'static str,
}

/// The JSON document of `GET /api/v1/reading`, one line.
pub fn json(r: &Reading) -> String {
    let doc = Document {
        reading: r,
        version: crate::VERSION,
    };
    // Serializing plain numbers, bools and strings into a String cannot fail; the fallback
    // keeps the route total all the same.
    let mut out = serde_json::to_string(&doc).unwrap_or_else(|_| "{}".to_owned());
    out.push('\n');
    out
}

/// A finite float in a form Prometheus accepts.
fn float(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "0".to_owned()
    }
}

/// Escapes a label value.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading() -> Reading {
        Reading {
            pulses_total: 1234,
            energy_kwh: 1.5425,
            power_w: 1500.0,
            last_pulse_unix_s: Some(1_763_836_800.25),
            rejected_debounce: 3,
            edges_lost: 0,
            pulses_per_kwh: 800,
            state_saves: 2,
            state_save_failures: 0,
            state_saved_pulses: 1200,
            input_armed: true,
            legacy_served: 9,
            http_requests: 4,
            dropped: 0,
            uptime_s: 12.5,
        }
    }

    #[test]
    fn exposition_is_well_formed() {
        let text = prometheus(&reading(), "sim");
        let mut typed = std::collections::HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(matches!(kind, "counter" | "gauge"));
                assert!(
                    typed.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "{name} twice"
                );
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{name}"
            );
            let kind = typed
                .get(name)
                .unwrap_or_else(|| panic!("{name} has no TYPE"));
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
            value.parse::<f64>().unwrap();
        }
        assert!(text.contains("powermeter_pulses_total 1234\n"));
        assert!(text.contains("powermeter_energy_kwh_total 1.5425\n"));
        assert!(text.contains("powermeter_pulses_rejected_total{reason=\"debounce\"} 3\n"));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn json_has_every_figure_and_null_before_a_pulse() {
        let mut r = reading();
        let j = json(&r);
        assert!(
            j.starts_with("{\"pulses_total\":1234,\"energy_kwh\":1.5425,\"power_w\":1500.0,"),
            "{j}"
        );
        assert!(
            j.ends_with(&format!(",\"version\":\"{}\"}}\n", crate::VERSION)),
            "{j}"
        );
        for private in ["legacy_served", "http_requests", "dropped"] {
            assert!(!j.contains(private), "{j}");
        }
        let parsed: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(parsed["pulses_rejected_debounce"], 3);
        assert!(j.contains("\"last_pulse_unix_s\":1763836800.25"));
        r.last_pulse_unix_s = None;
        assert!(json(&r).contains("\"last_pulse_unix_s\":null"));
    }
}
