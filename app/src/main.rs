//! `powermeterd`: the counting daemon's binary. Parses the command line, loads the
//! configuration, takes the sockets systemd passed, and runs the daemon. (The MQTT publisher
//! is the other binary, `bin/powermeter-mqtt.rs`.) Exit codes: 0 clean stop, 78 configuration
//! error, 2 usage error, 1 any other fatal error (with its cause chain).

use std::process::ExitCode;

use powermeterd::cli::{self, Command};
use powermeterd::config;
use powermeterd::daemon::{self, FAULT_ENV, Fault, Options};
use powermeterd::{exit, logging, systemd, watch};

/// The name in error messages.
const PROGRAM: &str = "powermeterd";

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("powermeterd: {e}\n{}", cli::USAGE);
            return ExitCode::from(exit::EX_USAGE);
        }
    };
    match command {
        Command::Help => {
            println!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("powermeterd {}", powermeterd::VERSION);
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match config::load(&config) {
            Ok(_) => {
                println!("{}: configuration OK", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::SetReading { config, kwh } => {
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            match daemon::set_reading(&cfg, kwh) {
                Ok((before, after)) => {
                    println!("energy register: {before:.3} kWh -> {after:.3} kWh");
                    ExitCode::SUCCESS
                }
                Err(e) => fatal(&e),
            }
        }
        Command::WatchInput { config, seconds } => {
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            let mut out = std::io::stdout().lock();
            match watch::run(&cfg, std::time::Duration::from_secs_f64(seconds), &mut out) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fatal(&e),
            }
        }
        Command::Run { config } => run(config),
    }
}

fn run(config_path: std::path::PathBuf) -> ExitCode {
    let config = match config::load(&config_path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let fault = match std::env::var(FAULT_ENV)
        .ok()
        .map(|v| Fault::parse(&v))
        .transpose()
    {
        Ok(f) => f,
        Err(e) => return fatal(&e),
    };
    // SAFETY: single-threaded so far: the runtime and the logger start below.
    let passed = match unsafe { systemd::take_passed_sockets() } {
        Ok(p) => p,
        Err(e) => return fatal(&e.into()),
    };
    let watchdog = systemd::watchdog_interval();
    logging::init();
    let opts = Options {
        config_path,
        config,
        passed,
        watchdog,
        fault,
    };
    match daemon::run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fatal(&e),
    }
}

fn config_error(e: &config::ConfigError) -> ExitCode {
    exit::config_error(PROGRAM, e)
}

fn fatal(e: &anyhow::Error) -> ExitCode {
    exit::fatal(PROGRAM, e)
}
