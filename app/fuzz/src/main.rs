//! libFuzzer entry point for every target of `powermeterd::fuzz`, chosen by the environment
//! variable `POWERMETERD_FUZZ_TARGET` (one binary: one build and one link for all targets).
#![no_main]

use std::sync::OnceLock;

fn target() -> fn(&[u8]) {
    static TARGET: OnceLock<fn(&[u8])> = OnceLock::new();
    *TARGET.get_or_init(|| {
        let name = std::env::var("POWERMETERD_FUZZ_TARGET").unwrap_or_default();
        powermeterd::fuzz::TARGETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .unwrap_or_else(|| {
                let names: Vec<&str> = powermeterd::fuzz::TARGETS.iter().map(|t| t.0).collect();
                eprintln!("POWERMETERD_FUZZ_TARGET={name:?}: expected one of {names:?}");
                std::process::exit(2)
            })
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| target()(data));
