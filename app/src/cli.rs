//! The command lines: `powermeterd [--config FILE]`, `--check-config`, `--version`,
//! `--set-reading KWH`, `--watch-input SECONDS`; and the MQTT publisher's,
//! `powermeter-mqtt [--config FILE]`, `--version`.

use std::path::PathBuf;

use crate::config::DEFAULT_PATH;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// The configuration file.
        config: PathBuf,
    },
    /// Validate the configuration and exit.
    CheckConfig {
        /// The configuration file.
        config: PathBuf,
    },
    /// Set the energy register to the meter's reading (daemon stopped) and exit.
    SetReading {
        /// The configuration file (for the state directory).
        config: PathBuf,
        /// The meter's reading in kWh.
        kwh: f64,
    },
    /// Watch the configured input and print its edges (the wiring check) and exit.
    WatchInput {
        /// The configuration file (for the input and the meter settings).
        config: PathBuf,
        /// How long to watch, in seconds.
        seconds: f64,
    },
    /// Print the version.
    Version,
    /// Print the usage.
    Help,
}

/// Usage text.
pub const USAGE: &str = "\
usage: powermeterd [--config FILE]                 run the daemon
       powermeterd --check-config [--config FILE]  validate the configuration and exit
       powermeterd --set-reading KWH [--config FILE]
                                                   set the energy register to the meter's
                                                   display (stop the daemon first)
       powermeterd --watch-input SECONDS [--config FILE]
                                                   print every edge of the input for SECONDS,
                                                   then a summary (stop the daemon first)
       powermeterd --version
default config: /etc/powermeter/powermeter.toml";

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let mut config = None;
    let mut check = false;
    let mut version = false;
    let mut help = false;
    let mut reading = None;
    let mut watch = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--config" | "-c" => config = Some(PathBuf::from(value("--config")?)),
            "--check-config" => check = true,
            "--version" | "-V" => version = true,
            "--help" | "-h" => help = true,
            "--set-reading" => {
                let v = value("--set-reading")?;
                let kwh: f64 = v
                    .parse()
                    .map_err(|_| format!("--set-reading: {v:?} is not a number of kWh"))?;
                if !(kwh.is_finite() && kwh >= 0.0) {
                    return Err(format!("--set-reading: {v} must be a finite number >= 0"));
                }
                reading = Some(kwh);
            }
            "--watch-input" => {
                let v = value("--watch-input")?;
                let secs: f64 = v
                    .parse()
                    .map_err(|_| format!("--watch-input: {v:?} is not a number of seconds"))?;
                if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
                    return Err(format!(
                        "--watch-input: {v} must be > 0 and at most 86400 s"
                    ));
                }
                watch = Some(secs);
            }
            s if s.starts_with("--config=") => config = Some(PathBuf::from(&s[9..])),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let config = config.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    if watch.is_some() && (check || reading.is_some()) {
        return Err("--watch-input excludes --check-config and --set-reading".into());
    }
    Ok(match (help, version, check, reading) {
        (true, ..) => Command::Help,
        (_, true, ..) => Command::Version,
        _ if watch.is_some() => Command::WatchInput {
            config,
            seconds: watch.unwrap_or_default(),
        },
        (_, _, true, None) => Command::CheckConfig { config },
        (_, _, false, Some(kwh)) => Command::SetReading { config, kwh },
        (_, _, true, Some(_)) => {
            return Err("--check-config and --set-reading exclude each other".into());
        }
        (_, _, false, None) => Command::Run { config },
    })
}

/// What the MQTT publisher's command line (`powermeter-mqtt`) asks for. The publisher is a
/// binary of its own so that the counting daemon links no MQTT or TLS code.
#[derive(Debug, Clone, PartialEq)]
pub enum PublisherCommand {
    /// Run the publisher.
    Run {
        /// The configuration file (the daemon's; the publisher reads `[mqtt]` and `[http]`).
        config: PathBuf,
    },
    /// Print the version.
    Version,
    /// Print the usage.
    Help,
}

/// Usage text of `powermeter-mqtt`.
pub const PUBLISHER_USAGE: &str = "\
usage: powermeter-mqtt [--config FILE]   publish the daemon's reading to the MQTT broker of
                                         [mqtt], with Home Assistant discovery; it reads the
                                         daemon's local reading socket
       powermeter-mqtt --version
default config: /etc/powermeter/powermeter.toml";

/// Parses the publisher's arguments after the program name.
pub fn parse_publisher<I: IntoIterator<Item = String>>(
    args: I,
) -> Result<PublisherCommand, String> {
    let mut config = None;
    let mut version = false;
    let mut help = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                let v = args.next().ok_or("--config needs a value")?;
                config = Some(PathBuf::from(v));
            }
            "--version" | "-V" => version = true,
            "--help" | "-h" => help = true,
            s if s.starts_with("--config=") => config = Some(PathBuf::from(&s[9..])),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(if help {
        PublisherCommand::Help
    } else if version {
        PublisherCommand::Version
    } else {
        PublisherCommand::Run {
            config: config.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn forms() {
        assert_eq!(
            p(&[]),
            Ok(Command::Run {
                config: DEFAULT_PATH.into()
            })
        );
        assert_eq!(
            p(&["--config", "a.toml"]),
            Ok(Command::Run {
                config: "a.toml".into()
            })
        );
        assert_eq!(
            p(&["--config=a.toml"]),
            Ok(Command::Run {
                config: "a.toml".into()
            })
        );
        assert_eq!(
            p(&["--check-config", "--config", "b"]),
            Ok(Command::CheckConfig { config: "b".into() })
        );
        assert_eq!(p(&["--version"]), Ok(Command::Version));
        assert_eq!(
            p(&["--watch-input", "30", "-c", "x"]),
            Ok(Command::WatchInput {
                config: "x".into(),
                seconds: 30.0
            })
        );
        assert_eq!(
            p(&["--set-reading", "12.5"]),
            Ok(Command::SetReading {
                config: DEFAULT_PATH.into(),
                kwh: 12.5
            })
        );
    }

    #[test]
    fn errors() {
        assert!(p(&["--config"]).unwrap_err().contains("needs a value"));
        assert!(
            p(&["--frobnicate"])
                .unwrap_err()
                .contains("unknown argument")
        );
        assert!(p(&["--set-reading", "x"]).is_err());
        assert!(p(&["--set-reading", "-1"]).is_err());
        assert!(p(&["--set-reading", "1", "--check-config"]).is_err());
        assert!(p(&["--watch-input", "0"]).is_err());
        assert!(p(&["--watch-input", "x"]).is_err());
        assert!(p(&["--watch-input", "5", "--check-config"]).is_err());
        // the publisher is its own binary (powermeter-mqtt) since the daemon must not link it
        assert!(p(&["--mqtt"]).unwrap_err().contains("unknown argument"));
    }

    #[test]
    fn publisher_forms_and_errors() {
        let p = |args: &[&str]| parse_publisher(args.iter().map(|s| s.to_string()));
        assert_eq!(
            p(&[]),
            Ok(PublisherCommand::Run {
                config: DEFAULT_PATH.into()
            })
        );
        assert_eq!(
            p(&["-c", "m"]),
            Ok(PublisherCommand::Run { config: "m".into() })
        );
        assert_eq!(
            p(&["--config=m.toml"]),
            Ok(PublisherCommand::Run {
                config: "m.toml".into()
            })
        );
        assert_eq!(p(&["--version"]), Ok(PublisherCommand::Version));
        assert_eq!(p(&["--help", "--version"]), Ok(PublisherCommand::Help));
        assert!(p(&["--config"]).unwrap_err().contains("needs a value"));
        assert!(
            p(&["--check-config"])
                .unwrap_err()
                .contains("unknown argument")
        );
    }
}
