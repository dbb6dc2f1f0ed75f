//! Load benchmark (prints figures; asserts nothing). `cargo bench -p powermeterd --bench load`
//!
//! - port-9001 queries/s and latency percentiles with 32 concurrent clients on loopback,
//! - HTTP `GET /metrics` requests/s and latency percentiles with as many clients,
//! - RSS of the daemon idle and under each load, CPU use while idle,
//! - CPU time of the daemon per 1 million simulated pulses, and of the counting core alone,
//! - with Debian's `mosquitto` installed: the MQTT publisher (`powermeter-mqtt`) publishing
//!   every second to a local broker for `BENCH_PUBLISHER_SECONDS` (default 30; 0 skips it;
//!   `BENCH_PUBLISHER` runs another publisher binary): its RSS,
//!   threads and CPU, and the daemon's RSS beside it (the daemon then serves the reading socket).
//!
//! Environment: `BENCH_SECONDS` (load duration, default 5), `BENCH_CLIENTS` (default 32),
//! `BENCH_CLIENT_MODE` (`tasks`, default: tokio tasks on `BENCH_CLIENT_THREADS` threads,
//! default 2; `threads`: one blocking OS thread per client). `BENCH_DAEMON` runs another
//! powermeterd binary (e.g. a cross build) and `BENCH_RUNNER` starts it through a command
//! (e.g. `qemu-arm-static -cpu arm1176 -L /usr/arm-linux-gnueabi`): RSS and CPU are then the
//! emulator's, figures to compare between targets under the same emulator, not a device's.

use std::io::Read;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use powermeterd::meter::{EnergyRegister, Meter, MeterSettings};

// the integration tests' harness: free ports, socket passing, the broker's path
#[path = "../tests/common/mod.rs"]
mod common;
use common::{free_port, mosquitto_bin, pass_fds};

const BIN: &str = env!("CARGO_BIN_EXE_powermeterd");
const PUBLISHER: &str = env!("CARGO_BIN_EXE_powermeter-mqtt");

struct Daemon {
    child: Child,
    port: u16,
    http: u16,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(watts: f64, debounce_ms: u64) -> Self {
        Self::start_with(watts, debounce_ms, None)
    }

    /// With `broker` (a port on loopback), the configuration gets an `[mqtt]` table for it and
    /// the daemon a reading socket, passed as systemd passes it (fd 3, `LISTEN_FDNAMES=reading`).
    fn start_with(watts: f64, debounce_ms: u64, broker: Option<u16>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let http = free_port();
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            format!(
                "[meter]\npulses_per_kwh = 800\n[input]\nsource = \"sim\"\ndebounce_ms = {debounce_ms}\n\
                 [input.sim]\nwatts = {watts:?}\n[legacy]\nlisten = [\"127.0.0.1:{port}\"]\n\
                 [http]\nlisten = [\"127.0.0.1:{http}\"]\n[state]\ndir = \"{}\"\nsave_interval_s = 60\n\
                 {}",
                dir.path().join("state").display(),
                broker.map_or(String::new(), |port| format!(
                    "[mqtt]\nbroker = \"127.0.0.1\"\nport = {port}\ndevice_id = \"bench\"\n\
                     publish_interval_s = 1\nreading_socket = \"{}\"\n",
                    dir.path().join("reading.sock").display()
                ))
            ),
        )
        .unwrap();
        let daemon = std::env::var("BENCH_DAEMON").unwrap_or_else(|_| BIN.into());
        let runner = std::env::var("BENCH_RUNNER").unwrap_or_default();
        let reading = broker.map(|_| {
            std::os::unix::net::UnixListener::bind(dir.path().join("reading.sock")).unwrap()
        });
        let mut cmd = Command::new("sh");
        // LISTEN_PID must be the daemon's own pid: the shell's, which exec keeps.
        cmd.arg("-c")
            .arg("[ -n \"$LISTEN_FDS\" ] && export LISTEN_PID=$$; exec $BENCH_RUNNER \"$0\" --config \"$1\"")
            .arg(&daemon)
            .arg(&config)
            .env("BENCH_RUNNER", runner)
            .env("POWERMETERD_LOG", "warn")
            .env_remove("LISTEN_FDS")
            .env_remove("NOTIFY_SOCKET")
            .stderr(Stdio::null());
        if let Some(listener) = &reading {
            use std::os::fd::AsRawFd;
            pass_fds(&mut cmd, &[(listener.as_raw_fd(), "reading")]);
        }
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err()
            || TcpStream::connect(("127.0.0.1", http)).is_err()
        {
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            port,
            http,
            dir,
        }
    }

    fn status_kib(&self, field: &str) -> u64 {
        status_kib(self.child.id(), field)
    }

    /// utime + stime in seconds.
    fn cpu_s(&self) -> f64 {
        cpu_s(self.child.id())
    }

    fn count(&self) -> u64 {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.parse().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/PID/status` field in KiB (or a count, e.g. `Threads:`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// utime + stime of PID in seconds.
fn cpu_s(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf is always safe to call.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The publisher phase: a broker on loopback, the daemon with its reading socket, and
/// `powermeter-mqtt` publishing every second. Prints the figures, or why it was skipped.
fn publisher_phase(seconds: u64) {
    if seconds == 0 {
        println!("MQTT publisher: skipped (BENCH_PUBLISHER_SECONDS=0)");
        return;
    }
    let Some(broker_bin) = mosquitto_bin() else {
        println!("MQTT publisher: skipped (no mosquitto; ci/setup installs it)");
        return;
    };
    let broker_dir = tempfile::tempdir().unwrap();
    let broker_port = free_port();
    let conf = broker_dir.path().join("mosquitto.conf");
    // as root, mosquitto would switch to its own user, which cannot read the temp dir
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root\n"
    } else {
        ""
    };
    std::fs::write(
        &conf,
        format!(
            "persistence false\nallow_anonymous true\nlistener {broker_port} 127.0.0.1\n{user}"
        ),
    )
    .unwrap();
    let mut broker = Command::new(broker_bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", broker_port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let d = Daemon::start_with(1500.0, 20, Some(broker_port));
    let config = d.dir.path().join("c.toml");
    let mut publisher =
        Command::new(std::env::var("BENCH_PUBLISHER").unwrap_or_else(|_| PUBLISHER.into()))
            .arg("--config")
            .arg(&config)
            .env("POWERMETERD_LOG", "warn")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
    let pid = publisher.id();
    std::thread::sleep(Duration::from_secs(2));
    let cpu0 = cpu_s(pid);
    std::thread::sleep(Duration::from_secs(seconds));
    let alive = publisher.try_wait().unwrap().is_none();
    if alive {
        let cpu = (cpu_s(pid) - cpu0) / seconds as f64 * 100.0;
        println!(
            "MQTT publisher ({}s, publishing every 1 s to a local mosquitto): RSS {} KiB \
             (anonymous {} KiB, file-backed {} KiB), {} thread(s), CPU {cpu:.2} % of one core",
            seconds + 2,
            status_kib(pid, "VmRSS:"),
            status_kib(pid, "RssAnon:"),
            status_kib(pid, "RssFile:"),
            status_kib(pid, "Threads:"),
        );
        println!(
            "  daemon beside it (serving the reading socket): RSS {} KiB (anonymous {} KiB, \
             file-backed {} KiB)",
            d.status_kib("VmRSS:"),
            d.status_kib("RssAnon:"),
            d.status_kib("RssFile:"),
        );
    } else {
        println!("MQTT publisher: exited early ({:?})", publisher.wait());
    }
    let _ = publisher.kill();
    let _ = publisher.wait();
    drop(d);
    let _ = broker.kill();
    let _ = broker.wait();
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Latencies (microseconds) and failed queries, of one client or all of them.
#[derive(Default)]
struct Samples {
    lat: Vec<u32>,
    errors: u64,
}

impl Samples {
    fn record(&mut self, started: Instant, answered: bool) {
        self.lat.push(started.elapsed().as_micros() as u32);
        self.errors += u64::from(!answered);
    }

    fn merge(&mut self, other: Samples) {
        self.lat.extend(other.lat);
        self.errors += other.errors;
    }
}

/// The request of the HTTP load.
const METRICS_REQUEST: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n";

/// One client on its own thread with blocking sockets; sends `request` (if not empty) on
/// each connection, reads the answer to the end.
fn blocking_client(port: u16, request: &'static [u8], stop_at: Instant) -> Samples {
    use std::io::Write;
    let mut samples = Samples::default();
    let mut buf = Vec::with_capacity(4096);
    while Instant::now() < stop_at {
        let t = Instant::now();
        buf.clear();
        let answered = TcpStream::connect(("127.0.0.1", port))
            .and_then(|mut s| {
                s.write_all(request)?;
                s.read_to_end(&mut buf)
            })
            .is_ok_and(|n| n > 0);
        samples.record(t, answered);
    }
    samples
}

/// `n` clients as tokio tasks on one current-thread runtime.
fn task_clients(n: usize, port: u16, request: &'static [u8], stop_at: Instant) -> Samples {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                tokio::spawn(async move {
                    let mut samples = Samples::default();
                    let mut buf = Vec::with_capacity(4096);
                    while Instant::now() < stop_at {
                        let t = Instant::now();
                        buf.clear();
                        let answered =
                            match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                                Ok(mut s) => {
                                    s.write_all(request).await.is_ok()
                                        && s.read_to_end(&mut buf).await.is_ok_and(|n| n > 0)
                                }
                                Err(_) => false,
                            };
                        samples.record(t, answered);
                    }
                    samples
                })
            })
            .collect();
        let mut all = Samples::default();
        for t in tasks {
            all.merge(t.await.unwrap());
        }
        all
    })
}

/// What one load phase measured.
struct Load {
    lat: Vec<u32>,
    errors: u64,
    elapsed: f64,
    server_cpu: f64,
    rss_max: u64,
    /// RssAnon and RssFile when RSS peaked.
    rss_split: (u64, u64),
}

impl Load {
    fn rate(&self) -> f64 {
        self.lat.len() as f64 / self.elapsed
    }

    fn pct(&self, p: f64) -> u32 {
        self.lat[((self.lat.len() as f64 * p) as usize).min(self.lat.len() - 1)]
    }

    fn print(&self, what: &str, clients: usize, mode: &str) {
        println!(
            "{what}, {clients} clients ({mode}), {:.1} s: {:.0} requests/s, {} errors",
            self.elapsed,
            self.rate(),
            self.errors
        );
        println!(
            "  latency: p50 {} us, p99 {} us, max {} us",
            self.pct(0.50),
            self.pct(0.99),
            self.lat[self.lat.len() - 1]
        );
        println!(
            "  daemon CPU under load: {:.0} % of one core, {:.2} ms per 1,000 requests; \
             RSS up to {} KiB (anonymous {} KiB, file-backed {} KiB)",
            self.server_cpu,
            self.server_cpu / 100.0 * self.elapsed / self.lat.len() as f64 * 1e6,
            self.rss_max,
            self.rss_split.0,
            self.rss_split.1
        );
    }
}

/// `clients` clients against `port` for `seconds`, each sending `request` per connection.
fn load(d: &Daemon, port: u16, request: &'static [u8], clients: usize, seconds: u64) -> Load {
    let cpu_load0 = d.cpu_s();
    let stop_at = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    // Two client kinds: `tasks` (default) runs the clients as tokio tasks on
    // `BENCH_CLIENT_THREADS` threads; `BENCH_CLIENT_MODE=threads` runs each client as an OS
    // thread with blocking sockets, to tell the client's cost from the server's.
    let mode = std::env::var("BENCH_CLIENT_MODE").unwrap_or_else(|_| "tasks".into());
    let client_threads = env_num("BENCH_CLIENT_THREADS", 2) as usize;
    let workers: Vec<std::thread::JoinHandle<Samples>> = if mode != "threads" {
        (0..client_threads)
            .map(|t| {
                let n = clients / client_threads + usize::from(t < clients % client_threads);
                std::thread::spawn(move || task_clients(n, port, request, stop_at))
            })
            .collect()
    } else {
        (0..clients)
            .map(|_| std::thread::spawn(move || blocking_client(port, request, stop_at)))
            .collect()
    };
    let (mut rss_max, mut rss_split) = (0, (0, 0));
    while Instant::now() < stop_at {
        let rss = d.status_kib("VmRSS:");
        if rss > rss_max {
            rss_max = rss;
            rss_split = (d.status_kib("RssAnon:"), d.status_kib("RssFile:"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut all = Samples::default();
    for w in workers {
        all.merge(w.join().unwrap());
    }
    let Samples { mut lat, errors } = all;
    let elapsed = started.elapsed().as_secs_f64();
    let server_cpu = (d.cpu_s() - cpu_load0) / elapsed * 100.0;
    lat.sort_unstable();
    Load {
        lat,
        errors,
        elapsed,
        server_cpu,
        rss_max,
        rss_split,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing useful.
    let seconds = env_num("BENCH_SECONDS", 5);
    let clients = env_num("BENCH_CLIENTS", 32) as usize;
    let mode = std::env::var("BENCH_CLIENT_MODE").unwrap_or_else(|_| "tasks".into());

    let d = Daemon::start(1500.0, 20);
    std::thread::sleep(Duration::from_secs(1));
    let cpu0 = d.cpu_s();
    let idle_for = Duration::from_secs(3);
    std::thread::sleep(idle_for);
    let idle_cpu = (d.cpu_s() - cpu0) / idle_for.as_secs_f64() * 100.0;
    let rss_idle = d.status_kib("VmRSS:");
    let idle_split = (d.status_kib("RssAnon:"), d.status_kib("RssFile:"));

    let legacy = load(&d, d.port, b"", clients, seconds);
    let http = load(&d, d.http, METRICS_REQUEST, clients, seconds);
    let hwm = d.status_kib("VmHWM:");
    drop(d);

    // CPU per million simulated pulses: a simulated load of 2e5 pulses/s, no debounce.
    let fast = Daemon::start(9.0e8, 0);
    std::thread::sleep(Duration::from_millis(500));
    let (c0, p0) = (fast.cpu_s(), fast.count());
    std::thread::sleep(Duration::from_secs(5));
    let (c1, p1) = (fast.cpu_s(), fast.count());
    drop(fast);
    let per_million = (c1 - c0) / ((p1 - p0) as f64 / 1e6);

    // The counting core alone.
    let mut m = Meter::new(
        MeterSettings {
            pulses_per_kwh: 800,
            debounce_ns: 20_000_000,
            zero_after_ns: 300_000_000_000,
        },
        0,
        EnergyRegister::default(),
    );
    let t = Instant::now();
    for i in 0..1_000_000u64 {
        std::hint::black_box(m.on_edge(std::hint::black_box(i * 25_000_000)));
    }
    let core_ms = t.elapsed().as_secs_f64() * 1e3;

    println!(
        "powermeterd load benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if let Ok(runner) = std::env::var("BENCH_RUNNER") {
        println!(
            "daemon: {} through `{runner}` (RSS and CPU include the emulator)",
            std::env::var("BENCH_DAEMON").unwrap_or_else(|_| BIN.into())
        );
    }
    legacy.print("port 9001", clients, &mode);
    http.print("HTTP GET /metrics", clients, &mode);
    println!(
        "RSS idle {rss_idle} KiB (anonymous {} KiB, file-backed {} KiB), under load {} KiB \
         (peak VmHWM {hwm} KiB)",
        idle_split.0,
        idle_split.1,
        legacy.rss_max.max(http.rss_max)
    );
    println!("idle CPU {idle_cpu:.2} % of one core (1500 W simulated, 1 pulse / 3 s)");
    println!(
        "daemon CPU per 1M simulated pulses: {per_million:.3} s ({} pulses in 5 s)",
        p1 - p0
    );
    println!("counting core alone: {core_ms:.1} ms per 1M edges");
    publisher_phase(env_num("BENCH_PUBLISHER_SECONDS", 30));
}
