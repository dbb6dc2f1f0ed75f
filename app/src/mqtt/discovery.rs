//! Topics and payloads: the retained state, the availability (with the last will), and Home
//! Assistant MQTT discovery (one device, three sensors).

use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::config::MqttConfig;

/// Availability payloads.
pub const ONLINE: &str = "online";
/// See [`ONLINE`].
pub const OFFLINE: &str = "offline";

/// The figures the publisher takes from the daemon's reading (the JSON of
/// `GET /api/v1/reading`; other fields are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Figures {
    /// Lifetime pulses.
    pub pulses_total: u64,
    /// The energy register, kWh.
    pub energy_kwh: f64,
    /// Estimated power, W.
    pub power_w: f64,
    /// Unix time of the last pulse since the daemon started, if any.
    pub last_pulse_unix_s: Option<f64>,
    /// The daemon's version.
    #[serde(default)]
    pub version: Option<String>,
}

/// The device id derived from a machine id: the first 12 hex digits of
/// SHA-256(`powermeter:` + machine id), so the machine id itself is not published.
pub fn device_id_from_machine_id(machine_id: &str) -> String {
    let digest = Sha256::digest(format!("powermeter:{}", machine_id.trim()).as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Every topic the publisher uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// The device id (in discovery's identifiers and unique ids).
    pub device_id: String,
    /// `<prefix>/state`: retained JSON of the figures.
    pub state: String,
    /// `<prefix>/availability`: retained `online`/`offline` (the last will sets `offline`).
    pub availability: String,
    /// `<discovery prefix>/status`: Home Assistant's birth message (`online`).
    pub ha_status: String,
    /// The discovery config topics of the sensors: (object id, topic).
    pub discovery: Vec<(&'static str, String)>,
}

/// One Home Assistant sensor of the device.
struct Sensor {
    object: &'static str,
    name: &'static str,
    device_class: Option<&'static str>,
    state_class: &'static str,
    unit: Option<&'static str>,
    template: &'static str,
    icon: Option<&'static str>,
}

/// The sensors: energy, power, and the raw pulse counter.
const SENSORS: [Sensor; 3] = [
    Sensor {
        object: "energy",
        name: "Energy",
        device_class: Some("energy"),
        state_class: "total_increasing",
        unit: Some("kWh"),
        template: "{{ value_json.energy_kwh }}",
        icon: None,
    },
    Sensor {
        object: "power",
        name: "Power",
        device_class: Some("power"),
        state_class: "measurement",
        unit: Some("W"),
        template: "{{ value_json.power_w }}",
        icon: None,
    },
    Sensor {
        object: "pulses",
        name: "Pulses",
        device_class: None,
        state_class: "total_increasing",
        unit: None,
        template: "{{ value_json.pulses_total }}",
        icon: Some("mdi:counter"),
    },
];

impl Topics {
    /// The topics for `config` and `device_id`.
    pub fn new(config: &MqttConfig, device_id: &str) -> Self {
        let prefix = config
            .topic_prefix
            .clone()
            .unwrap_or_else(|| format!("powermeter/{device_id}"));
        let disc = &config.discovery_prefix;
        Self {
            device_id: device_id.to_owned(),
            state: format!("{prefix}/state"),
            availability: format!("{prefix}/availability"),
            ha_status: format!("{disc}/status"),
            discovery: SENSORS
                .iter()
                .map(|s| {
                    (
                        s.object,
                        format!("{disc}/sensor/powermeter_{device_id}/{}/config", s.object),
                    )
                })
                .collect(),
        }
    }
}

/// The discovery config payloads, one per sensor: (topic, JSON).
pub fn discovery_payloads(config: &MqttConfig, topics: &Topics) -> Vec<(String, String)> {
    let mut device = json!({
        "identifiers": [format!("powermeter_{}", topics.device_id)],
        "name": config.device_name,
        "manufacturer": "powermeter",
        "model": "powermeterd pulse counter",
        "sw_version": crate::VERSION,
    });
    if let Some(url) = &config.configuration_url {
        device["configuration_url"] = Value::from(url.as_str());
    }
    SENSORS
        .iter()
        .zip(&topics.discovery)
        .map(|(s, (_, topic))| {
            let Sensor {
                object,
                name,
                device_class,
                state_class,
                unit,
                template,
                icon,
            } = *s;
            let mut p = json!({
                "name": name,
                "unique_id": format!("powermeter_{}_{object}", topics.device_id),
                "state_topic": topics.state,
                "value_template": template,
                "state_class": state_class,
                "availability_topic": topics.availability,
                "payload_available": ONLINE,
                "payload_not_available": OFFLINE,
                "device": device,
            });
            if let Some(dc) = device_class {
                p["device_class"] = Value::from(dc);
            }
            if let Some(u) = unit {
                p["unit_of_measurement"] = Value::from(u);
            }
            if let Some(i) = icon {
                p["icon"] = Value::from(i);
            }
            if object == "pulses" {
                // The last pulse time rides along as an attribute of the counter.
                p["json_attributes_topic"] = Value::from(topics.state.as_str());
                p["json_attributes_template"] =
                    Value::from("{{ {'last_pulse': value_json.last_pulse} | tojson }}");
            }
            (topic.clone(), p.to_string())
        })
        .collect()
}

/// The retained state payload: energy (kWh), power (W), pulse count, and the last pulse time
/// (RFC 3339 UTC and Unix seconds; `null` before the first pulse since the daemon started).
pub fn state_payload(f: &Figures) -> String {
    let last = f.last_pulse_unix_s.filter(|t| t.is_finite() && *t >= 0.0);
    json!({
        "energy_kwh": (f.energy_kwh * 1e6).round() / 1e6,
        "power_w": (f.power_w * 10.0).round() / 10.0,
        "pulses_total": f.pulses_total,
        "last_pulse": last.map(rfc3339),
        "last_pulse_unix_s": last,
    })
    .to_string()
}

/// Unix seconds as an RFC 3339 UTC time with seconds (civil-from-days, no time crate).
pub fn rfc3339(unix_s: f64) -> String {
    let secs = unix_s.floor() as i64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400.5), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599.0), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn device_id_hides_the_machine_id() {
        let id = device_id_from_machine_id("0123456789abcdef0123456789abcdef\n");
        assert_eq!(id.len(), 12);
        assert!(!"0123456789abcdef0123456789abcdef".contains(&id));
        assert_eq!(
            id,
            device_id_from_machine_id("0123456789abcdef0123456789abcdef")
        );
    }

    #[test]
    fn discovery_has_the_home_assistant_fields() {
        let c = MqttConfig {
            configuration_url: Some("http://pm.local:9002/".into()),
            ..MqttConfig::default()
        };
        let t = Topics::new(&c, "abc");
        assert_eq!(t.state, "powermeter/abc/state");
        assert_eq!(t.ha_status, "homeassistant/status");
        let p = discovery_payloads(&c, &t);
        assert_eq!(p.len(), 3);
        let energy: Value = serde_json::from_str(&p[0].1).unwrap();
        assert_eq!(p[0].0, "homeassistant/sensor/powermeter_abc/energy/config");
        assert_eq!(energy["device_class"], "energy");
        assert_eq!(energy["state_class"], "total_increasing");
        assert_eq!(energy["unit_of_measurement"], "kWh");
        assert_eq!(energy["device"]["sw_version"], crate::VERSION);
        assert_eq!(
            energy["device"]["configuration_url"],
            "http://pm.local:9002/"
        );
        let power: Value = serde_json::from_str(&p[1].1).unwrap();
        assert_eq!(power["device_class"], "power");
        assert_eq!(power["state_class"], "measurement");
        assert_eq!(power["unit_of_measurement"], "W");
    }

    #[test]
    fn state_payload_fields() {
        let s = state_payload(&Figures {
            pulses_total: 8,
            energy_kwh: 0.01,
            power_w: 1500.04,
            last_pulse_unix_s: Some(0.0),
            version: None,
        });
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["pulses_total"], 8);
        assert_eq!(v["power_w"], 1500.0);
        assert_eq!(v["last_pulse"], "1970-01-01T00:00:00Z");
    }
}
