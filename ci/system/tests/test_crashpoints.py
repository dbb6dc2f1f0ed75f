"""Crash points of the state store on the appliance's own kernel and ext4 (scenario
state-crash-points, group guest-a, issue 18; cost measured in the README's State section).

In the booted qemu appliance: a 64 MiB ext4 made by the image's own `mke2fs -t ext4` options on
a loop device under the kernel's `dm-log-writes` target, mounted with /data's options
(`noatime,commit=30`), gets SAVES consecutive saves through the daemon's `state::Store`
(`app/examples/crashpoints.rs`, which marks the log after each save returned). The log is then
replayed entry by entry, and at every flush/FUA entry a throw-away dm snapshot of the replayed
disk is mounted (ext4 recovers its journal there) and the state loaded with `Store::open` (a
point with no write since the point before has the same disk: its loaded state is reused). At
every point the state must load, its count must be one that was saved (or the one being saved),
not lower than the save before the last completed one, and not lower than the last completed one
either (its save fsynced file and directory); never "all generations damaged".

Negative control, every run: the same with a deliberately broken store (the same files, renamed
into place without any fsync) must fail the checker, so the checker is shown to catch a lost save.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from powermeter_lab.layout import REPO

# qemu_x86: the tool is built for the host, so the guest must be x86-64 too
pytestmark = [pytest.mark.xdist_group("guest-a"), pytest.mark.qemu_x86]

SAVES = 50
CONTROL_SAVES = 10
TOOL = "/run/crashpoints"
WORK = "/data/crashpoints"
# the data partition's mount options (images/qemu/rootfs/overlay/etc/fstab) and mkfs options
# (image_data in images/common/lib.sh)
MOUNT_OPTS = "defaults,noatime,commit=30"
MKFS = "mke2fs -q -t ext4 -L data -E root_owner=0:0"

# one record-and-check cycle: $1 saves, $2 the saver's extra option; prints the saver's counts,
# then the checker's lines; exits with the checker's status
CYCLE = r"""
set -u
n=$1; mode=${2:-}
T=__TOOL__; W=__WORK__
cleanup() {
  umount /run/crashpoints-save 2>/dev/null; umount /run/crashpoints-mnt 2>/dev/null
  $T dm-remove crashpoints-snap 2>/dev/null; $T dm-remove crashpoints-log 2>/dev/null
  for f in data log replay cow; do
    for l in $(losetup -j "$W/$f.img" -O NAME -n 2>/dev/null); do losetup -d "$l"; done
  done
  rm -rf "$W"
}
trap cleanup EXIT
cleanup
modprobe dm-log-writes && modprobe dm-snapshot || exit 3
mkdir -p "$W" /run/crashpoints-save
truncate -s 64M "$W/data.img" "$W/replay.img"; truncate -s 128M "$W/log.img"; truncate -s 16M "$W/cow.img"
D=$(losetup -f --show "$W/data.img") && L=$(losetup -f --show "$W/log.img") || exit 3
dev=$($T dm-create crashpoints-log log-writes "$(blockdev --getsz "$D")" "$D $L") || exit 3
__MKFS__ "$dev" >&2 || exit 3
$T dm-message crashpoints-log "mark start" || exit 3
mount -o __OPTS__ "$dev" /run/crashpoints-save || exit 3
echo "saved: $($T saves /run/crashpoints-save/state "$n" crashpoints-log ${mode:+"$mode"} | tr '\n' ' ')"
umount /run/crashpoints-save && $T dm-remove crashpoints-log || exit 3
O=$(losetup -f --show "$W/replay.img") && C=$(losetup -f --show "$W/cow.img") || exit 3
$T check "$W/log.img" "$W/replay.img" "$O" "$C" start __OPTS__
"""


def _tool() -> str:
    """The example, built for the host (= the x86-64 guest: both glibc Debian). The debug
    profile: `cargo test` (ci/test) has built it already."""
    p = subprocess.run(["cargo", "build", "--locked", "-q", "-p", "powermeterd", "--example", "crashpoints"],
                       cwd=REPO, capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"cargo build --example crashpoints: {p.stderr[-500:]}"
    return str(REPO / "target" / "debug" / "examples" / "crashpoints")


def _cycle(guest, n: int, mode: str = "") -> tuple[int, str, str]:
    script = (CYCLE.replace("__TOOL__", TOOL).replace("__WORK__", WORK).replace("__MKFS__", MKFS)
              .replace("__OPTS__", MOUNT_OPTS))
    guest.sh(f"cat > /run/crashpoints-cycle <<'EOF'\n{script}\nEOF")
    return guest.run(f"sh /run/crashpoints-cycle {n} {mode}", timeout=900)


def _summary(out: str) -> re.Match | None:
    return re.search(r"^checked (\d+) crash points .*: (\d+) failed$", out, re.M)


def test_state_crash_points(guest, record_property, tmp_path):
    tool = tmp_path / "crashpoints"
    subprocess.run(["objcopy", "--strip-debug", _tool(), str(tool)], check=True)  # 36 -> ~4 MiB
    guest.push(tool, TOOL)
    guest.sh(f"chmod 755 {TOOL}")

    rc, out, err = _cycle(guest, SAVES)
    saved = re.search(r"^saved: (.*)$", out, re.M)
    assert saved, f"the saver printed nothing (exit {rc}): {err.strip()[-400:]}"
    counts = saved.group(1).split()
    assert len(counts) == SAVES, f"{len(counts)} of {SAVES} saves returned: {err.strip()[-400:]}"
    summary = _summary(out)
    assert summary, f"the checker gave no summary (exit {rc}): {err.strip()[-400:] or out[-400:]}"
    failed = [line for line in out.splitlines() if ": FAIL: " in line]
    assert rc == 0 and not failed, f"{len(failed)} crash points failed, first: {failed[:3]}"
    points = int(summary.group(1))
    assert points >= SAVES, f"only {points} crash points for {SAVES} saves: {summary.group(0)}"
    assert "all damaged" not in out, "a crash point loaded as all generations damaged"
    guest.log(summary.group(0))
    record_property("crash_points", summary.group(0))

    # the negative control: saves without fsync must be caught (a returned save lost)
    rc, out, err = _cycle(guest, CONTROL_SAVES, "--unsafe-no-fsync")
    summary = _summary(out)
    assert summary, f"the control's checker gave no summary (exit {rc}): {err.strip()[-400:] or out[-400:]}"
    assert rc == 1 and int(summary.group(2)) > 0, \
        f"the checker passed a store that never fsyncs (exit {rc}): {summary.group(0)}"
    first = next(line for line in out.splitlines() if ": FAIL: " in line)
    guest.log(f"control without fsync caught: {summary.group(0)}; e.g. {first}")
