"""verity-tamper: a slot whose bytes differ from its dm-verity tree never boots to powermeter.
Cost: ~45-90 s (a copy of the pristine disk and one boot of its own, in parallel with the
group's shared guest)."""

from __future__ import annotations

import re
import struct
import subprocess

import pytest

from powermeter_lab import disk as disks
from powermeter_lab.guest import wait_until
from powermeter_lab.layout import layout, qemu_build

pytestmark = [pytest.mark.xdist_group("guest-a"), pytest.mark.qemu_x86]


def test_verity_tamper(lab, new_guest):
    """Flip a byte of slot A in a copy of the disk: a block the kernel reads when it mounts the
    root (the squashfs id table, which GRUB does not read, so the kernel still loads). dm-verity
    must refuse it: the boot fails (restart-on-corruption) and powermeter never starts."""
    lay = layout()
    rootfs = qemu_build() / "rootfs.img"
    with open(rootfs, "rb") as f:
        f.seek(48)  # squashfs superblock: id_table_start
        (idx,) = struct.unpack("<Q", f.read(8))
        f.seek(idx)
        (blk,) = struct.unpack("<Q", f.read(8))
    assert blk > 0, "cannot read the squashfs id table"
    off = blk + 2
    # the untouched slot image verifies on the host
    roothash = (qemu_build() / "rootfs.roothash").read_text().strip()
    assert subprocess.run(["veritysetup", "verify", str(rootfs), str(rootfs), roothash,
                           f"--hash-offset={lay.verity_hash_offset}"], capture_output=True).returncode == 0, \
        "the untouched slot image does not verify"
    disk = disks.raw_copy(lab.pristine, lab.workdir / "tamper.img")
    old, new = disks.xor_byte(disk, lay.slot_a_offset + off)
    g = new_guest("tamper", disk)
    mark = g.console.mark()
    g.power_on()
    g.log(f"booting a copy with byte {off} of slot A flipped ({old:#04x} -> {new:#04x})")

    def restarted_after_corruption():
        text = g.console.since(mark)
        return re.search(r"verity.*corrupted", text) and text.count("powermeter: booting slot") >= 2

    found = wait_until(lambda: restarted_after_corruption() or not g.alive(), 420, every=5)
    g.power_cut()
    text = g.console.since(mark)
    assert not re.search(r"Started.*powermeter\.service|Reached target.*Multi-User", text), \
        f"the tampered slot booted to powermeter (see {g.serial_path})"
    assert found and restarted_after_corruption(), \
        f"no dm-verity corruption report followed by a restart (see {g.serial_path})"
    boots = text.count("powermeter: booting slot")
    first = next(line for line in text.splitlines() if "corrupted" in line)
    g.log(f"{first.strip()}; the machine restarted ({boots} boots seen), powermeter never started")
    disk.unlink()
