//! The fuzz targets of `powermeterd::fuzz` under the plain test suite: every seed and every
//! past finding of the coverage-guided fuzzer (`app/fuzz/run`) is replayed, and proptest
//! feeds each target mutations of its seeds (hostile, not coverage-guided: that is libFuzzer's
//! part).

use std::path::{Path, PathBuf};

use proptest::prelude::*;

use powermeterd::fuzz::TARGETS;

const FUZZ_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz");

/// The files of `app/fuzz/{seeds,regressions}/<target>/`.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["seeds", "regressions"] {
        let dir = Path::new(FUZZ_DIR).join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            out.push((path, bytes));
        }
    }
    out.sort();
    out
}

#[test]
fn every_seed_and_past_finding_passes() {
    for (name, target) in TARGETS {
        let files = inputs(name);
        assert!(!files.is_empty(), "no seeds for {name}");
        for (path, bytes) in files {
            eprintln!("{name}: {}", path.display());
            target(&bytes);
        }
    }
}

/// A seed of `target` with some bytes overwritten, inserted and cut.
fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds: Vec<Vec<u8>> = inputs(target).into_iter().map(|(_, b)| b).collect();
    (
        proptest::sample::select(seeds),
        proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 0..8),
    )
        .prop_map(|(mut bytes, edits)| {
            for (at, byte, kind) in edits {
                let i = usize::from(at) % (bytes.len() + 1);
                match kind {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ => bytes.truncate(i),
                }
            }
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn http_mutations(bytes in mutated("http")) {
        powermeterd::fuzz::http(&bytes);
    }

    #[test]
    fn config_mutations(bytes in mutated("config")) {
        powermeterd::fuzz::config(&bytes);
    }

    #[test]
    fn state_file_mutations(bytes in mutated("state_file")) {
        powermeterd::fuzz::state_file(&bytes);
    }

    #[test]
    fn set_reading_mutations(bytes in mutated("set_reading")) {
        powermeterd::fuzz::set_reading(&bytes);
    }
}
