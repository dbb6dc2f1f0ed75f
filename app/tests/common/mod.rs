//! Test harness: runs the real `powermeterd` binary on a simulated meter in a temp directory.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_powermeterd");
/// The MQTT publisher's binary.
pub const PUBLISHER_BIN: &str = env!("CARGO_BIN_EXE_powermeter-mqtt");

/// A `Command` for the daemon binary, through `POWERMETERD_TEST_RUNNER` when set (e.g.
/// `qemu-aarch64-static -L /usr/aarch64-linux-gnu` for a cross-built test run).
pub fn bin_command() -> Command {
    command_for(BIN)
}

/// A `Command` for the publisher binary, through `POWERMETERD_TEST_RUNNER` as above.
pub fn publisher_command() -> Command {
    command_for(PUBLISHER_BIN)
}

fn command_for(bin: &str) -> Command {
    match std::env::var("POWERMETERD_TEST_RUNNER") {
        Ok(r) if !r.trim().is_empty() => {
            let mut parts = r.split_whitespace();
            let mut c = Command::new(parts.next().unwrap_or_default());
            c.args(parts).arg(bin);
            c
        }
        _ => Command::new(bin),
    }
}

/// Hands `fds` to the child as systemd passes sockets: they become fds 3, 4, ... in order,
/// inheritable, with `LISTEN_FDS` and `LISTEN_FDNAMES` (the names) set. `LISTEN_PID` must be the
/// daemon's own pid, so `cmd` is the caller's `sh -c '... LISTEN_PID=$$ exec ...'` wrapper.
pub fn pass_fds(cmd: &mut Command, fds: &[(std::os::fd::RawFd, &str)]) {
    use std::os::unix::process::CommandExt;
    let names: Vec<&str> = fds.iter().map(|(_, n)| *n).collect();
    let fds: Vec<std::os::fd::RawFd> = fds.iter().map(|(fd, _)| *fd).collect();
    assert!(fds.len() <= 8, "pass_fds: at most 8 descriptors");
    cmd.env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"));
    // SAFETY: only fcntl and dup2 (async-signal-safe) between fork and exec, and no allocation.
    unsafe {
        cmd.pre_exec(move || {
            // first out of the way (above any target), then into place: a source may be 3 or 4
            let mut moved = [0; 8];
            for (i, fd) in fds.iter().enumerate() {
                moved[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 16);
                if moved[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, fd) in moved.iter().take(fds.len()).enumerate() {
                // dup2 leaves the new descriptor inheritable
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Where Debian puts the MQTT broker `mosquitto` (`/usr/sbin` is not always on a test's PATH).
pub fn mosquitto_bin() -> Option<PathBuf> {
    let fixed = PathBuf::from("/usr/sbin/mosquitto");
    if fixed.exists() {
        return Some(fixed);
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("mosquitto"))
            .find(|f| f.exists())
    })
}

/// A free TCP port on loopback (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A test set-up: a temp dir with a config file and a state dir.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub legacy: u16,
    pub http: u16,
}

impl Setup {
    /// `extra` is appended to `[meter]`/`[input]` defaults: pass whole tables.
    pub fn new(watts: f64, debounce_ms: u64, save_interval_s: u64) -> Self {
        let s = Self {
            dir: tempfile::tempdir().unwrap(),
            legacy: free_port(),
            http: free_port(),
        };
        s.write_config(800, watts, debounce_ms, save_interval_s);
        s
    }

    pub fn write_config(&self, ppk: u32, watts: f64, debounce_ms: u64, save_interval_s: u64) {
        let text = format!(
            "[meter]\npulses_per_kwh = {ppk}\n\n[input]\nsource = \"sim\"\ndebounce_ms = {debounce_ms}\n\n\
             [input.sim]\nwatts = {watts:?}\n\n[legacy]\nlisten = [\"127.0.0.1:{}\"]\n\n\
             [http]\nlisten = [\"127.0.0.1:{}\"]\n\n[state]\ndir = \"{}\"\nsave_interval_s = {save_interval_s}\n",
            self.legacy,
            self.http,
            self.state_dir().display()
        );
        std::fs::write(self.config(), text).unwrap();
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("powermeter.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn command(&self) -> Command {
        let mut c = bin_command();
        c.arg("--config").arg(self.config());
        c.env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("LISTEN_PID");
        c.env_remove("JOURNAL_STREAM");
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        c
    }

    /// Starts the daemon and waits until port 9001 and HTTP accept connections.
    pub fn start(&self) -> Daemon {
        self.start_with(self.command())
    }

    pub fn start_with(&self, mut cmd: Command) -> Daemon {
        let child = cmd.spawn().expect("spawn powermeterd");
        let d = Daemon {
            child,
            legacy: self.legacy,
            http: self.http,
        };
        d.wait_ready();
        d
    }

    /// The newest valid count on disk (parses the generations like an operator would).
    pub fn saved_count(&self) -> Option<u64> {
        let mut best: Option<(u64, u64)> = None;
        for name in ["counter.0", "counter.1"] {
            let Ok(text) = std::fs::read_to_string(self.state_dir().join(name)) else {
                continue;
            };
            let field = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            if let (Some(g), Some(p)) = (field("generation="), field("pulses_total="))
                && best.is_none_or(|(bg, _)| g > bg)
            {
                best = Some((g, p));
            }
        }
        best.map(|(_, p)| p)
    }
}

pub struct Daemon {
    pub child: Child,
    pub legacy: u16,
    pub http: u16,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.legacy)).is_ok()
                && TcpStream::connect(("127.0.0.1", self.http)).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("powermeterd did not listen on {}", self.legacy);
    }

    /// The raw bytes port 9001 sends.
    pub fn legacy_raw(&self) -> Vec<u8> {
        legacy_query(SocketAddr::from(([127, 0, 0, 1], self.legacy)))
    }

    pub fn count(&self) -> u64 {
        let raw = self.legacy_raw();
        String::from_utf8(raw).unwrap().parse().unwrap()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_request(
            self.http,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits for exit (bounded); returns the status and stderr.
    pub fn wait(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                self.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return (st, err);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("powermeterd did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        self.wait()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn legacy_query(addr: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

pub fn http_request(port: u16, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Runs `powermeterd` with `args` to completion: (exit code, stdout, stderr).
pub fn run_to_end(args: &[&str]) -> (i32, String, String) {
    output_of(bin_command().args(args))
}

/// Runs `powermeter-mqtt` with `args` to completion: (exit code, stdout, stderr).
pub fn run_publisher_to_end(args: &[&str]) -> (i32, String, String) {
    output_of(publisher_command().args(args))
}

fn output_of(c: &mut Command) -> (i32, String, String) {
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
