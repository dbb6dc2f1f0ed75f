//! The configuration file: TOML, unknown keys are errors, every error names the file, the
//! line, the column and the key.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::meter::MeterSettings;
use crate::mqtt::config::MqttConfig;

/// Where the daemon looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/powermeter/powermeter.toml";

/// The whole configuration, as documented in the README and `app/examples/sim.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[meter]`: what one pulse is worth.
    pub meter: MeterConfig,
    /// `[input]`: where pulses come from.
    #[serde(default)]
    pub input: InputConfig,
    /// `[legacy]`: the old port 9001 protocol.
    #[serde(default)]
    pub legacy: LegacyConfig,
    /// `[http]`: metrics, health and JSON.
    #[serde(default)]
    pub http: HttpConfig,
    /// `[state]`: persistence of the counter.
    #[serde(default)]
    pub state: StateConfig,
    /// `[mqtt]`: the MQTT publisher (`powermeter-mqtt`), off unless `broker` is set.
    #[serde(default)]
    pub mqtt: MqttConfig,
}

/// `[meter]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterConfig {
    /// Pulses per kWh printed on the meter (e.g. 800), > 0. Required.
    pub pulses_per_kwh: u32,
}

/// Which pulse source the daemon reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The Linux GPIO character device (uAPI v2).
    Gpio,
    /// The `rppal` crate (cargo feature `rppal`).
    Rppal,
    /// A simulated steady load, no hardware.
    Sim,
}

impl SourceKind {
    /// The name used in the configuration file and the build-info metric.
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Gpio => "gpio",
            SourceKind::Rppal => "rppal",
            SourceKind::Sim => "sim",
        }
    }
}

/// Which edge of the pulse is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Edge {
    /// Low to high.
    Rising,
    /// High to low.
    Falling,
}

/// The input line's bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bias {
    /// No bias (an external resistor).
    Off,
    /// Pull to ground.
    PullDown,
    /// Pull to the supply.
    PullUp,
}

/// `[input]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// The pulse source.
    pub source: SourceKind,
    /// BCM number 0-53: the line named `GPIO<pin>`, else that offset of `chip`.
    pub pin: u32,
    /// The chip used when no line carries the name.
    pub chip: PathBuf,
    /// The counted edge.
    pub edge: Edge,
    /// The line bias.
    pub bias: Bias,
    /// Minimum time between counted edges, ms.
    pub debounce_ms: u64,
    /// Power reads 0 after this long without a pulse, s.
    pub zero_after_s: u64,
    /// `[input.sim]`: only with `source = "sim"`.
    pub sim: Option<SimConfig>,
}

impl Default for InputConfig {
    fn default() -> Self {
        Self {
            source: SourceKind::Gpio,
            pin: 27,
            chip: PathBuf::from("/dev/gpiochip0"),
            edge: Edge::Rising,
            bias: Bias::PullDown,
            debounce_ms: 20,
            zero_after_s: 300,
            sim: None,
        }
    }
}

/// `[input.sim]`: a steady simulated load.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// The simulated load in W, > 0.
    pub watts: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self { watts: 1500.0 }
    }
}

/// `[legacy]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LegacyConfig {
    /// Addresses to listen on; empty disables the old protocol.
    pub listen: Vec<SocketAddr>,
}

impl Default for LegacyConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 9001))],
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Addresses to listen on; empty disables HTTP.
    pub listen: Vec<SocketAddr>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 9002))],
        }
    }
}

/// `[state]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// The only directory the daemon writes to (a relative path is taken from the working
    /// directory, which is `/` under systemd: use absolute paths there).
    pub dir: PathBuf,
    /// At most one save per this many seconds (and one at every clean stop), > 0.
    pub save_interval_s: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/powermeter"),
            save_interval_s: 60,
        }
    }
}

impl Config {
    /// The meter settings this configuration asks for.
    pub fn meter_settings(&self) -> MeterSettings {
        MeterSettings {
            pulses_per_kwh: self.meter.pulses_per_kwh,
            debounce_ns: self.input.debounce_ms.saturating_mul(1_000_000),
            zero_after_ns: self.input.zero_after_s.saturating_mul(1_000_000_000),
        }
    }

    /// The save interval.
    pub fn save_interval(&self) -> Duration {
        Duration::from_secs(self.state.save_interval_s)
    }

    /// The simulated load, with its default when `[input.sim]` is absent.
    pub fn sim(&self) -> SimConfig {
        self.input.sim.clone().unwrap_or_default()
    }
}

/// A configuration error: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line, 0 when the error is about the file as a whole.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The dotted key, e.g. `meter.pulses_per_kwh`, empty when no key applies.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_owned(),
        line: 0,
        column: 0,
        key: String::new(),
        message: format!("cannot read the configuration: {e}"),
    })?;
    parse(path, &text)
}

/// Parses and validates configuration `text` that came from `path`.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let doc = DeTable::parse(text).map_err(|e| {
        let span = e.span();
        located(path, text, None, span, e.message().to_owned())
    })?;
    let config: Config = toml::from_str(text).map_err(|e| {
        let span = e.span();
        let message = e.message().to_owned();
        let mut key = span
            .as_ref()
            .map(|s| key_at(doc.get_ref(), s))
            .unwrap_or_default();
        // serde names the missing or unknown field in the message; make it part of the key.
        if let Some(field) = backticked(&message) {
            let missing = message.starts_with("missing field");
            let unknown = message.starts_with("unknown field") && !key.ends_with(field);
            if missing || unknown {
                key = join(&key, field);
            }
        }
        located(path, text, Some(key), span, message)
    })?;
    validate(&config).map_err(|(key, message)| {
        let span = span_of(doc.get_ref(), &key);
        located(path, text, Some(key), span, message)
    })?;
    Ok(config)
}

/// Range checks that the types alone do not express. Returns the dotted key and the problem.
fn validate(c: &Config) -> Result<(), (String, String)> {
    let err = |k: &str, m: &str| Err((k.to_owned(), m.to_owned()));
    if c.meter.pulses_per_kwh == 0 {
        return err("meter.pulses_per_kwh", "must be greater than 0");
    }
    if c.input.pin > 53 {
        return err("input.pin", "must be a BCM GPIO number from 0 to 53");
    }
    if c.input.debounce_ms > 60_000 {
        return err("input.debounce_ms", "must be at most 60000 (one minute)");
    }
    if c.input.zero_after_s == 0 {
        return err("input.zero_after_s", "must be greater than 0");
    }
    if let Some(sim) = &c.input.sim {
        if c.input.source != SourceKind::Sim {
            return err("input.sim", "is only allowed with input.source = \"sim\"");
        }
        if !(sim.watts.is_finite() && sim.watts > 0.0 && sim.watts <= 1e9) {
            return err(
                "input.sim.watts",
                "must be a number greater than 0 and at most 1e9",
            );
        }
    }
    if c.input.source == SourceKind::Rppal && !cfg!(feature = "rppal") {
        return err(
            "input.source",
            "\"rppal\" needs a powermeterd built with the cargo feature `rppal`",
        );
    }
    if c.input.source == SourceKind::Gpio && !cfg!(feature = "gpio") {
        return err(
            "input.source",
            "\"gpio\" needs a powermeterd built with the cargo feature `gpio`",
        );
    }
    if c.state.save_interval_s == 0 || c.state.save_interval_s > 86_400 {
        return err("state.save_interval_s", "must be from 1 to 86400 seconds");
    }
    if c.state.dir.as_os_str().is_empty() {
        return err("state.dir", "must not be empty");
    }
    for (key, list) in [
        ("legacy.listen", &c.legacy.listen),
        ("http.listen", &c.http.listen),
    ] {
        for (i, a) in list.iter().enumerate() {
            if list[..i].contains(a) {
                return Err((key.to_owned(), format!("lists {a} twice")));
            }
        }
    }
    for a in &c.http.listen {
        if c.legacy.listen.contains(a) {
            return Err((
                "http.listen".to_owned(),
                format!("{a} is also in legacy.listen"),
            ));
        }
    }
    crate::mqtt::config::validate(&c.mqtt)
}

fn located(
    path: &Path,
    text: &str,
    key: Option<String>,
    span: Option<std::ops::Range<usize>>,
    message: String,
) -> ConfigError {
    let (line, column) = match span {
        Some(s) => line_col(text, s.start),
        None => (1, 1),
    };
    ConfigError {
        path: path.to_owned(),
        line,
        column,
        key: key.unwrap_or_default(),
        message,
    }
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn backticked(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Every key of the document with its dotted path, the span of the key and of the value
/// (for a `[table]`, its header), and whether it is a table.
fn flatten(table: &DeTable<'_>, prefix: &str, out: &mut Vec<(String, Range, Range, bool)>) {
    for (k, v) in table.iter() {
        let path = join(prefix, k.get_ref());
        let is_table = matches!(v.get_ref(), DeValue::Table(_));
        out.push((path.clone(), k.span(), v.span(), is_table));
        if let DeValue::Table(inner) = v.get_ref() {
            flatten(inner, &path, out);
        }
    }
}

type Range = std::ops::Range<usize>;

/// The dotted key at byte `offset`: a value or key there, else the table whose header is
/// there; empty (the document) for an empty span.
fn key_at(table: &DeTable<'_>, span: &Range) -> String {
    if span.is_empty() {
        return String::new();
    }
    let mut keys = Vec::new();
    flatten(table, "", &mut keys);
    let hit = |want_table: bool| {
        keys.iter()
            .filter(|(_, k, v, t)| {
                *t == want_table && (k.contains(&span.start) || v.contains(&span.start))
            })
            .max_by_key(|(p, ..)| p.len())
            .map(|(p, ..)| p.clone())
    };
    hit(false).or_else(|| hit(true)).unwrap_or_default()
}

/// The span of the value of dotted `key`, or of its nearest existing parent.
fn span_of(table: &DeTable<'_>, key: &str) -> Option<Range> {
    let mut current = table;
    let mut best = None;
    for part in key.split('.') {
        let (k, v): (&Spanned<_>, &Spanned<DeValue<'_>>) =
            current.iter().find(|(k, _)| k.get_ref() == part)?;
        best = Some(if matches!(v.get_ref(), DeValue::Table(_)) {
            k.span()
        } else {
            v.span()
        });
        match v.get_ref() {
            DeValue::Table(inner) => current = inner,
            _ => break,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigError {
        parse(Path::new("/etc/p.toml"), text).expect_err("config must be rejected")
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = parse(Path::new("x.toml"), "[meter]\npulses_per_kwh = 800\n").unwrap();
        assert_eq!(c.input, InputConfig::default());
        assert_eq!(c.input.pin, 27);
        assert_eq!(c.legacy.listen, vec!["0.0.0.0:9001".parse().unwrap()]);
        assert_eq!(c.http.listen, vec!["127.0.0.1:9002".parse().unwrap()]);
        assert_eq!(c.state.dir, PathBuf::from("/var/lib/powermeter"));
        assert_eq!(c.state.save_interval_s, 60);
        assert_eq!(c.sim().watts, 1500.0);
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../examples/sim.toml");
        let c = parse(Path::new("sim.toml"), text).unwrap();
        assert_eq!(c.input.source, SourceKind::Sim);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = err("[meter]\npulses_per_kwh = 800\n\n[input]\npinn = 4\n");
        assert_eq!((e.line, e.key.as_str()), (5, "input.pinn"), "{e}");
        assert!(
            e.to_string()
                .starts_with("/etc/p.toml:5:1: key `input.pinn`: unknown field")
        );
    }

    #[test]
    fn unknown_table_is_an_error() {
        let e = err("[meter]\npulses_per_kwh = 800\n[mqttt]\nbroker = \"x\"\n");
        assert_eq!(e.key, "mqttt");
        assert_eq!(e.line, 3);
        let e = err("[meter]\npulses_per_kwh = 800\n[mqtt]\nhost = \"x\"\n");
        assert_eq!((e.line, e.key.as_str()), (4, "mqtt.host"), "{e}");
    }

    #[test]
    fn mqtt_is_off_by_default_and_checked() {
        let base = "[meter]\npulses_per_kwh = 800\n";
        let c = parse(Path::new("x"), base).unwrap();
        assert_eq!(c.mqtt.broker, None);
        assert_eq!(c.mqtt.port(), 1883);
        let c = parse(
            Path::new("x"),
            &format!("{base}[mqtt]\nbroker = \"b\"\ntls = true\nca_file = \"/c.pem\"\n"),
        )
        .unwrap();
        assert_eq!(c.mqtt.port(), 8883);
        for (extra, key) in [
            ("broker = \"\"\n", "mqtt.broker"),
            ("broker = \"mqtt://x\"\n", "mqtt.broker"),
            ("port = 0\n", "mqtt.port"),
            ("port = 70000\n", "mqtt.port"),
            ("qos = 3\n", "mqtt.qos"),
            ("publish_interval_s = 0\n", "mqtt.publish_interval_s"),
            ("password = \"p\"\n", "mqtt.password"),
            (
                "username = \"u\"\npassword = \"p\"\npassword_file = \"/f\"\n",
                "mqtt.password_file",
            ),
            ("tls = true\n", "mqtt.tls"),
            ("ca_file = \"/c.pem\"\n", "mqtt.ca_file"),
            ("topic_prefix = \"a/#\"\n", "mqtt.topic_prefix"),
            ("discovery_prefix = \"\"\n", "mqtt.discovery_prefix"),
            ("device_id = \"a b\"\n", "mqtt.device_id"),
            (
                "configuration_url = \"pm.local\"\n",
                "mqtt.configuration_url",
            ),
            ("keep_alive_s = 1\n", "mqtt.keep_alive_s"),
        ] {
            let e = err(&format!("{base}[mqtt]\n{extra}"));
            assert_eq!(e.key, key, "{e}");
            assert!(e.line >= 4, "{e}");
        }
    }

    #[test]
    fn missing_required_key() {
        let e = err("[meter]\n");
        assert_eq!(e.key, "meter.pulses_per_kwh", "{e}");
        assert!(e.message.contains("missing field"));
        let e = err("[input]\npin = 4\n");
        assert_eq!(e.key, "meter", "{e}");
    }

    #[test]
    fn zero_pulses_per_kwh_points_at_the_value() {
        let e = err("[meter]\npulses_per_kwh = 0\n");
        assert_eq!((e.line, e.column), (2, 18));
        assert_eq!(e.key, "meter.pulses_per_kwh");
    }

    #[test]
    fn wrong_types_and_enums() {
        let e = err("[meter]\npulses_per_kwh = \"800\"\n");
        assert_eq!((e.line, e.key.as_str()), (2, "meter.pulses_per_kwh"), "{e}");
        let e = err("[meter]\npulses_per_kwh = 800\n[input]\nedge = \"both\"\n");
        assert_eq!((e.line, e.key.as_str()), (4, "input.edge"), "{e}");
        let e = err("[meter]\npulses_per_kwh = 800\n[input]\nbias = \"pullup\"\n");
        assert_eq!(e.key, "input.bias", "{e}");
        let e = err("[meter]\npulses_per_kwh = -1\n");
        assert_eq!(e.key, "meter.pulses_per_kwh", "{e}");
        let e = err("[meter]\npulses_per_kwh = 800\n[legacy]\nlisten = [\"nowhere\"]\n");
        assert_eq!((e.line, e.key.as_str()), (4, "legacy.listen"), "{e}");
    }

    #[test]
    fn syntax_error_has_a_position() {
        let e = err("[meter]\npulses_per_kwh = = 800\n");
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn range_checks() {
        let base = "[meter]\npulses_per_kwh = 800\n";
        for (extra, key) in [
            ("[input]\npin = 54\n", "input.pin"),
            ("[input]\nzero_after_s = 0\n", "input.zero_after_s"),
            ("[input]\ndebounce_ms = 600000\n", "input.debounce_ms"),
            (
                "[input]\nsource = \"sim\"\n[input.sim]\nwatts = 0.0\n",
                "input.sim.watts",
            ),
            (
                "[input]\nsource = \"gpio\"\n[input.sim]\nwatts = 5.0\n",
                "input.sim",
            ),
            ("[state]\nsave_interval_s = 0\n", "state.save_interval_s"),
            ("[state]\ndir = \"\"\n", "state.dir"),
            ("[http]\nlisten = [\"0.0.0.0:9001\"]\n", "http.listen"),
            (
                "[legacy]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n",
                "legacy.listen",
            ),
        ] {
            let e = err(&format!("{base}{extra}"));
            assert_eq!(e.key, key, "{e}");
            assert!(e.line > 2, "{e}");
        }
    }

    proptest::proptest! {
        /// Whatever the text, parsing returns a config or an error with a position inside it.
        #[test]
        fn any_text_is_parsed_or_located(text in "[\\[\\]a-z_.=\" 0-9\n-]{0,200}") {
            if let Err(e) = parse(Path::new("f.toml"), &text) {
                let lines = text.split('\n').count().max(1);
                proptest::prop_assert!(e.line >= 1 && e.line <= lines, "{e} for {text:?}");
                proptest::prop_assert!(e.column >= 1);
            }
        }
    }

    #[test]
    fn empty_listen_lists_disable() {
        let c = parse(
            Path::new("x"),
            "[meter]\npulses_per_kwh = 1\n[legacy]\nlisten = []\n[http]\nlisten = []\n",
        )
        .unwrap();
        assert!(c.legacy.listen.is_empty() && c.http.listen.is_empty());
    }
}
