"""OTA scenarios: real signed RAUC bundles installed in the booted guest, reboots through GRUB's
A/B boot counting, rollbacks, a power cut while RAUC writes a slot.

Groups (one guest each, in parallel): `guest-b` has the refusals, the install, the corrupt
slot and the power cut; `ota-rollback-unhealthy` (three trial boots, the longest scenario) runs
on `guest-a` after the base scenarios. Costs on the 2-core machine (TCG, quiet, including
making each test bundle, ~70-110 s): ota-reject-unsigned ~60 s, ota-reject-tampered ~30 s,
ota-reject-incompatible ~60 s, ota-install ~280 s, ota-rollback-unhealthy ~600 s,
ota-rollback-corrupt ~300 s, ota-powercut ~290 s.
"""

from __future__ import annotations

import struct
import time

import pytest

from powermeter_lab import bundles
from powermeter_lab.guest import BOOT_TIMEOUT, wait_until
from powermeter_lab.layout import layout
from powermeter_lab.ota import dev

pytestmark = pytest.mark.qemu_x86  # the A/B state is read from GRUB's environment


@pytest.mark.xdist_group("guest-b")
def test_ota_reject_unsigned(ota):
    src = bundles.built().path
    # the bundle with its signature cut off (what an unsigned bundle looks like to RAUC)
    size = src.stat().st_size
    with open(src, "rb") as f:
        f.seek(size - 8)
        (sigsize,) = struct.unpack(">Q", f.read(8))
    unsigned = bundles.copy_truncated(src, bundles.cache() / "reject" / "unsigned.raucb", 8 + sigsize)
    ota.expect_refused(bundles.Bundle(unsigned), r"Invalid bundle format|[Ss]ignature")
    # and one signed by a CA the device does not know
    ota.expect_refused(bundles.foreign(), r"signature verification failed")


@pytest.mark.xdist_group("guest-b")
def test_ota_reject_tampered(ota):
    src = bundles.built().path
    out = bundles.copy_file(src, bundles.cache() / "reject" / "tampered.raucb")
    size = out.stat().st_size
    # one byte inside the payload (the slot image), not the signature
    pos = size // 3
    with open(out, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([(b + 1) % 256]))
    assert out.read_bytes() != src.read_bytes(), "could not tamper with the copy"
    ota.expect_refused(bundles.Bundle(out), r"failed between [0-9]+ and [0-9]+ bytes|Input/output error|corrupt")
    # a truncated download
    truncated = bundles.copy_truncated(src, bundles.cache() / "reject" / "truncated.raucb", 100000)
    ota.expect_refused(bundles.Bundle(truncated), r"Invalid bundle format|[Ss]ignature")


@pytest.mark.xdist_group("guest-b")
def test_ota_reject_incompatible(ota):
    ota.expect_refused(bundles.incompatible(), r"Compatible mismatch")


@pytest.mark.xdist_group("guest-b")
def test_ota_install(ota, guest):
    old, new, oldv = ota.current()
    newv = f"{bundles.base_version()}+ota1"
    if newv == oldv:
        newv += ".1"
    b = bundles.make(newv)
    # a counter that has counted something
    c1 = wait_until(lambda: ota.count(), 60, every=3)
    assert c1 > 0, f"the counter does not count (port 9001 says '{c1}')"
    ota.install(b)
    e = ota.env()
    assert e.get("ORDER", "").split()[:1] == [new], f"after install ORDER='{e.get('ORDER')}', expected {new} first"
    assert e.get(f"{new}_ROOTHASH") == b.roothash, f"{new}_ROOTHASH is not the bundle's root hash"
    assert ota.slot_is(new, "1", "0"), f"slot {new} not armed: {e}"
    guest.reboot()
    ota.wait_good(new, BOOT_TIMEOUT)
    assert ota.version() == newv, f"version is '{ota.version()}', expected '{newv}'"
    c2 = ota.count()
    assert c2 >= c1, f"counter went back from {c1} to {c2} over the update"
    assert ota.slot_is(new, "1", "0"), f"slot {new} not marked good: {ota.env()}"
    guest.log(f"slot {old} ({oldv}) -> {new} ({newv}); counter {c1} -> {c2}")


@pytest.mark.xdist_group("guest-a")
def test_ota_rollback_unhealthy(ota, guest):
    old, new, oldv = ota.current()
    b = bundles.make(f"{bundles.base_version()}+unhealthy", "unhealthy")
    ota.install(b)
    # 3 trial boots of the new slot (each: boot + up to 60 s waiting for /health), then the old
    # one: four boots (a CI run once needed ~870 s for them under TCG)
    ota.expect_rollback(old, oldv, new, 4 * BOOT_TIMEOUT, "failed")
    n = int(guest.run(f"journalctl -u powermeter-mark-good.service --no-pager -o cat | "
                      f"grep -c 'slot {new} is NOT marked good'")[1] or 0)
    assert n >= 1, f"no failed trial of slot {new} in the journal"
    guest.sh("rauc status mark-good booted >/dev/null")  # harmless; confirms RAUC is usable
    guest.log(f"slot {new} failed {n} trial boot(s) in the journal; back on {old} ({oldv})")


@pytest.mark.xdist_group("guest-b")
def test_ota_rollback_corrupt(ota, guest):
    old, new, oldv = ota.current()
    b = bundles.make(f"{bundles.base_version()}+corrupt")
    ota.install(b)
    # Corrupt 4 bytes of the slot's first block (the squashfs superblock's mkfs time: neither
    # GRUB nor the kernel's squashfs cares, only dm-verity notices). Then check that dm-verity
    # indeed refuses the slot.
    d = dev(new)
    guest.sh(f"printf '\\336\\255\\276\\357' | dd of={d} bs=1 seek=8 conv=notrunc,fsync status=none")
    assert not guest.ok(f"veritysetup verify {d} {d} {b.roothash} --hash-offset={layout().verity_hash_offset}"), \
        "the corrupted slot still verifies"
    ota.expect_rollback(old, oldv, new, 2 * BOOT_TIMEOUT, "corrupt")
    guest.log(f"corrupt slot {new} refused by dm-verity; back on {old} ({oldv})")


@pytest.mark.xdist_group("guest-b")
def test_ota_powercut(ota, guest):
    old, new, oldv = ota.current()
    newv = f"{bundles.base_version()}+powercut"
    b = bundles.make(newv)
    guest.push(b.path, "/data/ota.raucb")
    guest.sh("rm -f /data/ota-install.log; "
             "setsid nohup rauc install /data/ota.raucb >/data/ota-install.log 2>&1 < /dev/null &")
    # wait until RAUC writes the slot (target marked bad, image copy under way), then pull the plug
    deadline = time.monotonic() + 180
    cut = False
    log = ""
    while time.monotonic() < deadline:
        log = guest.run("cat /data/ota-install.log")[1]
        if "succeeded" in log or "failed" in log:
            break
        if ("Copying image" in log or "Updating slot" in log) and ota.env().get(f"{new}_OK") == "0":
            time.sleep(2)
            log = guest.run("cat /data/ota-install.log")[1]
            if "succeeded" in log or "failed" in log:
                break
            progress = [line for line in log.splitlines() if "%" in line]
            guest.log(f"power cut during: {progress[-1].strip() if progress else log.strip()[-80:]}")
            guest.power_cut()
            cut = True
            break
        time.sleep(1)
    assert cut, f"could not cut the power during the write (log: {' '.join(log.splitlines()[-3:])})"
    guest.boot_again()
    ota.wait_good(old, BOOT_TIMEOUT)
    assert ota.version() == oldv, f"running '{ota.version()}' after the cut, expected '{oldv}'"
    st = ota.env().get(f"{new}_OK")
    assert st == "0", f"half-written slot {new} is not marked bad ({new}_OK={st})"
    # a new install must succeed, and its slot must boot
    guest.sh("rm -f /data/ota.raucb /data/ota.raucb.part /data/ota-install.log")
    ota.install(b)
    guest.reboot()
    ota.wait_good(new, BOOT_TIMEOUT)
    assert ota.version() == newv, f"version is '{ota.version()}', expected '{newv}'"
    guest.log(f"power cut left {old} running; re-install booted {new} ({newv})")
