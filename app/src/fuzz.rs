//! Entry points for fuzzers: each takes arbitrary bytes, hands them to one parser that takes
//! input from outside the daemon, and panics when an invariant breaks. A panic is a finding.
//!
//! The coverage-guided driver is `app/fuzz/` (libFuzzer on stable Rust, `app/fuzz/run`); the
//! plain test suite replays its seeds and every past finding (`app/tests/fuzz_corpus.rs`).
//!
//! | target | what reaches the parser |
//! |---|---|
//! | [`http()`] | the bytes a client sends, through the whole HTTP server ([`crate::http::serve_connection`]) |
//! | [`config()`] | the text of the TOML configuration ([`crate::config::parse`]) |
//! | [`state_file`] | a state file `counter.N` ([`crate::state`]), with a correct checksum when the first byte is odd |
//! | [`set_reading`] | the value of `--set-reading` ([`crate::cli::parse`]) and its effect on the register |

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cli::{self, Command};
use crate::config;
use crate::meter::{EnergyRegister, Meter, MeterSettings};
use crate::shared::Shared;
use crate::state;

/// A fuzz target: takes any bytes, panics on a broken invariant.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, for drivers that take the name at run time.
pub const TARGETS: [(&str, Target); 4] = [
    ("http", http),
    ("config", config),
    ("state_file", state_file),
    ("set_reading", set_reading),
];

/// Time the server may take over one input whose sender has already shut its side: it must
/// not wait for its own timeouts then.
const HTTP_BOUND: Duration = Duration::from_secs(2);

fn meter() -> Meter {
    let settings = MeterSettings {
        pulses_per_kwh: 800,
        debounce_ns: 0,
        zero_after_ns: 300_000_000_000,
    };
    Meter::new(settings, 1234, EnergyRegister::default())
}

/// One connection to the HTTP server: `data` is sent, then the client shuts its sending side
/// and reads the answer. The answer is at most one well-formed HTTP/1.1 response.
pub fn http(data: &[u8]) {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
    }
    let out = RUNTIME.with(|rt| rt.block_on(exchange(data)));
    check_response(data, &out);
}

async fn exchange(data: &[u8]) -> Vec<u8> {
    let (mut client, server) = tokio::io::duplex(16 * 1024);
    let shared = Arc::new(Shared::new(meter()));
    let served = tokio::spawn(crate::http::serve_connection(server, shared, "fuzz"));
    let (mut reader, mut writer) = tokio::io::split(&mut client);
    let send = async {
        // the server may close before taking everything: not a finding
        let _ = writer.write_all(data).await;
        let _ = writer.shutdown().await;
    };
    let mut out = Vec::new();
    let receive = reader.read_to_end(&mut out);
    let both = async { tokio::join!(send, receive) };
    if tokio::time::timeout(HTTP_BOUND, both).await.is_err() {
        panic!("the server still held a half-closed connection after {HTTP_BOUND:?}");
    }
    let _ = served.await.expect("the connection task panicked");
    out
}

/// The invariants of the server's answer to `request`.
fn check_response(request: &[u8], out: &[u8]) {
    if out.is_empty() {
        return; // closed without an answer: incomplete head, or nothing sent
    }
    // Empty lines before the request line are skipped (RFC 9112 2.2), as hyper does.
    let start = request
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(request.len());
    let request = &request[start..];
    let text = std::str::from_utf8(out).expect("the answer is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("the answer has a head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    // hyper answers in the request's version: HTTP/1.0 or HTTP/1.1
    let http11 = status_line.starts_with("HTTP/1.1 ");
    let status: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, &str)> = lines
        .map(|l| {
            let (k, v) = l.split_once(": ").expect("a header line");
            (k.to_ascii_lowercase(), v)
        })
        .collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
    assert!(
        matches!(status, 200 | 400 | 404 | 405 | 414 | 431 | 503),
        "unexpected status {status}"
    );
    if http11 {
        assert_eq!(header("connection"), Some("close"), "{head}");
    }
    if matches!(status, 200 | 404 | 405 | 503) {
        // answered by the routes
        assert_eq!(header("cache-control"), Some("no-store"), "{head}");
    }
    if status == 405 {
        assert_eq!(header("allow"), Some("GET, HEAD"), "{head}");
    }
    if status == 200 {
        assert!(
            request.starts_with(b"GET ") || request.starts_with(b"HEAD "),
            "200 to a request that is not GET or HEAD"
        );
    }
    let length: usize = header("content-length")
        .map(|v| v.parse().expect("a numeric content-length"))
        .unwrap_or(0);
    let head_request = request.starts_with(b"HEAD ");
    if !head_request {
        assert_eq!(body.len(), length, "body length and content-length differ");
    } else {
        assert!(
            body.is_empty() || status >= 400,
            "a body in the answer to HEAD"
        );
    }
    assert!(
        !body.contains("HTTP/1."),
        "a second answer on a one-request connection"
    );
}

/// The configuration file: any text is either a valid configuration or an error that names
/// a place inside the text.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // `config::load` reads the file as UTF-8 and reports that itself
    };
    match config::parse(Path::new("fuzz.toml"), text) {
        Ok(c) => {
            let settings = c.meter_settings();
            assert!(settings.pulses_per_kwh > 0);
            let m = Meter::new(settings, u64::MAX, EnergyRegister::default());
            assert!(m.energy_kwh().is_finite());
        }
        Err(e) => {
            let lines = text.split('\n').count();
            assert!(e.line <= lines.max(1), "line {} of {lines}", e.line);
            let _ = e.to_string();
        }
    }
}

/// A state file. When the first byte is odd the rest gets a correct checksum appended, so
/// that the field parser behind the checksum is reached as well.
pub fn state_file(data: &[u8]) {
    let file = match data.split_first() {
        Some((first, body)) if first % 2 == 1 => state::with_checksum(body),
        _ => data.to_vec(),
    };
    let Ok((number, snapshot)) = state::decode_generation(&file) else {
        return;
    };
    let register = snapshot.register;
    assert!(
        register.base_kwh.is_finite() && register.base_kwh >= 0.0,
        "register {register:?} accepted"
    );
    // What was read is written back the same.
    let again = state::encode_generation(number, &snapshot, 0);
    assert_eq!(
        state::decode_generation(&again).ok(),
        Some((number, snapshot))
    );
}

/// The value of `--set-reading`: accepted only as a finite number of kWh >= 0, and the
/// register then shows it.
pub fn set_reading(data: &[u8]) {
    let value = String::from_utf8_lossy(data).into_owned();
    let args = ["--set-reading".to_owned(), value];
    match cli::parse(args) {
        Ok(Command::SetReading { kwh, .. }) => {
            assert!(kwh.is_finite() && kwh >= 0.0, "{kwh} accepted");
            let mut m = meter();
            m.set_reading(kwh);
            assert_eq!(m.energy_kwh(), kwh);
        }
        Ok(other) => panic!("--set-reading parsed as {other:?}"),
        Err(e) => assert!(e.starts_with("--set-reading"), "{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_inputs_pass() {
        http(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        http(b"HEAD /health HTTP/1.0\r\n\r\n");
        http(b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
        http(b"");
        config(b"[meter]\npulses_per_kwh = 1000\n");
        config(b"[meter]\npulses_per_kwh = 0\n");
        let file = state::encode_generation(
            3,
            &state::Snapshot {
                pulses_total: 9,
                register: EnergyRegister::default(),
            },
            1,
        );
        state_file(&[&[0u8][..], &file].concat());
        state_file(b"\x01powermeter-state 1\ngeneration=1\n");
        set_reading(b"12.5");
        set_reading(b"-1");
        set_reading(b"NaN");
    }
}
