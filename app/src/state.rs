//! The persisted counter: two generations of a small text file with a SHA-256 checksum,
//! written atomically (temp file, fsync, rename, fsync of the directory).
//!
//! Files in the state directory:
//! - `counter.0`, `counter.1`: the generations; a save writes the older one, so a torn write
//!   can only ever damage the copy that is being replaced.
//! - `counter.tmp`: the file being written (renamed over a generation once complete).
//! - `counter.N.corrupt`: a generation found damaged at start, kept for inspection.
//! - `lock`: held (`flock`) by the running daemon, so two processes never share the directory.
//!
//! A generation looks like this; the checksum covers every byte before the `sha256=` line:
//! ```text
//! powermeter-state 1
//! generation=42
//! pulses_total=123456
//! register_base_kwh=0
//! register_base_pulses=0
//! saved_unix_s=1763836800
//! sha256=<64 hex digits>
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::meter::EnergyRegister;

const MAGIC: &str = "powermeter-state 1";
const GENERATIONS: [&str; 2] = ["counter.0", "counter.1"];
const TMP: &str = "counter.tmp";
const LOCK: &str = "lock";
/// Largest state file we read: a valid one is ~200 bytes.
const MAX_LEN: u64 = 4096;

/// What a generation records.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Lifetime pulse count.
    pub pulses_total: u64,
    /// The energy register.
    pub register: EnergyRegister,
}

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An I/O operation on a named file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another process holds the directory.
    #[error("{0} is in use by another powermeterd (its lock is held)")]
    Locked(PathBuf),
    /// Every generation present is damaged: refusing to start from zero.
    #[error(
        "no valid state in {dir}: {details}; refusing to start from 0 with damaged state present \
         (inspect the files; move them away to really start from 0, or restore a backup)"
    )]
    AllCorrupt {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with each file.
        details: String,
    },
    /// A save would make the counter go backwards.
    #[error("refusing to save {new} pulses over {old}: the counter never goes backwards")]
    Backwards {
        /// The count on disk.
        old: u64,
        /// The count offered.
        new: u64,
    },
}

/// Why a generation was not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// The file ends before its checksum line.
    #[error("truncated (no checksum line)")]
    Truncated,
    /// The checksum does not match the content.
    #[error("checksum mismatch")]
    Checksum,
    /// The content is not what this version writes.
    #[error("malformed: {0}")]
    Malformed(String),
    /// Larger than any valid state file.
    #[error("too large ({0} bytes)")]
    TooLarge(u64),
}

/// A generation that was read and verified.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Generation {
    number: u64,
    snapshot: Snapshot,
}

/// The outcome of opening the state directory.
#[derive(Debug)]
pub struct Loaded {
    /// The state store, locked for this process.
    pub store: Store,
    /// The newest valid snapshot, `None` for a fresh directory.
    pub snapshot: Option<Snapshot>,
    /// Files that were damaged, with the reason; they were renamed to `*.corrupt`.
    pub corrupt: Vec<(PathBuf, Corruption)>,
}

/// An open, locked state directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: File,
    last: Option<Generation>,
}

impl Store {
    /// Opens (creating if needed) and locks `dir`, and loads the newest valid generation.
    ///
    /// A damaged generation is reported in [`Loaded::corrupt`] and renamed aside when a valid
    /// one exists; when every present generation is damaged this fails with
    /// [`StateError::AllCorrupt`] and touches nothing.
    pub fn open(dir: &Path) -> Result<Loaded, StateError> {
        fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
        let lock = lock_dir(dir)?;
        let mut valid: Vec<Generation> = Vec::new();
        let mut corrupt = Vec::new();
        for name in GENERATIONS {
            let path = dir.join(name);
            match read_generation(&path) {
                Ok(Some(g)) => valid.push(g),
                Ok(None) => {}
                Err(ReadError::Io(e)) => return Err(io_err("read", &path, e)),
                Err(ReadError::Corrupt(c)) => corrupt.push((path, c)),
            }
        }
        let newest = valid.iter().copied().max_by_key(|g| g.number);
        if newest.is_none() && !corrupt.is_empty() {
            let details = corrupt
                .iter()
                .map(|(p, c)| format!("{}: {c}", p.display()))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(StateError::AllCorrupt {
                dir: dir.to_owned(),
                details,
            });
        }
        for (path, _) in &corrupt {
            let mut aside = path.clone().into_os_string();
            aside.push(".corrupt");
            fs::rename(path, &aside).map_err(|e| io_err("rename", path, e))?;
        }
        if !corrupt.is_empty() {
            sync_dir(dir)?;
        }
        Ok(Loaded {
            store: Store {
                dir: dir.to_owned(),
                _lock: lock,
                last: newest,
            },
            snapshot: newest.map(|g| g.snapshot),
            corrupt,
        })
    }

    /// Writes `snapshot` as the next generation: temp file, fsync, rename over the older
    /// generation, fsync of the directory. Refuses a count lower than the last saved one.
    pub fn save(&mut self, snapshot: Snapshot, saved_unix_s: u64) -> Result<(), StateError> {
        if let Some(last) = self.last
            && snapshot.pulses_total < last.snapshot.pulses_total
        {
            return Err(StateError::Backwards {
                old: last.snapshot.pulses_total,
                new: snapshot.pulses_total,
            });
        }
        let number = self.last.map_or(1, |g| g.number + 1);
        let target = self.dir.join(GENERATIONS[(number % 2) as usize]);
        let tmp = self.dir.join(TMP);
        let bytes = encode(number, &snapshot, saved_unix_s);
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)
                .map_err(|e| io_err("create", &tmp, e))?;
            f.write_all(&bytes).map_err(|e| io_err("write", &tmp, e))?;
            f.sync_all().map_err(|e| io_err("fsync", &tmp, e))?;
        }
        fs::rename(&tmp, &target).map_err(|e| io_err("rename", &tmp, e))?;
        sync_dir(&self.dir)?;
        self.last = Some(Generation { number, snapshot });
        Ok(())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> StateError {
    StateError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn lock_dir(dir: &Path) -> Result<File, StateError> {
    let path = dir.join(LOCK);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(|e| io_err("open", &path, e))?;
    // SAFETY: flock on a valid, owned file descriptor.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(StateError::Locked(dir.to_owned()));
        }
        return Err(io_err("lock", &path, e));
    }
    Ok(f)
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync", dir, e))
}

enum ReadError {
    Io(io::Error),
    Corrupt(Corruption),
}

fn read_generation(path: &Path) -> Result<Option<Generation>, ReadError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ReadError::Io(e)),
    };
    if bytes.len() as u64 > MAX_LEN {
        return Err(ReadError::Corrupt(Corruption::TooLarge(bytes.len() as u64)));
    }
    decode(&bytes).map(Some).map_err(ReadError::Corrupt)
}

fn encode(number: u64, s: &Snapshot, saved_unix_s: u64) -> Vec<u8> {
    let body = format!(
        "{MAGIC}\ngeneration={number}\npulses_total={}\nregister_base_kwh={}\n\
         register_base_pulses={}\nsaved_unix_s={saved_unix_s}\n",
        s.pulses_total, s.register.base_kwh, s.register.base_pulses
    );
    with_checksum(body.as_bytes())
}

/// `body` followed by its checksum line.
pub(crate) fn with_checksum(body: &[u8]) -> Vec<u8> {
    let sum = hex(&Sha256::digest(body));
    [body, b"sha256=", sum.as_bytes(), b"\n"].concat()
}

/// A generation's file (for the fuzzer).
pub(crate) fn encode_generation(number: u64, s: &Snapshot, saved_unix_s: u64) -> Vec<u8> {
    encode(number, s, saved_unix_s)
}

/// Decodes a generation's file into its number and snapshot (for the fuzzer).
pub(crate) fn decode_generation(bytes: &[u8]) -> Result<(u64, Snapshot), Corruption> {
    decode(bytes).map(|g| (g.number, g.snapshot))
}

fn decode(bytes: &[u8]) -> Result<Generation, Corruption> {
    let text = std::str::from_utf8(bytes).map_err(|_| Corruption::Malformed("not UTF-8".into()))?;
    let marker = text.rfind("sha256=").ok_or(Corruption::Truncated)?;
    let (body, tail) = text.split_at(marker);
    let sum = tail
        .strip_prefix("sha256=")
        .and_then(|t| t.strip_suffix('\n'))
        .ok_or(Corruption::Truncated)?;
    if sum.len() != 64 {
        return Err(Corruption::Truncated);
    }
    if hex(&Sha256::digest(body.as_bytes())) != sum {
        return Err(Corruption::Checksum);
    }
    let mut lines = body.lines();
    if lines.next() != Some(MAGIC) {
        return Err(Corruption::Malformed("unknown format header".into()));
    }
    let mut field = |name: &str| -> Result<&str, Corruption> {
        let line = lines
            .next()
            .ok_or_else(|| Corruption::Malformed(format!("missing {name}")))?;
        line.strip_prefix(name)
            .and_then(|l| l.strip_prefix('='))
            .ok_or_else(|| Corruption::Malformed(format!("expected {name}, found {line:?}")))
    };
    let bad = |name: &str| Corruption::Malformed(format!("bad value of {name}"));
    let number: u64 = field("generation")?
        .parse()
        .map_err(|_| bad("generation"))?;
    let pulses_total: u64 = field("pulses_total")?
        .parse()
        .map_err(|_| bad("pulses_total"))?;
    let base_kwh: f64 = field("register_base_kwh")?
        .parse()
        .map_err(|_| bad("register_base_kwh"))?;
    let base_pulses: u64 = field("register_base_pulses")?
        .parse()
        .map_err(|_| bad("register_base_pulses"))?;
    field("saved_unix_s")?
        .parse::<u64>()
        .map_err(|_| bad("saved_unix_s"))?;
    // The register is set from a meter's display (`--set-reading` takes only numbers >= 0):
    // a negative one was never written by us.
    if !(base_kwh.is_finite() && base_kwh >= 0.0) {
        return Err(bad("register_base_kwh"));
    }
    Ok(Generation {
        number,
        snapshot: Snapshot {
            pulses_total,
            register: EnergyRegister {
                base_kwh,
                base_pulses,
            },
        },
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(p: u64) -> Snapshot {
        Snapshot {
            pulses_total: p,
            register: EnergyRegister {
                base_kwh: 12.5,
                base_pulses: 3,
            },
        }
    }

    #[test]
    fn fresh_directory_then_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = Store::open(dir.path()).unwrap();
        assert!(loaded.snapshot.is_none() && loaded.corrupt.is_empty());
        let mut store = loaded.store;
        store.save(snap(10), 1).unwrap();
        store.save(snap(11), 2).unwrap();
        store.save(snap(12), 3).unwrap();
        drop(store);
        let loaded = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.snapshot, Some(snap(12)));
        assert!(dir.path().join("counter.0").exists() && dir.path().join("counter.1").exists());
        assert!(!dir.path().join("counter.tmp").exists());
    }

    #[test]
    fn a_second_process_cannot_open_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StateError::Locked(_))
        ));
    }

    #[test]
    fn never_saves_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap().store;
        store.save(snap(10), 1).unwrap();
        assert!(matches!(
            store.save(snap(9), 2),
            Err(StateError::Backwards { old: 10, new: 9 })
        ));
    }

    fn newest_file(dir: &Path) -> PathBuf {
        // After saves of generations 1 and 2, generation 2 lives in counter.0.
        dir.join("counter.0")
    }

    fn two_saves(dir: &Path) {
        let mut store = Store::open(dir).unwrap().store;
        store.save(snap(100), 1).unwrap();
        store.save(snap(200), 2).unwrap();
    }

    #[test]
    fn truncated_newest_falls_back_to_older_and_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        two_saves(dir.path());
        let f = newest_file(dir.path());
        let bytes = fs::read(&f).unwrap();
        fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
        let loaded = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.snapshot, Some(snap(100)));
        assert_eq!(loaded.corrupt.len(), 1);
        assert_eq!(loaded.corrupt[0].1, Corruption::Truncated);
        assert!(dir.path().join("counter.0.corrupt").exists());
        // The next save goes to the damaged slot's place with the next generation number.
        let mut store = loaded.store;
        store.save(snap(150), 3).unwrap();
        drop(store);
        assert_eq!(Store::open(dir.path()).unwrap().snapshot, Some(snap(150)));
    }

    #[test]
    fn flipped_bit_is_a_checksum_error() {
        let dir = tempfile::tempdir().unwrap();
        two_saves(dir.path());
        let f = newest_file(dir.path());
        let mut bytes = fs::read(&f).unwrap();
        let i = String::from_utf8_lossy(&bytes).find("=200").unwrap() + 1;
        bytes[i] = b'9';
        fs::write(&f, &bytes).unwrap();
        let loaded = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.snapshot, Some(snap(100)));
        assert_eq!(loaded.corrupt[0].1, Corruption::Checksum);
    }

    #[test]
    fn all_damaged_refuses_to_start_and_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        two_saves(dir.path());
        fs::write(dir.path().join("counter.0"), b"").unwrap();
        fs::write(dir.path().join("counter.1"), b"garbage\n").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StateError::AllCorrupt { .. }), "{msg}");
        assert!(
            msg.contains("counter.0") && msg.contains("counter.1"),
            "{msg}"
        );
        assert!(dir.path().join("counter.1").exists(), "nothing renamed");
    }

    #[test]
    fn oversized_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        two_saves(dir.path());
        fs::write(dir.path().join("counter.0"), vec![b'x'; 10_000]).unwrap();
        let loaded = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.corrupt[0].1, Corruption::TooLarge(10_000));
    }

    #[test]
    fn valid_checksum_but_wrong_layout_is_malformed() {
        let body = "powermeter-state 1\ngeneration=1\npulses=5\n";
        let sum = hex(&Sha256::digest(body.as_bytes()));
        let bytes = format!("{body}sha256={sum}\n");
        assert!(matches!(
            decode(bytes.as_bytes()),
            Err(Corruption::Malformed(_))
        ));
    }

    #[test]
    fn encode_decode_exact() {
        let bytes = encode(7, &snap(u64::MAX), 99);
        let g = decode(&bytes).unwrap();
        assert_eq!(g.number, 7);
        assert_eq!(g.snapshot, snap(u64::MAX));
    }
}
