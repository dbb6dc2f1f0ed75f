"""The Raspberry Pi 4 image (images/rpi4/build) on arm64: U-Boot's A/B boot counting, run for real.

The guest is the Pi image file itself, booted under `qemu-system-aarch64 -M virt` (TCG) by
Debian's u-boot-qemu: its distro boot finds boot.scr on the boot partition, and from there on it
is the Pi's boot path (the one boot script of images/common/u-boot/, the boot state in
powermeter.env on FAT, fw_setenv from Linux, the slot's kernel and initrd from slot-X/, dm-verity
opened in the initramfs, the same units, RAUC hooks and mark-good as the x86 image). What
differs from a real Pi 4 is the board: virtio disk and network instead of the SD card and
genet, qemu's i6300esb instead of the SoC watchdog, no Pi firmware stage (qemu starts U-Boot).

Two groups, two guests, so that both workers share the arm64 boots: `rpi` (rpi-boot-ready,
rpi-ota-install, rpi-env-powercut) and `rpi-b` (rpi-rollback-unhealthy, rpi-rollback-corrupt),
each in file order on one guest; a reboot resets qemu in place, so the boots of a rollback are
one qemu process. Costs on the 2-core machine (TCG, next to another guest, 2026-12-03):
rpi-boot-ready ~90 s (the boot), rpi-ota-install ~210 s, rpi-env-powercut ~260 s (three power
cuts and boots), rpi-rollback-unhealthy ~460 s, rpi-rollback-corrupt ~200 s.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from powermeter_lab import bundles
from powermeter_lab.guest import BOOT_TIMEOUT, Guest, GuestError, wait_until
from powermeter_lab.layout import ARM64, layout
from powermeter_lab.ota import Updater, other

pytestmark = [pytest.mark.appliance("qemu-arm64")]
# the second arm64 guest: the scenarios that end with a rolled-back slot
ROLLBACK = pytest.mark.xdist_group("rpi-b")

BOOT = "/boot/firmware"


def uboot_env(g: Guest) -> dict[str, str]:
    """The boot state as Linux reads it (fw_printenv, /etc/fw_env.config)."""
    lines = g.sh("fw_printenv").splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def wait_marked_good(g: Guest) -> None:
    state = wait_until(lambda: g.try_sh("systemctl show -P ActiveState powermeter-mark-good.service")
                       in ("active", "failed"), 180, every=3)
    assert state, "powermeter-mark-good.service did not finish"
    assert g.sh("systemctl show -P ActiveState powermeter-mark-good.service") == "active", \
        f"the booted slot was not marked good: {g.try_sh('journalctl -u powermeter-mark-good -o cat | tail -n 3')}"


@pytest.mark.xdist_group("rpi")
def test_rpi_boot_ready(guest, record_property):
    assert guest.sh("uname -m") == "aarch64", "not an arm64 guest"
    console = guest.console.text()
    assert "powermeter: booting slot A" in console, "U-Boot did not run the powermeter boot script"
    assert guest.sh("systemctl show -P ActiveState powermeter.service") == "active", "powermeter is not active"
    cmdline = guest.sh("cat /proc/cmdline")
    built = (ARM64.build / "rootfs.roothash").read_text().strip()
    assert f"roothash={built}" in cmdline, f"not booted with the build's root hash: {cmdline}"
    assert guest.sh("findmnt -no SOURCE /") == "/dev/mapper/root", "/ is not the dm-verity device"
    wait_marked_good(guest)
    env = uboot_env(guest)
    assert env.get("BOOT_ORDER") == "A B" and env.get("BOOT_A_LEFT") == "3", \
        f"after mark-good the boot state is {env} (expected BOOT_ORDER='A B', BOOT_A_LEFT=3)"
    booted = guest.sh("rauc status --output-format=shell | sed -n 's/^RAUC_SYSTEM_BOOTED_BOOTNAME=//p'")
    assert booted.strip("'\"") == "A", f"RAUC says the booted slot is {booted}"
    c = guest.count()
    assert c.isdigit(), f"port 9001 answered '{c}'"
    record_property("kernel_to_ready_s", f"{guest.ready_seconds():.1f}")
    guest.log(f"arm64 through U-Boot: slot A, kernel start to READY=1 {guest.ready_seconds():.1f} s; "
              f"boot state {env}")


@pytest.mark.xdist_group("rpi")
def test_rpi_ota_install(ota, guest):
    old, new, oldv = ota.current()
    newv = f"{bundles.base_version(ARM64)}+ota1"
    b = bundles.make(newv, app=ARM64)
    c1 = ota.count()
    ota.install(b)
    env = uboot_env(guest)
    assert env.get("BOOT_ORDER", "").split()[:1] == [new], f"after install BOOT_ORDER='{env.get('BOOT_ORDER')}'"
    assert env.get(f"BOOT_{new}_LEFT") == "3", f"slot {new} not armed: {env}"
    slot_env = guest.sh(f"cat {BOOT}/slot-{new}/slot.env")
    assert slot_env == f"BOOT_{new}_ROOTHASH={b.roothash}", f"slot-{new}/slot.env is '{slot_env}'"
    guest.reboot()
    ota.wait_good(new, BOOT_TIMEOUT)
    assert ota.version() == newv, f"version is '{ota.version()}', expected '{newv}'"
    assert f"roothash={b.roothash}" in guest.sh("cat /proc/cmdline"), "not booted with the bundle's root hash"
    wait_marked_good(guest)
    env = uboot_env(guest)
    assert env.get(f"BOOT_{new}_LEFT") == "3", f"slot {new} not marked good: {env}"
    start = guest.sh(f"grep ^BOOT_ORDER= {BOOT}/powermeter-bootenv.txt")
    assert start == f"BOOT_ORDER={new} {old}", \
        f"the state U-Boot starts over from still puts the old slot first: {start}"
    c2 = ota.count()
    assert c2 >= c1, f"counter went back from {c1} to {c2} over the update"
    guest.log(f"slot {old} ({oldv}) -> {new} ({newv}) through U-Boot; counter {c1} -> {c2}")


@ROLLBACK
def test_rpi_rollback_unhealthy(ota, guest):
    old, new, oldv = ota.current()
    b = bundles.make(f"{bundles.base_version(ARM64)}+unhealthy", "unhealthy", app=ARM64)
    ota.install(b)
    assert uboot_env(guest).get("BOOT_ORDER", "").split()[:1] == [new], "the new slot is not first"
    mark = guest.console.mark()
    with contextlib.suppress(GuestError):  # it may come up on a trial boot first
        guest.reboot()
    ota.wait_good(old, 4 * BOOT_TIMEOUT)
    assert ota.version() == oldv, f"running '{ota.version()}', expected the old '{oldv}'"
    tries = guest.console.since(mark).count(f"powermeter: booting slot {new}")
    assert tries == 3, f"U-Boot booted the failing slot {new} {tries} times, expected 3"
    wait_marked_good(guest)
    env = uboot_env(guest)
    assert new not in env.get("BOOT_ORDER", "").split(), f"the failed slot {new} is not marked bad: {env}"
    assert other(new) == old
    guest.log(f"slot {new} failed {tries} trial boots; back on {old} ({oldv}); boot state {env}")


@ROLLBACK
def test_rpi_rollback_corrupt(ota, guest):
    old, new, oldv = ota.current()
    b = bundles.make(f"{bundles.base_version(ARM64)}+corrupt", app=ARM64)
    ota.install(b)
    # 4 bytes of the new slot's first block (the squashfs superblock's mkfs time): U-Boot reads
    # the kernel from the boot partition and the initramfs opens the slot under dm-verity, so
    # only dm-verity can notice; the hash tree must refuse the block
    d = f"/dev/disk/by-partlabel/rootfs-{new.lower()}"
    guest.sh(f"printf '\\336\\255\\276\\357' | dd of={d} bs=1 seek=8 conv=notrunc,fsync status=none")
    offset = layout(ARM64.layout_env).verity_hash_offset
    assert not guest.ok(f"veritysetup verify {d} {d} {b.roothash} --hash-offset={offset}"), \
        "the corrupted slot still verifies"
    mark = guest.console.mark()
    with contextlib.suppress(GuestError):
        guest.reboot()
    ota.wait_good(old, 3 * BOOT_TIMEOUT)
    assert ota.version() == oldv, f"running '{ota.version()}', expected the old '{oldv}'"
    console = guest.console.since(mark)
    tries = console.count(f"powermeter: booting slot {new}")
    assert tries == 3, f"U-Boot booted the corrupted slot {new} {tries} times, expected 3"
    assert "verity" in console and "corrupted" in console, \
        "no dm-verity corruption report on the console during the trial boots"
    wait_marked_good(guest)
    env = uboot_env(guest)
    assert new not in env.get("BOOT_ORDER", "").split(), f"the corrupted slot {new} is not marked bad: {env}"
    guest.log(f"corrupted slot {new} refused by dm-verity {tries} times; back on {old} ({oldv}); boot state {env}")


def _boot_after_cut(guest: Guest, ota: Updater, good: str, what: str) -> None:
    guest.boot_again()
    ota.wait_good(good, BOOT_TIMEOUT)
    assert guest.sh("systemctl show -P ActiveState powermeter.service") == "active", \
        f"powermeter is not active after {what}"
    wait_marked_good(guest)


@pytest.mark.xdist_group("rpi")
def test_rpi_env_powercut(ota, guest):
    good = ota.booted()
    env0 = uboot_env(guest)
    # 1. the power goes right after U-Boot wrote the boot state (its count of this try)
    mark = guest.console.mark()
    guest.try_sh("systemctl reboot")
    m = guest.console.wait_for(r"16384 bytes written", 300, since=mark)
    assert m, "U-Boot did not write the boot state within 300 s of the reboot"
    guest.power_cut()
    _boot_after_cut(guest, ota, good, "a cut right after U-Boot wrote the boot state")
    # 2. the power goes while Linux writes the boot state: fw_setenv in a loop, then the plug
    order = env0.get("BOOT_ORDER", good)
    guest.sh(f"setsid nohup sh -c 'while :; do fw_setenv BOOT_ORDER \"{order}\"; done' >/dev/null 2>&1 </dev/null &")
    time.sleep(3)
    guest.power_cut()
    _boot_after_cut(guest, ota, good, "a cut while fw_setenv wrote the boot state")
    # 3. a torn write for certain: half a block of the state file overwritten, then the plug.
    # U-Boot finds a bad CRC and starts over from powermeter-bootenv.txt, where mark-good put
    # the good slot first: still the same slot, never back to an older one (nor to a failed
    # slot: it has no slot.env, mark-good removed it)
    guest.sh(f"dd if=/dev/urandom of={BOOT}/powermeter.env bs=512 count=1 seek=8 conv=notrunc status=none; "
             f"sync -f {BOOT}/powermeter.env")
    mark = guest.console.mark()
    guest.power_cut()
    _boot_after_cut(guest, ota, good, "a torn boot state file")
    # (U-Boot's own "Loading Environment from Flash... bad CRC" is there at every boot on virt:
    # the script's import of the file is what must have failed)
    after = guest.console.since(mark)
    assert "import failed" in after, "U-Boot's boot script did not notice the torn boot state file"
    env = uboot_env(guest)
    assert env.get("BOOT_ORDER"), f"no boot state after the torn file: {env}"
    guest.log(f"three power cuts around the boot state; slot {good} booted each time; state now {env}")
