//! Every configuration error exits 78 with one message naming file, line, column and key.
mod common;

use common::*;

fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let (code, _, err) = run_to_end(&["--check-config", "--config", path.to_str().unwrap()]);
    (code, err)
}

#[test]
fn valid_example_passes() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sim.toml");
    let (code, out, err) = run_to_end(&["--check-config", "--config", example]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration OK"));
}

#[test]
fn each_error_names_file_line_column_and_key() {
    let base = "[meter]\npulses_per_kwh = 800\n";
    let cases: &[(&str, &str, &str)] = &[
        (
            "[meter]\npulses_per_kwh = 0\n",
            ":2:18:",
            "meter.pulses_per_kwh",
        ),
        ("[meter]\n", ":1:1:", "meter.pulses_per_kwh"),
        ("", ":1:1:", "meter"),
        (
            "[meter]\npulses_per_kwh = 800\ncolour = 1\n",
            ":3:1:",
            "meter.colour",
        ),
        (
            "[meter]\npulses_per_kwh = 800\n[mqtt]\nport = 0\n",
            ":4:8:",
            "mqtt.port",
        ),
        ("[meter]\npulses_per_kwh = 800\n[mqttt]\n", ":3:", "mqttt"),
        (
            "[meter]\npulses_per_kwh = \"800\"\n",
            ":2:18:",
            "meter.pulses_per_kwh",
        ),
        (
            "[meter]\npulses_per_kwh = 800\n[input]\nsource = \"usb\"\n",
            ":4:10:",
            "input.source",
        ),
        (
            "[meter]\npulses_per_kwh = 800\n[input]\npin = 99\n",
            ":4:7:",
            "input.pin",
        ),
        (
            "[meter]\npulses_per_kwh = 800\n[input]\nedge = \"both\"\n",
            ":4:",
            "input.edge",
        ),
        (
            "[meter]\npulses_per_kwh = 800\n[input]\nbias = \"up\"\n",
            ":4:",
            "input.bias",
        ),
        (
            "[meter]\npulses_per_kwh = 800\n[input]\ndebounce_ms = -5\n",
            ":4:",
            "input.debounce_ms",
        ),
        (
            "[meter]\npulses_per_kwh = 800\n[input]\nzero_after_s = 0\n",
            ":4:",
            "input.zero_after_s",
        ),
        (
            "[meter]\npulses_per_kwh = 800\n[input]\nsource = \"sim\"\n[input.sim]\nwatts = -3.0\n",
            ":6:",
            "input.sim.watts",
        ),
        (
            "[meter]\npulses_per_kwh = 800\n[legacy]\nlisten = [\"x:1\"]\n",
            ":4:",
            "legacy.listen",
        ),
        (
            "[meter]\npulses_per_kwh = 800\n[http]\nlisten = \"127.0.0.1:1\"\n",
            ":4:",
            "http.listen",
        ),
        (
            "[meter]\npulses_per_kwh = 800\n[state]\nsave_interval_s = 0\n",
            ":4:",
            "state.save_interval_s",
        ),
        (
            "[meter]\npulses_per_kwh = 800\n[state]\ndir = 5\n",
            ":4:",
            "state.dir",
        ),
        ("[meter\npulses_per_kwh = 800\n", ":1:", ""),
    ];
    for (text, pos, key) in cases {
        let (code, err) = check(text);
        assert_eq!(code, 78, "{text:?}: {err}");
        assert!(err.contains("bad.toml"), "{text:?}: {err}");
        assert!(err.contains(pos), "{text:?}: expected {pos} in {err}");
        if !key.is_empty() {
            assert!(
                err.contains(&format!("key `{key}`")),
                "{text:?}: expected {key} in {err}"
            );
        }
        assert_eq!(err.trim_end().lines().count(), 1, "one message: {err}");
    }
    let _ = base;
}

#[test]
fn missing_file_is_a_config_error_and_run_mode_also_exits_78() {
    let (code, _, err) = run_to_end(&["--config", "/nonexistent/powermeter.toml"]);
    assert_eq!(code, 78);
    assert!(err.contains("/nonexistent/powermeter.toml"), "{err}");
}

#[test]
fn version_and_usage() {
    let (code, out, _) = run_to_end(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("powermeterd {}", env!("CARGO_PKG_VERSION"))
    );
    let (code, _, err) = run_to_end(&["--bogus"]);
    assert_eq!(code, 2);
    assert!(err.contains("usage:"));
}

/// An out-of-range pin is a configuration error; a chip that is missing is not (the input is
/// opened at run time and retried: `systemd.rs`, `a_missing_gpio_chip_degrades_instead_of_exiting`).
#[test]
fn a_bad_gpio_pin_is_a_config_error_a_missing_chip_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpio.toml");
    std::fs::write(
        &path,
        format!(
            "[meter]\npulses_per_kwh = 800\n[input]\nsource = \"gpio\"\npin = 63\nchip = \"/nonexistent/gpiochip9\"\n\
             [legacy]\nlisten = []\n[http]\nlisten = []\n[state]\ndir = \"{}\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    // pin 63 is out of range: a config error first.
    let (code, _, err) = run_to_end(&["--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "{err}");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("pin = 63", "pin = 27");
    std::fs::write(&path, text).unwrap();
    let (code, _, err) = run_to_end(&["--check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
}
