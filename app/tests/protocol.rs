//! Port 9001 and HTTP against the real binary.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// 800 pulses/kWh at 225 kW: one pulse every 20 ms.
const FAST_W: f64 = 225_000.0;

#[test]
fn legacy_port_sends_bare_digits_then_closes() {
    let s = Setup::new(FAST_W, 0, 60);
    let d = s.start();
    let raw = d.legacy_raw();
    assert!(
        !raw.is_empty() && raw.iter().all(u8::is_ascii_digit),
        "{raw:?}"
    );
    // Whatever the client sends is ignored; the answer is the same shape.
    let mut c = TcpStream::connect(("127.0.0.1", d.legacy)).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\n\r\nhello\n").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    assert!(
        !out.is_empty() && out.iter().all(u8::is_ascii_digit),
        "{out:?}"
    );
    // The count grows with the simulated load.
    let a = d.count();
    wait_until("count to grow", Duration::from_secs(5), || d.count() > a);
    let (st, _) = d.stop();
    assert!(st.success());
}

#[test]
fn http_endpoints() {
    // One pulse every 200 ms: the power estimate is exact between pulses and only decays
    // (never rises) when the reader is late, e.g. under qemu-user.
    const LOAD_W: f64 = 22_500.0;
    let s = Setup::new(LOAD_W, 0, 60);
    let d = s.start();
    wait_until("two pulses", Duration::from_secs(5), || d.count() >= 2);
    let (code, body) = d.get("/metrics");
    assert_eq!(code, 200);
    for name in [
        "powermeter_pulses_total ",
        "powermeter_energy_kwh_total ",
        "powermeter_power_watts ",
        "powermeter_last_pulse_timestamp_seconds ",
        "powermeter_pulses_rejected_total{reason=\"debounce\"} ",
        "powermeter_state_saves_total ",
        "powermeter_state_save_failures_total ",
        "powermeter_state_saved_pulses ",
        "powermeter_build_info{",
    ] {
        assert!(body.contains(name), "{name} missing in\n{body}");
    }
    let power: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("powermeter_power_watts "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (LOAD_W / 3.0..=LOAD_W * 1.001).contains(&power),
        "power {power}"
    );
    assert_eq!(d.get("/health"), (200, "ok\n".to_owned()));
    let (code, json) = d.get("/api/v1/reading");
    assert_eq!(code, 200);
    assert!(
        json.starts_with("{\"pulses_total\":") && json.contains("\"input_armed\":true"),
        "{json}"
    );
    assert_eq!(d.get("/nope").0, 404);
    assert_eq!(http_request(d.http, "BLAH\r\n\r\n").0, 400);
    assert_eq!(
        http_request(d.http, "POST /metrics HTTP/1.1\r\n\r\n").0,
        405
    );
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let mut c = TcpStream::connect(("127.0.0.1", d.http)).unwrap();
    let _ = c.write_all(huge.as_bytes());
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    // oversized head: hyper answers 431 (Request Header Fields Too Large) and closes
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert!(d.stop().0.success());
}

#[test]
fn hostile_clients_do_not_stall_counting() {
    let s = Setup::new(FAST_W, 0, 60);
    let d = s.start();
    // Hold more idle HTTP connections than the server serves at once, and flood 9001
    // with a client that never stops sending.
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(("127.0.0.1", d.http)).unwrap())
        .collect();
    let legacy = d.legacy;
    let flooder = std::thread::spawn(move || {
        let mut c = TcpStream::connect(("127.0.0.1", legacy)).unwrap();
        let junk = vec![b'x'; 64 * 1024];
        let mut sent = 0usize;
        while sent < 8 * 1024 * 1024 {
            match c.write(&junk) {
                Ok(n) => sent += n,
                Err(_) => break, // the server dropped us: good
            }
        }
        sent
    });
    let a = d.count();
    wait_until("counting under load", Duration::from_secs(5), || {
        d.count() >= a + 5
    });
    let sent = flooder.join().unwrap();
    assert!(sent < 8 * 1024 * 1024, "the flooder was never cut off");
    drop(idle);
    // Once the idle clients are gone HTTP serves again.
    wait_until("http back", Duration::from_secs(10), || {
        d.get("/health").0 == 200
    });
    let (_, m) = d.get("/metrics");
    assert!(m.contains("powermeter_connections_dropped_total "), "{m}");
    assert!(d.stop().0.success());
}
