//! `powermeterd --watch-input`: the installer's wiring check prints every edge and a summary
//! and never touches the state directory.
mod common;

use common::*;

fn summary_numbers(line: &str) -> (u64, u64, u64, u64) {
    // "summary: E edges in S s: C counted, R rejected (debounce), L lost; ..."
    let num = |after: &str| -> u64 {
        let i = line
            .find(after)
            .unwrap_or_else(|| panic!("no {after:?} in {line}"));
        line[..i]
            .split_whitespace()
            .last()
            .unwrap()
            .trim_start_matches(':')
            .parse()
            .unwrap()
    };
    (
        num(" edges"),
        num(" counted"),
        num(" rejected"),
        num(" lost"),
    )
}

#[test]
fn watch_prints_every_edge_and_a_consistent_summary_without_touching_state() {
    // 225 kW at 800 pulses/kWh: a pulse every 20 ms; a 25 ms debounce rejects none of them
    let s = Setup::new(225_000.0, 5, 3600);
    let out = bin_command()
        .args(["--watch-input", "1.5", "--config"])
        .arg(s.config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("watching simulated meter"), "{text}");
    let summary = lines
        .iter()
        .find(|l| l.starts_with("summary:"))
        .expect("a summary line");
    let (edges, counted, rejected, lost) = summary_numbers(summary);
    let edge_lines = lines
        .iter()
        .filter(|l| l.contains(" s  ") && (l.contains("counted") || l.contains("rejected")))
        .count() as u64;
    assert!(edges >= 30, "only {edges} edges in 1.5 s at 50/s: {text}");
    assert_eq!(edge_lines, edges, "one line per edge: {text}");
    assert_eq!(counted + rejected, edges, "{summary}");
    assert_eq!((rejected, lost), (0, 0), "{summary}");
    assert!(summary.contains("(225000 W)"), "{summary}");
    assert!(
        !s.state_dir().exists(),
        "the watch created the state directory"
    );
}

#[cfg(feature = "gpio")]
#[test]
fn watch_of_a_missing_chip_fails_naming_it() {
    let s = Setup::new(225_000.0, 5, 3600);
    let chip = s.dir.path().join("no-such-gpiochip");
    let text = std::fs::read_to_string(s.config())
        .unwrap()
        .replace(
            "source = \"sim\"",
            &format!("source = \"gpio\"\nchip = \"{}\"", chip.display()),
        )
        .replace("[input.sim]\nwatts = 225000.0\n", "");
    std::fs::write(s.config(), text).unwrap();
    let out = bin_command()
        .args(["--watch-input", "1", "--config"])
        .arg(s.config())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&*chip.to_string_lossy()) && err.contains("27"),
        "{err}"
    );
    assert!(!s.state_dir().exists());
}
