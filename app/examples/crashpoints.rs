//! Crash-point test of the state store on a real kernel and file system (issue 18), the tool the
//! `state-crash-points` system scenario runs inside the appliance (`ci/system/tests/test_crashpoints.py`).
//!
//! The technique is the kernel's `dm-log-writes` target (Documentation/admin-guide/
//! device-mapper/log-writes.rst), as xfstests uses it: every write, flush and FUA that reaches
//! the data device is appended to a log device in the order it completed. Replaying a prefix
//! of the log that ends at a flush or FUA gives exactly what a disk may hold after a power cut
//! at that moment. The appliance has no `dmsetup`, so this tool talks to device-mapper through
//! its ioctl interface itself (`linux/dm-ioctl.h`), and xfstests' `replay-log` is not packaged,
//! so the log is parsed and replayed here.
//!
//! Subcommands (all need root):
//! - `dm-create NAME TARGET SECTORS PARAMS`: a one-target device-mapper device; prints its node.
//! - `dm-message NAME MESSAGE`, `dm-remove NAME`.
//! - `saves DIR N MARKDEV [--unsafe-no-fsync]`: N saves through `state::Store` (as the daemon
//!   does them), each followed, once `save` returned, by a log mark `saved-<count>` on the
//!   log-writes device MARKDEV; prints every saved count. `--unsafe-no-fsync` writes the same
//!   files without any fsync instead: a deliberately broken store, the negative control.
//! - `check LOG REPLAY ORIGIN COW START_MARK MOUNT_OPTS`: replays LOG into the file REPLAY
//!   (whose loop device is ORIGIN) entry by entry; at every flush/FUA entry after the mark
//!   START_MARK it puts a throw-away dm snapshot (COW device COW) over ORIGIN, mounts it as ext4
//!   with MOUNT_OPTS (the journal is recovered there), loads the state with `Store::open` from
//!   `state/` and checks the invariants against the marks seen so far (a point with no write
//!   since the point before has the same disk, so its loaded state is reused, not mounted
//!   again; the invariants are checked anew, marks may lie between). Prints one line per
//!   crash point, then `checked N crash points ...`; exits 1 when an invariant failed.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use powermeterd::meter::EnergyRegister;
use powermeterd::state::{StateError, Store};
use sha2::{Digest, Sha256};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = match a.as_slice() {
        ["dm-create", name, target, sectors, params] => sectors
            .parse()
            .context("SECTORS")
            .and_then(|s| dm::create(name, target, s, params))
            .map(|node| println!("{node}")),
        ["dm-message", name, msg] => dm::message(name, msg),
        ["dm-remove", name] => dm::remove(name),
        ["saves", dir, n, markdev, rest @ ..] => n
            .parse()
            .context("N")
            .and_then(|n| saves(Path::new(dir), n, markdev, rest == ["--unsafe-no-fsync"])),
        ["check", log, replay, origin, cow, mark, opts] => {
            return match check(Path::new(log), Path::new(replay), origin, cow, mark, opts) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("crashpoints: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        _ => {
            eprintln!(
                "usage: crashpoints dm-create NAME TARGET SECTORS PARAMS | dm-message NAME MSG | \
                 dm-remove NAME | saves DIR N MARKDEV [--unsafe-no-fsync] | \
                 check LOG REPLAY ORIGIN COW START_MARK MOUNT_OPTS"
            );
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crashpoints: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The count of save `i` (1-based): increasing, with gaps, so a wrong one is recognisable.
fn count_of(i: u64) -> u64 {
    1_000 + 7 * i
}

fn saves(dir: &Path, n: u64, markdev: &str, unsafe_no_fsync: bool) -> Result<()> {
    let register = EnergyRegister {
        base_kwh: 12.5,
        base_pulses: 0,
    };
    let mut store = if unsafe_no_fsync {
        fs::create_dir_all(dir)?;
        None
    } else {
        let loaded = Store::open(dir).context("Store::open")?;
        if loaded.snapshot.is_some() {
            bail!("{} already has state", dir.display());
        }
        Some(loaded.store)
    };
    let mut out = io::stdout().lock();
    for i in 1..=n {
        let count = count_of(i);
        let snapshot = powermeterd::state::Snapshot {
            pulses_total: count,
            register,
        };
        match store.as_mut() {
            Some(s) => s.save(snapshot, 1_763_836_800 + i).context("save")?,
            None => unsafe_save(dir, i, count, &register, 1_763_836_800 + i)?,
        }
        dm::message(markdev, &format!("mark saved-{count}"))?;
        writeln!(out, "{count}")?;
    }
    Ok(())
}

/// The negative control: the store's file format and rename, but no fsync at all.
fn unsafe_save(dir: &Path, number: u64, count: u64, r: &EnergyRegister, at: u64) -> Result<()> {
    let body = format!(
        "powermeter-state 1\ngeneration={number}\npulses_total={count}\nregister_base_kwh={}\n\
         register_base_pulses={}\nsaved_unix_s={at}\n",
        r.base_kwh, r.base_pulses
    );
    let sum: String = Sha256::digest(body.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let tmp = dir.join("counter.tmp");
    fs::write(&tmp, format!("{body}sha256={sum}\n"))?;
    fs::rename(&tmp, dir.join(format!("counter.{}", number % 2)))?;
    Ok(())
}

const LOG_MAGIC: u64 = 0x006a_7366_7773_6872;
const FLUSH: u64 = 1;
const FUA: u64 = 2;
const DISCARD: u64 = 4;
const MARK: u64 = 8;

/// One entry of a dm-log-writes log (`struct log_write_entry`).
struct Entry {
    sector: u64,
    nr_sectors: u64,
    flags: u64,
    /// The mark's name for a MARK entry.
    mark: Option<String>,
    /// The written data (empty for flushes, marks and discards).
    data: Vec<u8>,
}

struct Log {
    file: File,
    sectorsize: u64,
    entries: u64,
    next: u64,
}

impl Log {
    fn open(path: &Path) -> Result<Log> {
        let mut file = File::open(path).with_context(|| format!("open {}", path.display()))?;
        let mut sb = [0u8; 28];
        file.read_exact(&mut sb)?;
        let le = |i: usize| u64::from_le_bytes(sb[i..i + 8].try_into().unwrap());
        if le(0) != LOG_MAGIC {
            bail!(
                "{}: no dm-log-writes super block (magic {:#x})",
                path.display(),
                le(0)
            );
        }
        if le(8) != 1 {
            bail!(
                "{}: log version {} (this replayer knows 1)",
                path.display(),
                le(8)
            );
        }
        let sectorsize = u64::from(u32::from_le_bytes(sb[24..28].try_into().unwrap()));
        if !sectorsize.is_power_of_two() || sectorsize < 512 {
            bail!("{}: sector size {sectorsize}", path.display());
        }
        Ok(Log {
            file,
            sectorsize,
            entries: le(16),
            next: sectorsize,
        })
    }

    fn entry(&mut self) -> Result<Entry> {
        let ss = self.sectorsize;
        let mut head = vec![0u8; ss as usize];
        self.file.seek(SeekFrom::Start(self.next))?;
        self.file
            .read_exact(&mut head)
            .context("log ends before its last entry")?;
        let le = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap());
        let (sector, nr_sectors, flags, data_len) = (le(0), le(8), le(16), le(24));
        let mut e = Entry {
            sector,
            nr_sectors,
            flags,
            mark: None,
            data: Vec::new(),
        };
        self.next += ss;
        if flags & MARK != 0 {
            let len = (data_len as usize).min(ss as usize - 32);
            e.mark = Some(String::from_utf8_lossy(&head[32..32 + len]).into_owned());
        } else if flags & DISCARD == 0 && nr_sectors > 0 {
            e.data = vec![0u8; (nr_sectors * ss) as usize];
            self.file.read_exact(&mut e.data).context("log data")?;
            self.next += nr_sectors * ss;
        }
        Ok(e)
    }
}

/// The state found at one crash point.
#[derive(Clone)]
enum Found {
    Fresh,
    Count(u64),
    Error(String),
}

fn load(dev: &str, mnt: &Path, opts: &str) -> Result<Found> {
    mount(dev, mnt, opts)?;
    let found = match Store::open(&mnt.join("state")) {
        Ok(l) => match l.snapshot {
            Some(s) => Found::Count(s.pulses_total),
            None => Found::Fresh,
        },
        Err(e @ StateError::AllCorrupt { .. }) => Found::Error(format!("all damaged: {e}")),
        Err(e) => Found::Error(e.to_string()),
    };
    umount(mnt)?;
    Ok(found)
}

fn check(
    log: &Path,
    replay: &Path,
    origin: &str,
    cow: &str,
    start: &str,
    opts: &str,
) -> Result<bool> {
    let t0 = Instant::now();
    let mut log = Log::open(log)?;
    let out = OpenOptions::new()
        .write(true)
        .open(replay)
        .with_context(|| format!("open {}", replay.display()))?;
    let sectors = blockdev_sectors(origin)?;
    let mnt = PathBuf::from("/run/crashpoints-mnt");
    fs::create_dir_all(&mnt)?;
    let ss = log.sectorsize;
    let zeros = vec![0u8; 1 << 20];
    // `saved`: counts whose save had returned (marks), in order; `started`: after START_MARK
    let (mut saved, mut started, mut points, mut failures) = (Vec::<u64>::new(), false, 0u64, 0u64);
    let (mut fresh, mut lost_newest) = (0u64, 0u64);
    let mut seen = BTreeSet::new();
    // a point with no write since the one before has the same disk: its state is reused
    let (mut changed, mut prev, mut mounted) = (true, None::<Found>, 0u64);
    for index in 0..log.entries {
        let e = log.entry()?;
        if let Some(m) = &e.mark {
            if m == start {
                started = true;
            } else if let Some(c) = m.strip_prefix("saved-") {
                saved.push(c.parse().with_context(|| format!("mark {m:?}"))?);
            }
            continue;
        }
        if e.flags & DISCARD != 0 {
            let (mut off, end) = (e.sector * ss, (e.sector + e.nr_sectors) * ss);
            // a discard reads back as zeros here: a hole in the replay file, else written zeros
            // SAFETY: fallocate on an owned descriptor, no pointers.
            let punched = unsafe {
                libc::fallocate(
                    out.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    (end - off) as libc::off_t,
                )
            } == 0;
            if punched {
                off = end;
            }
            changed = true;
            while off < end {
                let n = (end - off).min(zeros.len() as u64);
                out.write_all_at(&zeros[..n as usize], off)?;
                off += n;
            }
        } else if !e.data.is_empty() {
            out.write_all_at(&e.data, e.sector * ss)?;
            changed = true;
        }
        if !started || e.flags & (FLUSH | FUA) == 0 {
            continue;
        }
        points += 1;
        let reused = prev.is_some() && !changed;
        let found = match (&prev, changed) {
            (Some(p), false) => p.clone(),
            _ => {
                let name = "crashpoints-snap";
                let node = dm::create(name, "snapshot", sectors, &format!("{origin} {cow} N 8"))?;
                let found = load(&node, &mnt, opts);
                dm::remove(name)?;
                mounted += 1;
                found?
            }
        };
        (prev, changed) = (Some(found.clone()), false);
        // every count offered so far: those whose save returned, and the one in progress
        let next = count_of(saved.len() as u64 + 1);
        let last = saved.last().copied();
        let before_last = saved.len().checked_sub(2).map(|i| saved[i]);
        let what = match &found {
            Found::Fresh => "no state (fresh)".to_string(),
            Found::Count(c) => format!("count {c}"),
            Found::Error(e) => format!("error: {e}"),
        } + if reused {
            " (no write since the point before)"
        } else {
            ""
        };
        let mut bad = Vec::new();
        match found {
            Found::Error(_) => bad.push("the state does not load".to_string()),
            Found::Fresh => {
                fresh += 1;
                if let Some(l) = last {
                    lost_newest += 1;
                    bad.push(format!("no state although save {l} had returned"));
                }
            }
            Found::Count(c) => {
                seen.insert(c);
                if !(saved.contains(&c) || c == next) {
                    bad.push(format!(
                        "{c} was never saved (saved so far {saved:?}, in progress {next})"
                    ));
                }
                if let Some(b) = before_last
                    && c < b
                {
                    bad.push(format!(
                        "{c} is lower than {b}, the save before the last completed one"
                    ));
                }
                if let Some(l) = last
                    && c < l
                {
                    lost_newest += 1;
                    bad.push(format!("{c} is lower than {l}, whose save (fsync of file and directory) had returned"));
                }
            }
        }
        let kind = match (e.flags & FLUSH != 0, e.flags & FUA != 0) {
            (true, true) => "flush+fua",
            (true, false) => "flush",
            _ => "fua",
        };
        let verdict = if bad.is_empty() { "ok" } else { "FAIL" };
        println!(
            "point {points} (log entry {index}, {kind}, {} saves returned): {what}: {verdict}{}",
            saved.len(),
            if bad.is_empty() {
                String::new()
            } else {
                format!(": {}", bad.join("; "))
            }
        );
        if !bad.is_empty() {
            failures += 1;
        }
    }
    if !started {
        bail!("the log has no mark {start:?}");
    }
    println!(
        "checked {points} crash points ({mounted} distinct disks mounted, {} log entries, {} saves, {} distinct counts loaded, \
         {fresh} with no state yet, {lost_newest} lost a returned save) in {:.1} s: {failures} failed",
        log.entries,
        saved.len(),
        seen.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(failures == 0 && points > 0)
}

fn blockdev_sectors(dev: &str) -> Result<u64> {
    let f = File::open(dev).with_context(|| format!("open {dev}"))?;
    let mut bytes: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    // SAFETY: the ioctl writes one u64 into `bytes`.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), 0x8008_1272, &mut bytes as *mut u64) };
    if rc != 0 {
        bail!("BLKGETSIZE64 {dev}: {}", io::Error::last_os_error());
    }
    Ok(bytes / 512)
}

fn mount(dev: &str, at: &Path, opts: &str) -> Result<()> {
    // the options as fstab has them: the flags the kernel takes as flags, the rest as data
    let mut flags: libc::c_ulong = 0;
    let mut data = Vec::new();
    for o in opts.split(',') {
        match o {
            "defaults" | "rw" => {}
            "noatime" => flags |= libc::MS_NOATIME,
            "nodev" => flags |= libc::MS_NODEV,
            "nosuid" => flags |= libc::MS_NOSUID,
            o => data.push(o),
        }
    }
    let c = |s: &str| CString::new(s).unwrap();
    let (src, dst, fstype, data) = (
        c(dev),
        c(at.to_str().unwrap()),
        c("ext4"),
        c(&data.join(",")),
    );
    // SAFETY: valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        bail!(
            "mount {dev} on {} ({opts}): {}",
            at.display(),
            io::Error::last_os_error()
        );
    }
    Ok(())
}

fn umount(at: &Path) -> Result<()> {
    let dst = CString::new(at.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount(dst.as_ptr()) } != 0 {
        bail!("umount {}: {}", at.display(), io::Error::last_os_error());
    }
    Ok(())
}

/// device-mapper through its ioctl interface (`linux/dm-ioctl.h`, version 4).
mod dm {
    use super::*;

    const STRUCT: usize = 312;
    const SPEC: usize = 40;
    const CREATE: u64 = 3;
    const REMOVE: u64 = 4;
    const SUSPEND: u64 = 6;
    const TABLE_LOAD: u64 = 9;
    const TARGET_MSG: u64 = 14;

    fn ioctl_nr(cmd: u64) -> u64 {
        // _IOWR(0xfd, cmd, struct dm_ioctl)
        (3 << 30) | ((STRUCT as u64) << 16) | (0xfd << 8) | cmd
    }

    /// A `struct dm_ioctl` named `name`, followed by `payload`.
    fn buffer(name: &str, payload: &[u8]) -> Result<Vec<u8>> {
        if name.len() >= 128 {
            bail!("device-mapper name too long: {name}");
        }
        let size = (STRUCT + payload.len() + 16 * 1024 + 7) & !7;
        let mut b = vec![0u8; size];
        for (i, v) in [4u32, 0, 0].iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b[12..16].copy_from_slice(&(size as u32).to_ne_bytes()); // data_size
        b[16..20].copy_from_slice(&(STRUCT as u32).to_ne_bytes()); // data_start
        b[48..48 + name.len()].copy_from_slice(name.as_bytes());
        b[STRUCT..STRUCT + payload.len()].copy_from_slice(payload);
        Ok(b)
    }

    fn call(cmd: u64, b: &mut [u8], what: &str) -> io::Result<()> {
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/mapper/control")?;
        // SAFETY: `b` is a dm_ioctl buffer of data_size bytes, owned for the call.
        let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), ioctl_nr(cmd) as _, b.as_mut_ptr()) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
        }
        Ok(())
    }

    fn set_count_flags(b: &mut [u8], targets: u32, flags: u32) {
        b[20..24].copy_from_slice(&targets.to_ne_bytes());
        b[28..32].copy_from_slice(&flags.to_ne_bytes());
    }

    /// Creates `name` with one target over `sectors` and resumes it; returns `/dev/dm-N`.
    pub fn create(name: &str, target: &str, sectors: u64, params: &str) -> Result<String> {
        let mut b = buffer(name, &[])?;
        call(CREATE, &mut b, &format!("create {name}"))?;
        let dev = u64::from_ne_bytes(b[40..48].try_into().unwrap());
        let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
        let r = (|| -> Result<()> {
            let mut spec = vec![0u8; SPEC];
            spec[8..16].copy_from_slice(&sectors.to_ne_bytes());
            spec[24..24 + target.len()].copy_from_slice(target.as_bytes());
            spec.extend_from_slice(params.as_bytes());
            spec.push(0);
            spec.resize((spec.len() + 7) & !7, 0);
            let next = spec.len() as u32;
            spec[20..24].copy_from_slice(&next.to_ne_bytes());
            let mut b = buffer(name, &spec)?;
            set_count_flags(&mut b, 1, 0);
            call(
                TABLE_LOAD,
                &mut b,
                &format!("load table {target} {params} into {name}"),
            )?;
            let mut b = buffer(name, &[])?;
            call(SUSPEND, &mut b, &format!("resume {name}"))?; // no DM_SUSPEND_FLAG: resume
            Ok(())
        })();
        if let Err(e) = r {
            let _ = remove(name);
            return Err(e);
        }
        let node = format!("/dev/dm-{minor}");
        let t = Instant::now();
        while !Path::new(&node).exists() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("{node} (devtmpfs) did not appear for {name}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(node)
    }

    /// Removes `name`, retrying while something (udev's probe) still holds it open.
    pub fn remove(name: &str) -> Result<()> {
        let t = Instant::now();
        loop {
            let mut b = buffer(name, &[])?;
            match call(REMOVE, &mut b, &format!("remove {name}")) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {
                    if t.elapsed() > Duration::from_secs(20) {
                        return Err(e.into());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends a target message (`struct dm_target_msg`: sector 0, then the text).
    pub fn message(name: &str, msg: &str) -> Result<()> {
        let mut payload = vec![0u8; 8];
        payload.extend_from_slice(msg.as_bytes());
        payload.push(0);
        let mut b = buffer(name, &payload)?;
        call(TARGET_MSG, &mut b, &format!("message {msg:?} to {name}"))?;
        Ok(())
    }
}
