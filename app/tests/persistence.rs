//! The counter survives stops, crashes and damaged state files.
mod common;

use std::time::Duration;

use common::*;

const FAST_W: f64 = 225_000.0; // one pulse every 20 ms at 800/kWh

#[test]
fn sigterm_saves_and_a_restart_continues() {
    let s = Setup::new(FAST_W, 0, 3600);
    let d = s.start();
    wait_until("pulses", Duration::from_secs(5), || d.count() >= 20);
    let before = d.count();
    let (st, err) = d.stop();
    assert!(st.success(), "{err}");
    let saved = s.saved_count().expect("saved on stop");
    assert!(saved >= before, "saved {saved} < seen {before}");
    let d = s.start();
    assert!(d.count() >= saved, "count went backwards");
    assert!(d.stop().0.success());
}

/// The gauge `powermeter_state_saved_pulses`: the count of the newest completed save.
fn saved_gauge(d: &Daemon) -> u64 {
    let (status, body) = d.get("/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix("powermeter_state_saved_pulses "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no powermeter_state_saved_pulses in\n{body}"))
}

#[test]
fn kill_9_loses_at_most_one_save_interval() {
    let s = Setup::new(FAST_W, 0, 1);
    let d = s.start();
    std::thread::sleep(Duration::from_millis(2500));
    let reported = saved_gauge(&d);
    let seen = d.count();
    d.signal(libc::SIGKILL);
    let _ = d.wait();
    let saved = s.saved_count().unwrap();
    // what /metrics reported as saved is on disk: the newest save is never below it
    assert!(
        reported > 0,
        "no save reported after 2.5 s at one save a second"
    );
    assert!(
        saved >= reported,
        "on disk {saved} < reported as saved {reported}"
    );
    // One save interval (1 s) is 50 pulses at this load; allow scheduling slack of 20 more.
    assert!(saved <= seen + 1, "saved {saved} > seen {seen}");
    assert!(
        seen - saved.min(seen) <= 70,
        "lost {} pulses",
        seen - saved.min(seen)
    );
    let d = s.start();
    assert!(d.count() >= saved);
    assert!(d.stop().0.success());
}

#[test]
fn damaged_newest_state_falls_back_and_is_reported() {
    let s = Setup::new(FAST_W, 0, 3600);
    let d = s.start();
    wait_until("pulses", Duration::from_secs(5), || d.count() >= 5);
    assert!(d.stop().0.success());
    let older = s.saved_count().unwrap();
    let d = s.start();
    wait_until("more pulses", Duration::from_secs(5), || {
        d.count() >= older + 5
    });
    assert!(d.stop().0.success());
    // Truncate the newest generation.
    let newest = ["counter.0", "counter.1"]
        .iter()
        .map(|n| s.state_dir().join(n))
        .max_by_key(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .nth(1)
                .unwrap()
                .to_owned()
        })
        .unwrap();
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() - 20]).unwrap();
    let d = s.start();
    let c = d.count();
    assert!(c >= older, "fell back below the older copy: {c} < {older}");
    let (st, err) = d.stop();
    assert!(st.success());
    assert!(err.contains("damaged state file"), "{err}");
    let mut aside = newest.into_os_string();
    aside.push(".corrupt");
    assert!(std::path::Path::new(&aside).exists());
}

#[test]
fn all_state_damaged_refuses_to_start() {
    let s = Setup::new(FAST_W, 0, 3600);
    std::fs::create_dir_all(s.state_dir()).unwrap();
    std::fs::write(
        s.state_dir().join("counter.0"),
        "powermeter-state 1\ngenera",
    )
    .unwrap();
    std::fs::write(s.state_dir().join("counter.1"), "").unwrap();
    let out = s.command().output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no valid state") && err.contains("counter.0"),
        "{err}"
    );
    assert!(
        err.contains("caused by") || err.contains("refusing"),
        "{err}"
    );
    // Nothing was overwritten.
    assert_eq!(std::fs::read(s.state_dir().join("counter.1")).unwrap(), b"");
}

#[test]
fn set_reading_moves_the_energy_register_not_the_count() {
    let s = Setup::new(1.0, 0, 3600); // a very slow load: no pulse during the test
    let config = s.config();
    let config = config.to_str().unwrap();
    let (code, out, err) = run_to_end(&["--set-reading", "12345.5", "--config", config]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("12345.500"), "{out}");
    let d = s.start();
    assert_eq!(d.count(), 0);
    let (_, json) = d.get("/api/v1/reading");
    assert!(json.contains("\"energy_kwh\":12345.5"), "{json}");
    // The daemon holds the state directory: a second writer is refused.
    let (code, _, err) = run_to_end(&["--set-reading", "1", "--config", config]);
    assert_eq!(code, 1);
    assert!(err.contains("in use"), "{err}");
    assert!(d.stop().0.success());
}

#[test]
fn sighup_reloads_meter_settings_and_survives_a_bad_config() {
    let s = Setup::new(FAST_W, 0, 3600);
    let d = s.start();
    s.write_config(1000, FAST_W, 0, 3600);
    d.signal(libc::SIGHUP);
    wait_until("reload", Duration::from_secs(5), || {
        d.get("/metrics")
            .1
            .contains("powermeter_pulses_per_kwh 1000\n")
    });
    std::fs::write(s.config(), "[meter]\npulses_per_kwh = 0\n").unwrap();
    d.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        d.get("/metrics")
            .1
            .contains("powermeter_pulses_per_kwh 1000\n")
    );
    let (st, err) = d.stop();
    assert!(st.success());
    assert!(err.contains("keeping the running one"), "{err}");
}
