//! Exit codes and the last words of the two binaries (`powermeterd`, `powermeter-mqtt`):
//! 0 clean stop, 78 configuration error, 2 usage error, 1 any other fatal error, printed
//! with its cause chain.

use std::fmt::Display;
use std::process::ExitCode;

/// `EX_CONFIG` from sysexits.h: the unit files do not restart on it.
pub const EX_CONFIG: u8 = 78;
/// Usage errors.
pub const EX_USAGE: u8 = 2;

/// Prints `PROGRAM: configuration error: ERROR` and returns exit code 78.
pub fn config_error(program: &str, e: &dyn Display) -> ExitCode {
    eprintln!("{program}: configuration error: {e}");
    ExitCode::from(EX_CONFIG)
}

/// Logs the error with its whole chain, prints it and its causes on stderr, and returns 1.
pub fn fatal(program: &str, e: &anyhow::Error) -> ExitCode {
    tracing::error!(error = format!("{e:#}"), "fatal");
    eprintln!("{program}: error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    ExitCode::FAILURE
}
