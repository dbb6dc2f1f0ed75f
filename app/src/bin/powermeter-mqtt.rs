//! `powermeter-mqtt`: the MQTT publisher's binary (`powermeter-mqtt.service`). It reads the
//! daemon's figures from the local reading socket and publishes them, with Home Assistant
//! discovery, to the broker of `[mqtt]`. A binary apart from `powermeterd` so that the
//! counting daemon links none of rumqttc, rustls and ring (its size and RSS stay its own).
//! Exit codes as `powermeterd`'s: 0, 78 configuration error, 2 usage error, 1 fatal.

use std::path::Path;
use std::process::ExitCode;

use powermeterd::cli::{self, PublisherCommand};
use powermeterd::mqtt::publisher;
use powermeterd::{config, exit, logging};

/// The name in messages.
const PROGRAM: &str = "powermeter-mqtt";

fn main() -> ExitCode {
    match cli::parse_publisher(std::env::args().skip(1)) {
        Ok(PublisherCommand::Help) => {
            println!("{}", cli::PUBLISHER_USAGE);
            ExitCode::SUCCESS
        }
        Ok(PublisherCommand::Version) => {
            println!("{PROGRAM} {}", powermeterd::VERSION);
            ExitCode::SUCCESS
        }
        Ok(PublisherCommand::Run { config }) => run(&config),
        Err(e) => {
            eprintln!("{PROGRAM}: {e}\n{}", cli::PUBLISHER_USAGE);
            ExitCode::from(exit::EX_USAGE)
        }
    }
}

/// No broker configured: one log line and exit 0, so the unit (which ships disabled) never
/// crash-loops when it is enabled without `[mqtt] broker`. A password file, CA file or
/// machine id that cannot be used is a configuration error (78).
fn run(config_path: &Path) -> ExitCode {
    let config = match config::load(config_path) {
        Ok(c) => c,
        Err(e) => return exit::config_error(PROGRAM, &e),
    };
    logging::init();
    let prepared = match publisher::prepare(&config.mqtt) {
        Ok(Some(p)) => p,
        Ok(None) => {
            tracing::info!(
                config = %config_path.display(),
                "MQTT is off: no [mqtt] broker in the configuration; the publisher exits"
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "MQTT configuration unusable");
            return exit::config_error(PROGRAM, &format!("{}: {e:#}", config_path.display()));
        }
    };
    match publisher::run(prepared) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit::fatal(PROGRAM, &e),
    }
}
