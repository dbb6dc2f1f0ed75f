//! The MQTT publisher (`powermeter-mqtt`) against a real broker: Debian's `mosquitto`,
//! started here on free loopback ports. The daemon runs with a reading socket passed the way
//! systemd passes it (`LISTEN_FDNAMES=reading`); the publisher reads it and publishes; a
//! rumqttc client subscribes and checks what Home Assistant would see.
//!
//! Every test that needs mosquitto prints why and passes when it is not installed
//! (`ci/setup` installs it, so CI runs them).

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Daemon, Setup, free_port, mosquitto_bin};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

/// The broker, or `None` with the reason printed (the test then passes as skipped).
fn need_mosquitto(test: &str) -> Option<PathBuf> {
    let b = mosquitto_bin();
    if b.is_none() {
        println!("SKIP {test}: mosquitto is not installed (ci/setup installs it)");
    }
    b
}

const USER: &str = "meter";
const PASSWORD: &str = "s3cret pass";

/// A mosquitto process on loopback. `plain` is a plain-MQTT listener (the test client's,
/// and the publisher's unless TLS is on); `tls` a TLS listener when TLS is set up.
struct Broker {
    bin: PathBuf,
    dir: PathBuf,
    plain: u16,
    tls: Option<u16>,
    child: Option<Child>,
}

impl Broker {
    /// `auth`: a password file with [`USER`]/[`PASSWORD`], no anonymous access. `tls_files`:
    /// (CA, certificate, key) for a TLS listener.
    fn start(
        bin: PathBuf,
        dir: &Path,
        auth: bool,
        tls_files: Option<(PathBuf, PathBuf, PathBuf)>,
    ) -> Self {
        let plain = free_port();
        let tls = tls_files.as_ref().map(|_| free_port());
        let mut conf = format!(
            "per_listener_settings false\npersistence false\nlog_dest stderr\n\
             log_type error\nlog_type warning\nlistener {plain} 127.0.0.1\n"
        );
        // As root, mosquitto would switch to the user `mosquitto`, which cannot read the
        // temp dir (0700); it ignores `user` when not started as root.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            conf += "user root\n";
        }
        if let (Some(port), Some((ca, cert, key))) = (tls, &tls_files) {
            conf += &format!(
                "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
                ca.display(),
                cert.display(),
                key.display()
            );
        }
        if auth {
            let pw = dir.join("passwd");
            let st = Command::new("mosquitto_passwd")
                .arg("-b")
                .arg("-c")
                .arg(&pw)
                .arg(USER)
                .arg(PASSWORD)
                .status()
                .expect("mosquitto_passwd");
            assert!(st.success());
            conf += &format!("allow_anonymous false\npassword_file {}\n", pw.display());
        } else {
            conf += "allow_anonymous true\n";
        }
        std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
        let mut b = Self {
            bin,
            dir: dir.to_owned(),
            plain,
            tls,
            child: None,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("mosquitto.log")).unwrap())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let ports: Vec<u16> = std::iter::once(self.plain).chain(self.tls).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ports
            .iter()
            .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
        {
            let log = std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "mosquitto is not listening:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A subscriber on the plain listener, subscribed to `topics`.
    fn subscribe(&self, auth: bool, topics: &[&str]) -> Sub {
        let mut o = MqttOptions::new(format!("test-{}", free_port()), "127.0.0.1", self.plain);
        o.set_keep_alive(Duration::from_secs(5));
        if auth {
            o.set_credentials(USER, PASSWORD);
        }
        let (client, conn) = Client::new(o, 64);
        for t in topics {
            client.subscribe(*t, QoS::AtLeastOnce).unwrap();
        }
        Sub { client, conn }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Sub {
    client: Client,
    conn: rumqttc::Connection,
}

/// A received publication: topic, payload, retain flag.
#[derive(Debug, Clone)]
struct Msg {
    topic: String,
    payload: String,
    retain: bool,
}

impl Sub {
    /// Waits up to `timeout` for a publication that `want` accepts; every one seen goes to
    /// `seen` as well.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        seen: &mut Vec<Msg>,
        mut want: impl FnMut(&Msg) -> bool,
    ) -> Msg {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.conn.recv_timeout(left.min(Duration::from_millis(500))) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let m = Msg {
                        topic: p.topic.clone(),
                        payload: String::from_utf8_lossy(&p.payload).into_owned(),
                        retain: p.retain,
                    };
                    seen.push(m.clone());
                    if want(&m) {
                        return m;
                    }
                }
                Ok(Ok(_)) | Err(_) => {}
                // The broker restarts in one test: keep polling, rumqttc reconnects.
                Ok(Err(_)) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        panic!("timed out waiting for {what}; seen: {seen:#?}");
    }
}

/// Starts the daemon with a reading socket passed as systemd would (fd 3, named `reading`).
fn start_daemon(s: &Setup) -> Daemon {
    let sock = s.dir.path().join("reading.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec ${POWERMETERD_TEST_RUNNER:-} \"$0\" --config \"$1\"")
        .arg(BIN)
        .arg(s.config())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    common::pass_fds(&mut cmd, &[(listener.as_raw_fd(), "reading")]);
    let d = s.start_with(cmd);
    drop(listener);
    d
}

/// Appends an `[mqtt]` table to the set-up's configuration.
fn add_mqtt(s: &Setup, body: &str) {
    let mut text = std::fs::read_to_string(s.config()).unwrap();
    text += &format!(
        "\n[mqtt]\nreading_socket = \"{}\"\ndevice_id = \"test{}\"\n{body}",
        s.dir.path().join("reading.sock").display(),
        s.legacy
    );
    std::fs::write(s.config(), text).unwrap();
}

/// The publisher process with its stderr piped.
struct Publisher {
    child: Child,
}

impl Publisher {
    fn start(s: &Setup) -> Self {
        let mut c = common::publisher_command();
        c.arg("--config")
            .arg(s.config())
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env("POWERMETERD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Self {
            child: c.spawn().expect("spawn powermeter-mqtt"),
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, then the exit code and stderr.
    fn stop(mut self) -> (Option<i32>, String) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "publisher did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (st.code(), err)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(m: &Msg) -> Value {
    serde_json::from_str(&m.payload)
        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", m.topic, m.payload))
}

/// 36 kW at 800 pulses/kWh: 8 pulses a second.
const WATTS: f64 = 36_000.0;

#[test]
fn plain_broker_discovery_state_birth_and_last_will() {
    let Some(bin) = need_mosquitto("plain_broker_discovery_state_birth_and_last_will") else {
        return;
    };
    let s = Setup::new(WATTS, 0, 3600);
    let broker = Broker::start(bin, s.dir.path(), false, None);
    add_mqtt(
        &s,
        &format!(
            "broker = \"127.0.0.1\"\nport = {}\npublish_interval_s = 1\nkeep_alive_s = 5\n\
             topic_prefix = \"pm/t1\"\ndiscovery_prefix = \"ha1\"\nconfiguration_url = \"http://pm.local:9002/\"\n",
            broker.plain
        ),
    );
    let _daemon = start_daemon(&s);
    let mut sub = broker.subscribe(false, &["pm/t1/#", "ha1/#"]);
    let mut publisher = Publisher::start(&s);
    let mut seen = Vec::new();
    let t = Duration::from_secs(15);

    // Discovery: three sensors on one device.
    let device_id = format!("test{}", s.legacy);
    for (object, class, state_class, unit) in [
        ("energy", Some("energy"), "total_increasing", Some("kWh")),
        ("power", Some("power"), "measurement", Some("W")),
        ("pulses", None, "total_increasing", None),
    ] {
        let topic = format!("ha1/sensor/powermeter_{device_id}/{object}/config");
        let m = sub.wait_for(&topic, t, &mut seen, |m| m.topic == topic);
        assert!(m.retain || seen.iter().filter(|x| x.topic == topic).count() == 1);
        let v = json(&m);
        assert_eq!(v["state_topic"], "pm/t1/state");
        assert_eq!(v["availability_topic"], "pm/t1/availability");
        assert_eq!(v["state_class"], state_class);
        assert_eq!(v["device_class"].as_str(), class);
        assert_eq!(v["unit_of_measurement"].as_str(), unit);
        assert!(v["unique_id"].as_str().unwrap().contains(&device_id));
        let dev = &v["device"];
        assert_eq!(dev["identifiers"][0], format!("powermeter_{device_id}"));
        assert_eq!(dev["sw_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(dev["configuration_url"], "http://pm.local:9002/");
        assert!(dev["name"].is_string() && dev["model"].is_string());
    }
    // Availability and a state with pulses.
    sub.wait_for("online", t, &mut seen, |m| {
        m.topic == "pm/t1/availability" && m.payload == "online"
    });
    // (power needs two pulses: the first state may hold one, with power 0, under qemu-user)
    let st = sub.wait_for("a state with pulses and power", t, &mut seen, |m| {
        m.topic == "pm/t1/state"
            && json(m)["pulses_total"].as_u64().unwrap_or(0) > 0
            && json(m)["power_w"].as_f64().unwrap_or(0.0) > 0.0
    });
    let v = json(&st);
    assert!(v["energy_kwh"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["power_w"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["last_pulse"].as_str().unwrap().ends_with('Z'), "{v}");

    // A second subscriber gets the retained state at once.
    let mut late = broker.subscribe(false, &["pm/t1/state"]);
    let r = late.wait_for("retained state", t, &mut Vec::new(), |m| {
        m.topic == "pm/t1/state"
    });
    assert!(r.retain, "state must be retained");

    // Home Assistant's birth message: discovery again (live, so not flagged retained).
    sub.client
        .publish("ha1/status", QoS::AtLeastOnce, false, "online")
        .unwrap();
    let energy_topic = format!("ha1/sensor/powermeter_{device_id}/energy/config");
    sub.wait_for("discovery after HA online", t, &mut seen, |m| {
        m.topic == energy_topic && !m.retain
    });

    // SIGKILL: the broker fires the last will (keep-alive 5 s: within 7.5 s).
    publisher.signal(libc::SIGKILL);
    let killed = Instant::now();
    sub.wait_for(
        "last will offline",
        Duration::from_secs(20),
        &mut seen,
        |m| m.topic == "pm/t1/availability" && m.payload == "offline",
    );
    println!("last will after {:.1} s", killed.elapsed().as_secs_f64());
    let st = publisher.child.wait().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
}

#[test]
fn broker_restart_and_daemon_restart_keep_the_total_monotonic() {
    let Some(bin) = need_mosquitto("broker_restart_and_daemon_restart_keep_the_total_monotonic")
    else {
        return;
    };
    let s = Setup::new(WATTS, 0, 3600);
    let mut broker = Broker::start(bin, s.dir.path(), false, None);
    add_mqtt(
        &s,
        &format!(
            "broker = \"127.0.0.1\"\nport = {}\npublish_interval_s = 1\ntopic_prefix = \"pm/t2\"\n",
            broker.plain
        ),
    );
    let daemon = start_daemon(&s);
    let publisher = Publisher::start(&s);
    let mut seen = Vec::new();
    let t = Duration::from_secs(20);
    let state = |m: &Msg| m.topic == "pm/t2/state";
    let pulses = |m: &Msg| json(m)["pulses_total"].as_u64().unwrap_or(0);

    let mut sub = broker.subscribe(false, &["pm/t2/#"]);
    let first = sub.wait_for("first state", t, &mut seen, |m| state(m) && pulses(m) > 0);
    let before_broker = pulses(&first);

    // The broker goes away and comes back: the publisher reconnects on its own.
    broker.kill();
    std::thread::sleep(Duration::from_secs(2));
    broker.spawn();
    let restarted = Instant::now();
    let mut sub = broker.subscribe(false, &["pm/t2/#"]);
    sub.wait_for(
        "a newer state after the broker restart",
        Duration::from_secs(40),
        &mut seen,
        |m| state(m) && !m.retain && pulses(m) > before_broker,
    );
    println!(
        "publishing again {:.1} s after the broker restart",
        restarted.elapsed().as_secs_f64()
    );

    // The daemon restarts (clean stop, saved state): the total continues from where it was.
    let (st, _) = daemon.stop();
    assert_eq!(st.code(), Some(0));
    sub.wait_for("offline while the daemon is down", t, &mut seen, |m| {
        m.topic == "pm/t2/availability" && m.payload == "offline"
    });
    let saved = s.saved_count().unwrap();
    let _daemon = start_daemon(&s);
    sub.wait_for("online again", t, &mut seen, |m| {
        m.topic == "pm/t2/availability" && m.payload == "online"
    });
    sub.wait_for("a state past the saved count", t, &mut seen, |m| {
        state(m) && pulses(m) > saved
    });

    let states: Vec<(u64, f64)> = seen
        .iter()
        .filter(|m| state(m))
        .map(|m| (pulses(m), json(m)["energy_kwh"].as_f64().unwrap()))
        .collect();
    // one state at least from each wait: the first, after the broker's and the daemon's restart
    assert!(states.len() >= 3, "{states:?}");
    for w in states.windows(2) {
        assert!(
            w[1].0 >= w[0].0 && w[1].1 >= w[0].1,
            "went backwards: {states:?}"
        );
    }
    let (code, err) = publisher.stop();
    assert_eq!(code, Some(0), "{err}");
}

/// A CA and a server certificate for 127.0.0.1 (openssl), in `dir` with `name` prefix.
fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |p: &PathBuf| p.display().to_string();
    let (ca_key, ca, key, csr, cert, ext) = (
        p("ca.key"),
        p("ca.pem"),
        p("server.key"),
        p("server.csr"),
        p("server.pem"),
        p("ext.cnf"),
    );
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={name} test CA"),
        "-keyout",
        &s(&ca_key),
        "-out",
        &s(&ca),
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&cert),
    ]);
    (ca, cert, key)
}

fn need_openssl(test: &str) -> bool {
    let ok = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("SKIP {test}: openssl is not installed");
    }
    ok
}

/// A setup with a broker that also listens with TLS, its certificate signed by a new CA
/// (returned); `None`, after a SKIP line, without mosquitto or openssl.
fn tls_setup(test: &str) -> Option<(Setup, Broker, PathBuf)> {
    let bin = need_mosquitto(test)?;
    if !need_openssl(test) {
        return None;
    }
    let s = Setup::new(WATTS, 0, 3600);
    let (ca, cert, key) = make_ca(s.dir.path(), "good");
    let broker = Broker::start(bin, s.dir.path(), true, Some((ca.clone(), cert, key)));
    Some((s, broker, ca))
}

#[test]
fn tls_with_password_file_publishes() {
    let Some((s, broker, ca)) = tls_setup("tls_with_password_file_publishes") else {
        return;
    };
    let pw = s.dir.path().join("mqtt-password");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    add_mqtt(
        &s,
        &format!(
            "broker = \"127.0.0.1\"\nport = {}\ntls = true\nca_file = \"{}\"\nusername = \"{USER}\"\n\
             password_file = \"{}\"\npublish_interval_s = 1\ntopic_prefix = \"pm/t3\"\n",
            broker.tls.unwrap(),
            ca.display(),
            pw.display()
        ),
    );
    let _daemon = start_daemon(&s);
    let mut sub = broker.subscribe(true, &["pm/t3/#"]);
    let publisher = Publisher::start(&s);
    let mut seen = Vec::new();
    sub.wait_for("state over TLS", Duration::from_secs(15), &mut seen, |m| {
        m.topic == "pm/t3/state" && json(m)["pulses_total"].as_u64().unwrap_or(0) > 0
    });
    let (code, err) = publisher.stop();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("connected to the MQTT broker"), "{err}");
    // A clean stop says offline itself (no last will on a clean disconnect).
    sub.wait_for("offline on stop", Duration::from_secs(10), &mut seen, |m| {
        m.topic == "pm/t3/availability" && m.payload == "offline"
    });
}

/// Wrong credentials and an untrusted certificate: one clear log line each, the publisher
/// keeps retrying (alive), and stops cleanly.
#[test]
fn bad_credentials_or_untrusted_certificate_log_once_and_retry() {
    let test = "bad_credentials_or_untrusted_certificate_log_once_and_retry";
    let Some((s, broker, _ca)) = tls_setup(test) else {
        return;
    };
    let (other_ca, _, _) = make_ca(s.dir.path(), "other");
    let base = std::fs::read_to_string(s.config()).unwrap();
    for (what, mqtt, expect) in [
        (
            "wrong password",
            format!(
                "port = {}\nusername = \"{USER}\"\npassword = \"wrong\"\n",
                broker.plain
            ),
            "refused the connection",
        ),
        (
            "untrusted certificate",
            format!(
                "port = {}\ntls = true\nca_file = \"{}\"\n",
                broker.tls.unwrap(),
                other_ca.display()
            ),
            "TLS",
        ),
    ] {
        std::fs::write(s.config(), &base).unwrap();
        add_mqtt(&s, &format!("broker = \"127.0.0.1\"\n{mqtt}"));
        let mut p = Publisher::start(&s);
        // Attempts at 0, 1, 3 and 7 s: four failures, one line.
        std::thread::sleep(Duration::from_secs(8));
        assert!(p.alive(), "{what}: the publisher must keep retrying");
        let (code, err) = p.stop();
        assert_eq!(code, Some(0), "{what}: {err}");
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("MQTT broker unreachable or refusing"))
            .collect();
        assert_eq!(lines.len(), 1, "{what}: one line expected:\n{err}");
        println!("{what}: {}", lines[0]);
        assert!(lines[0].contains(expect), "{what}: {}", lines[0]);
    }
}

#[test]
fn no_broker_configured_exits_0_with_one_line() {
    let s = Setup::new(WATTS, 0, 3600);
    let (code, _, err) = common::run_publisher_to_end(&["--config", s.config().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("MQTT is off"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn unreadable_password_file_is_a_configuration_error() {
    let s = Setup::new(WATTS, 0, 3600);
    add_mqtt(
        &s,
        "broker = \"127.0.0.1\"\nusername = \"u\"\npassword_file = \"/nonexistent/mqtt-password\"\n",
    );
    let (code, _, err) = common::run_publisher_to_end(&["--config", s.config().to_str().unwrap()]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("/nonexistent/mqtt-password"), "{err}");
}
