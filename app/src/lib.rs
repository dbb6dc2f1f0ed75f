//! `powermeterd`: counts the pulses of an electricity meter's S0 or LED output and serves them.
//!
//! The crate is a library plus two thin binaries, `powermeterd` (`main.rs`, the counting
//! daemon) and `powermeter-mqtt` (`bin/powermeter-mqtt.rs`, the MQTT publisher, apart so that
//! the daemon links no MQTT or TLS code), so that the counting core, the
//! persistence and the protocol code can be tested and benchmarked without a process.
//! `ARCHITECTURE.md` at the top of the repository maps the modules.

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod exit;
pub mod fuzz;
pub mod http;
pub mod input;
pub mod legacy;
pub mod logging;
pub mod meter;
pub mod metrics;
pub mod mqtt;
pub mod reading;
pub mod shared;
pub mod state;
pub mod systemd;
pub mod watch;

/// The version of this build, as printed by `--version` and exported as build info.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
