//! The systemd protocols against real sockets: sd_notify datagrams (READY, STATUS,
//! WATCHDOG cadence, STOPPING, the stall case) and socket activation with passed fds.
mod common;

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Collects notify datagrams with their arrival time.
struct Notify {
    path: std::path::PathBuf,
    log: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Notify {
    fn new(dir: &std::path::Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => l.lock().unwrap().push((
                        Instant::now(),
                        String::from_utf8_lossy(&buf[..n]).into_owned(),
                    )),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return,
                }
            }
        });
        Self { path, log }
    }

    fn messages(&self) -> Vec<(Instant, String)> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, what: &str) -> usize {
        self.messages()
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == what))
            .count()
    }

    fn times(&self, what: &str) -> Vec<Instant> {
        self.messages()
            .into_iter()
            .filter(|(_, m)| m.lines().any(|l| l == what))
            .map(|(t, _)| t)
            .collect()
    }
}

/// Starts the daemon with a notify socket and a 0.4 s watchdog; returns once READY=1 came.
fn start_notified(s: &Setup) -> (Daemon, Notify) {
    let n = Notify::new(s.dir.path());
    let mut cmd = s.command();
    cmd.env("NOTIFY_SOCKET", &n.path)
        .env("WATCHDOG_USEC", "400000");
    let d = s.start_with(cmd);
    wait_until("READY=1", Duration::from_secs(5), || {
        n.count("READY=1") == 1
    });
    (d, n)
}

#[test]
fn ready_status_watchdog_and_stopping() {
    let s = Setup::new(225_000.0, 0, 3600);
    let (d, n) = start_notified(&s);
    // READY comes with a status line carrying the reading.
    let ready = n
        .messages()
        .into_iter()
        .find(|(_, m)| m.contains("READY=1"))
        .unwrap()
        .1;
    assert!(
        ready.contains("STATUS=") && ready.contains("pulses"),
        "{ready}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let pings = n.times("WATCHDOG=1");
    assert!(
        pings.len() >= 4,
        "only {} pings in 1.5 s at 0.4 s",
        pings.len()
    );
    for w in pings.windows(2) {
        assert!(
            w[1] - w[0] < Duration::from_millis(400),
            "gap {:?}",
            w[1] - w[0]
        );
    }
    let (st, _) = d.stop();
    assert!(st.success());
    wait_until("STOPPING=1", Duration::from_secs(2), || {
        n.count("STOPPING=1") == 1
    });
}

#[test]
fn a_stalled_input_task_stops_the_watchdog_pings() {
    let s = Setup::new(225_000.0, 0, 3600);
    let n = Notify::new(s.dir.path());
    let mut cmd = s.command();
    cmd.env("NOTIFY_SOCKET", &n.path)
        .env("WATCHDOG_USEC", "400000")
        .env("POWERMETERD_FAULT", "stall-input-after=1.5");
    let d = s.start_with(cmd);
    let start = Instant::now();
    wait_until("READY=1", Duration::from_secs(5), || {
        n.count("READY=1") == 1
    });
    std::thread::sleep(Duration::from_secs(4));
    let pings = n.times("WATCHDOG=1");
    assert!(
        pings
            .iter()
            .filter(|t| **t - start < Duration::from_millis(1400))
            .count()
            >= 2,
        "pings before the stall: {pings:?}"
    );
    let last = *pings.last().unwrap();
    assert!(
        last - start < Duration::from_millis(2300),
        "pinged {:?} after start, after the stall at 1.5 s",
        last - start
    );
    // The process itself is alive and still serves (the stall is in the input task only).
    assert!(!d.legacy_raw().is_empty());
    let msgs = n.messages();
    assert!(
        msgs.iter()
            .any(|(_, m)| m.contains("STATUS=stalled: input")),
        "{msgs:?}"
    );
    drop(d);
}

/// Runs the daemon with real passed listening sockets at fds 3 and 4, the way systemd does
/// (`LISTEN_PID` is set by a shell that then `exec`s the daemon, keeping its pid).
#[test]
fn socket_activation_uses_passed_sockets_instead_of_binding() {
    let s = Setup::new(225_000.0, 0, 3600);
    let legacy = TcpListener::bind("127.0.0.1:0").unwrap();
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let (lp, hp) = (
        legacy.local_addr().unwrap().port(),
        http.local_addr().unwrap().port(),
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec ${POWERMETERD_TEST_RUNNER:-} \"$0\" --config \"$1\"")
        .arg(BIN)
        .arg(s.config())
        .env_remove("NOTIFY_SOCKET")
        .stderr(std::process::Stdio::piped());
    // fd 3 = http, fd 4 = legacy (names in LISTEN_FDNAMES order)
    pass_fds(
        &mut cmd,
        &[(http.as_raw_fd(), "http"), (legacy.as_raw_fd(), "legacy")],
    );
    expect_passed_sockets_used(&s, cmd, lp, hp);
}

#[test]
fn a_passed_fd_that_is_not_a_listening_socket_is_refused() {
    let s = Setup::new(225_000.0, 0, 3600);
    let out = Command::new("sh")
        .arg("-c")
        .arg("LISTEN_PID=$$ exec ${POWERMETERD_TEST_RUNNER:-} \"$0\" --config \"$1\" 3</dev/null")
        .arg(BIN)
        .arg(s.config())
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "legacy")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a listening TCP stream socket"), "{err}");
}

/// The same through systemd's own `systemd-socket-activate` (from the systemd package),
/// which binds, sets `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` and execs the daemon.
#[test]
fn socket_activation_by_systemd_socket_activate() {
    let tool = "/usr/bin/systemd-socket-activate";
    assert!(
        std::path::Path::new(tool).exists(),
        "{tool} missing: install the systemd package (ci/setup does)"
    );
    let s = Setup::new(225_000.0, 0, 3600);
    let (lp, hp) = (free_port(), free_port());
    let mut cmd = Command::new(tool);
    cmd.arg(format!("--listen=127.0.0.1:{lp}"))
        .arg(format!("--listen=127.0.0.1:{hp}"))
        .arg("--fdname=legacy:http");
    match std::env::var("POWERMETERD_TEST_RUNNER") {
        Ok(r) if !r.trim().is_empty() => {
            cmd.args(r.split_whitespace()).arg(BIN);
        }
        _ => {
            cmd.arg(BIN);
        }
    }
    cmd.arg("--config")
        .arg(s.config())
        .env_remove("NOTIFY_SOCKET")
        .stderr(std::process::Stdio::piped());
    expect_passed_sockets_used(&s, cmd, lp, hp);
}

/// Runs `cmd` (which passes listening sockets on ports `lp`/`hp`) and checks that the daemon
/// serves on them, leaves the configured addresses unbound, and stops cleanly.
fn expect_passed_sockets_used(s: &Setup, mut cmd: Command, lp: u16, hp: u16) {
    let child = cmd.spawn().unwrap();
    let d = Daemon {
        child,
        legacy: lp,
        http: hp,
    };
    d.wait_ready();
    wait_until("http on the passed socket", Duration::from_secs(10), || {
        d.get("/health").0 == 200
    });
    assert!(d.legacy_raw().iter().all(u8::is_ascii_digit));
    assert!(std::net::TcpStream::connect(("127.0.0.1", s.legacy)).is_err());
    assert!(std::net::TcpStream::connect(("127.0.0.1", s.http)).is_err());
    let (st, err) = d.stop();
    assert!(st.success(), "{err}");
    assert!(err.contains("using socket passed by systemd"), "{err}");
}

/// A GPIO input that cannot be opened (here: a chip that does not exist) is not fatal: the
/// daemon comes up (READY=1), serves the saved count, reports the problem on /health (503, the
/// chip and line named) and in `powermeter_input_armed 0`, keeps the watchdog fed while it
/// retries, and logs the problem once, not once per retry.
#[cfg(feature = "gpio")]
#[test]
fn a_missing_gpio_chip_degrades_instead_of_exiting() {
    let s = Setup::new(225_000.0, 0, 3600);
    // a saved count first (sim input), then the same state with the GPIO input
    let d = s.start();
    wait_until("a counted pulse", Duration::from_secs(5), || d.count() > 0);
    let (st, _) = d.stop();
    assert!(st.success());
    let saved = s.saved_count().expect("a saved count");
    let chip = s.dir.path().join("gpiochip-that-is-not-there");
    let text = std::fs::read_to_string(s.config()).unwrap().replace(
        "source = \"sim\"",
        &format!("source = \"gpio\"\npin = 27\nchip = \"{}\"", chip.display()),
    );
    let text = text.replace("[input.sim]\nwatts = 225000.0\n", "");
    std::fs::write(s.config(), text).unwrap();

    let (d, n) = start_notified(&s);
    assert_eq!(d.count(), saved, "port 9001 serves the saved count");
    let (code, body) = d.get("/health");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("input not armed")
            && body.contains(&*chip.to_string_lossy())
            && body.contains("27"),
        "/health does not name the chip and line: {body}"
    );
    let (_, metrics) = d.get("/metrics");
    assert!(
        metrics.lines().any(|l| l == "powermeter_input_armed 0"),
        "{metrics}"
    );
    // several retries (every 2 s) later: still up, still pinging
    std::thread::sleep(Duration::from_millis(4500));
    let pings = n.times("WATCHDOG=1");
    let last = *pings.last().expect("watchdog pings");
    assert!(
        last.elapsed() < Duration::from_millis(600),
        "no watchdog ping for {:?} while the input is retried",
        last.elapsed()
    );
    assert_eq!(d.count(), saved);
    let (st, err) = d.stop();
    assert!(st.success(), "exit {st:?}: {err}");
    let problems = err
        .lines()
        .filter(|l| l.contains("input not armed"))
        .count();
    assert_eq!(
        problems, 1,
        "the problem is logged once, not per retry:\n{err}"
    );
    assert_eq!(s.saved_count(), Some(saved), "nothing was lost");
}
