//! `[mqtt]`: the broker, credentials, TLS, topics, interval and QoS. Off unless `broker` is
//! set. Checked by [`validate`] with the rest of the file (exit 78, file:line:column:key).

use std::path::PathBuf;

use serde::Deserialize;

/// Where the daemon's reading socket is, by default (`powermeter-reading.socket`).
pub const DEFAULT_READING_SOCKET: &str = "/run/powermeter/reading.sock";

/// `[mqtt]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// The broker's host name or address; `None` (the default) disables MQTT.
    pub broker: Option<String>,
    /// The broker's port: 1883, or 8883 with TLS, by default.
    pub port: Option<u16>,
    /// The MQTT client id; default `powermeter-<device id>`.
    pub client_id: Option<String>,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// Password (prefer `password_file`).
    pub password: Option<String>,
    /// A file whose first line is the password (e.g. `/data/etc/powermeter/mqtt-password`).
    pub password_file: Option<PathBuf>,
    /// TLS to the broker (server certificate verified against `ca_file`).
    pub tls: bool,
    /// The PEM file of the CA(s) that signed the broker's certificate; required with TLS.
    pub ca_file: Option<PathBuf>,
    /// The device id used in the topic prefix and discovery; default: a hash of
    /// `/etc/machine-id`.
    pub device_id: Option<String>,
    /// The device name shown in Home Assistant.
    pub device_name: String,
    /// Prefix of the state and availability topics; default `powermeter/<device id>`.
    pub topic_prefix: Option<String>,
    /// Home Assistant's discovery prefix.
    pub discovery_prefix: String,
    /// Seconds between two state publications (1 to 3600).
    pub publish_interval_s: u64,
    /// QoS of every publication and subscription (0, 1 or 2).
    pub qos: u8,
    /// Keep-alive towards the broker, seconds (5 to 3600); the last will fires after 1.5 x.
    pub keep_alive_s: u64,
    /// The daemon's reading socket.
    pub reading_socket: PathBuf,
    /// The `configuration_url` shown in Home Assistant (e.g. the device's HTTP address).
    pub configuration_url: Option<String>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            broker: None,
            port: None,
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            tls: false,
            ca_file: None,
            device_id: None,
            device_name: "Electricity meter".to_owned(),
            topic_prefix: None,
            discovery_prefix: "homeassistant".to_owned(),
            publish_interval_s: 10,
            qos: 1,
            keep_alive_s: 30,
            reading_socket: PathBuf::from(DEFAULT_READING_SOCKET),
            configuration_url: None,
        }
    }
}

impl MqttConfig {
    /// The broker port, with its default for plain or TLS.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 8883 } else { 1883 })
    }
}

/// A topic or topic prefix usable for publishing: not empty, no wildcards, no NUL, no
/// leading or trailing `/`, at most 200 bytes.
fn topic_problem(t: &str) -> Option<&'static str> {
    if t.is_empty() {
        Some("must not be empty")
    } else if t.len() > 200 {
        Some("must be at most 200 bytes")
    } else if t.contains(['+', '#', '\0']) {
        Some("must not contain the wildcards + or # (or NUL)")
    } else if t.starts_with('/') || t.ends_with('/') {
        Some("must not start or end with /")
    } else {
        None
    }
}

/// Range and consistency checks of `[mqtt]`. Returns the dotted key and the problem.
pub fn validate(m: &MqttConfig) -> Result<(), (String, String)> {
    let err = |k: &str, msg: &str| Err((format!("mqtt.{k}"), msg.to_owned()));
    if let Some(b) = &m.broker
        && (b.is_empty() || b.len() > 253 || b.contains(|c: char| c.is_whitespace() || c == '/'))
    {
        return err(
            "broker",
            "must be a host name or address (no spaces, no scheme, at most 253 bytes)",
        );
    }
    if m.port == Some(0) {
        return err("port", "must be from 1 to 65535");
    }
    if let Some(id) = &m.client_id
        && (id.is_empty() || id.len() > 128)
    {
        return err("client_id", "must be 1 to 128 bytes");
    }
    if let Some(u) = &m.username
        && (u.is_empty() || u.len() > 256)
    {
        return err("username", "must be 1 to 256 bytes");
    }
    if m.password.is_some() && m.password_file.is_some() {
        return err("password_file", "excludes mqtt.password: give one of them");
    }
    if m.password.is_some() && m.username.is_none() {
        return err("password", "needs mqtt.username");
    }
    if m.password_file.is_some() && m.username.is_none() {
        return err("password_file", "needs mqtt.username");
    }
    if m.password_file
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        return err("password_file", "must not be empty");
    }
    if m.ca_file.is_some() && !m.tls {
        return err("ca_file", "is only used with mqtt.tls = true");
    }
    if m.tls && m.ca_file.is_none() {
        return err(
            "tls",
            "needs mqtt.ca_file (the PEM file of the CA that signed the broker's certificate)",
        );
    }
    if let Some(id) = &m.device_id
        && (id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    {
        return err("device_id", "must be 1 to 64 characters of A-Z a-z 0-9 - _");
    }
    if m.device_name.trim().is_empty() || m.device_name.len() > 100 {
        return err("device_name", "must be 1 to 100 bytes, not blank");
    }
    if let Some(p) = &m.topic_prefix
        && let Some(why) = topic_problem(p)
    {
        return err("topic_prefix", why);
    }
    if let Some(why) = topic_problem(&m.discovery_prefix) {
        return err("discovery_prefix", why);
    }
    if !(1..=3600).contains(&m.publish_interval_s) {
        return err("publish_interval_s", "must be from 1 to 3600 seconds");
    }
    if m.qos > 2 {
        return err("qos", "must be 0, 1 or 2");
    }
    if !(5..=3600).contains(&m.keep_alive_s) {
        return err("keep_alive_s", "must be from 5 to 3600 seconds");
    }
    if m.reading_socket.as_os_str().is_empty() {
        return err("reading_socket", "must not be empty");
    }
    if let Some(u) = &m.configuration_url
        && !(u.starts_with("http://") || u.starts_with("https://"))
    {
        return err("configuration_url", "must start with http:// or https://");
    }
    Ok(())
}
