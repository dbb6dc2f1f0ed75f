//! The MQTT publisher (`powermeter-mqtt`): reads the daemon's figures from its local
//! read-only reading socket and publishes them, with Home Assistant discovery, to a broker.
//!
//! It runs as its own process and unit (`powermeter-mqtt.service`) so that the counting
//! process keeps its no-network sandbox; the reading socket gives it no way to change the
//! count. `config` is the `[mqtt]` table, `discovery` the topics and payloads, `tls` the
//! rustls set-up (ring provider), `publisher` the connection loop.

pub mod config;
pub mod discovery;
pub mod publisher;
pub mod tls;
