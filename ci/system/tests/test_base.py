"""Base scenarios: the daemon, its unit, the read-only verity root, the data partition, the
watchdog, the journal, each checked in or against the booted qemu guest (one shared guest).
Costs on the 2-core machine (TCG, quiet): boot-ready, readonly-root, data-partition, hardening
a few s each; watchdog-restart ~45 s; persist-reboot ~95 s (one reboot); journald ~5 s after
persist-reboot (one reboot of its own when run alone)."""

from __future__ import annotations

import json
import re

import pytest

from powermeter_lab.guest import wait_until
from powermeter_lab.layout import MIB, layout, qemu_build

pytestmark = pytest.mark.xdist_group("guest-a")

# the machine id seen by boot-ready, compared after the reboot of persist-reboot
_seen: dict[str, str] = {}


def test_boot_ready(guest, record_property):
    st = guest.run("systemctl is-active powermeter.service")[1]
    assert st == "active", f"powermeter.service is '{st}'"
    typ = guest.sh("systemctl show -P Type powermeter.service")
    assert typ == "notify", f"powermeter.service is Type={typ}, not notify"
    # READY=1 was received: a notify service only becomes active with it; STATUS= is the daemon's
    status = guest.sh("systemctl show -P StatusText powermeter.service")
    assert status, "no STATUS= from the daemon"
    main = int(guest.sh("systemctl show -P MainPID powermeter.service") or 0)
    assert main > 0, "no main PID"
    assert guest.ok("journalctl -b -o cat -u powermeter.service | grep -q 'Started powermeter.service'"), \
        "systemd never logged the service as started (READY=1)"
    count = guest.count()
    assert re.fullmatch(r"[0-9]+", count), f"port 9001 answered '{count}', not a decimal count"
    code, _ = guest.http("/health")
    assert code == 200, f"GET /health from the host: HTTP {code}"
    _seen["machine-id"] = guest.sh("cat /etc/machine-id")
    secs = guest.ready_seconds()
    record_property("kernel_to_ready_s", f"{secs:.1f}")
    guest.log(f"active (pid {main}, status '{status}'), port 9001 says {count}, /health 200; "
              f"READY=1 {secs:.1f} s after kernel start")


@pytest.mark.qemu_x86  # compares with GRUB's A_ROOTHASH
def test_readonly_root(guest):
    src, fstype, opts = guest.sh("findmnt -no SOURCE,FSTYPE,OPTIONS /").split()
    assert src == "/dev/mapper/root", f"/ is {src}, not /dev/mapper/root"
    assert fstype == "squashfs", f"/ is {fstype}, not squashfs"
    assert "ro" in opts.split(","), f"/ is mounted '{opts}'"
    dmuuid = guest.sh("cat /sys/block/$(basename $(readlink -f /dev/mapper/root))/dm/uuid")
    assert dmuuid.startswith("CRYPT-VERITY-"), f"/dev/mapper/root is not a dm-verity device (uuid '{dmuuid}')"
    assert re.search(r"status:.*verified", guest.sh("veritysetup status root")), "veritysetup status root: not verified"
    dev_hash = guest.sh("veritysetup status root | sed -n 's/^ *root hash: *//p'")
    cmd_hash = guest.sh(r"sed -n 's/.*roothash=\([0-9a-f]*\).*/\1/p' /proc/cmdline")
    env_hash = guest.sh("grub-editenv /boot/efi/EFI/BOOT/grubenv list | sed -n 's/^A_ROOTHASH=//p'")
    assert dev_hash and dev_hash == cmd_hash == env_hash, \
        f"root hash of the device ({dev_hash}), the command line ({cmd_hash}) and grubenv A_ROOTHASH " \
        f"({env_hash}) differ"
    built = (qemu_build() / "rootfs.roothash").read_text().strip()
    assert dev_hash == built, "the root hash is not the one the build made"
    # writes anywhere on the root fail, also for root
    for w in ("/", "/etc", "/usr/bin", "/var/lib/dpkg/../..", "/boot"):
        assert not guest.ok(f"touch {w}/.powermeter-write-test 2>/dev/null"), f"a write to {w} succeeded"
    assert not guest.ok("mount -o remount,rw / 2>/dev/null && touch /.rw-test 2>/dev/null"), \
        "remounting / read-write worked"
    assert guest.sh("blockdev --getro /dev/mapper/root") == "1", "the verity device is writable"
    # the writable places are elsewhere: /var and /data on the data partition, /tmp in RAM
    assert guest.sh("findmnt -no FSTYPE /tmp") == "tmpfs", "/tmp is not a tmpfs"
    assert guest.ok('findmnt -no SOURCE /data | grep -q "$(readlink -f /dev/disk/by-partlabel/data)"'), \
        "/data is not the data partition"
    assert guest.ok(r'findmnt -no SOURCE /var | grep -q "\[/var\]"'), "/var is not bound from /data/var"
    assert guest.ok("touch /var/.w /tmp/.w /data/.w && rm /var/.w /tmp/.w /data/.w"), "/var, /tmp or /data not writable"
    guest.log(f"/ = {src} ({fstype}, ro), dm-verity root hash {dev_hash} = cmdline = grubenv; writes fail with EROFS")


def test_data_partition(guest):
    lay = layout()
    size = int(guest.sh("blockdev --getsize64 /dev/disk/by-partlabel/data"))
    assert size > lay.data_mib * MIB, \
        f"data partition not grown: {size} bytes (image: {lay.data_mib} MiB, the disk is 256 MiB bigger)"
    assert guest.ok('df -B1 --output=size /data | tail -n1 | '
                    'awk -v p="$(blockdev --getsize64 /dev/disk/by-partlabel/data)" "{ exit !(\\$1 > p * 0.8) }"'), \
        "the ext4 file system on /data was not grown with its partition"
    link, mid = guest.sh("readlink /etc/machine-id; cat /data/machine-id").splitlines()
    assert link == "/data/machine-id" and re.fullmatch(r"[0-9a-f]{32}", mid), \
        f"machine-id is not kept on /data: {link} {mid}"
    assert mid == guest.sh("cat /etc/machine-id"), "/etc/machine-id is not /data/machine-id"
    guest.log(f"data partition {size // MIB} MiB (image {lay.data_mib} MiB); machine-id {mid} on /data")


def test_hardening(guest):
    rc, out, err = guest.run("systemd-analyze security --no-pager powermeter.service")
    assert rc == 0, f"systemd-analyze security failed: {(err or out).strip().splitlines()[-1:]}"
    m = re.search(r"Overall exposure level for powermeter.service: *([0-9.]+)", out)
    assert m, f"no exposure level in: {out.strip().splitlines()[-1:]}"
    exposure = float(m.group(1))
    assert exposure <= 1.0, f"exposure {exposure} > 1.0"
    main = int(guest.sh("systemctl show -P MainPID powermeter.service") or 0)
    assert main > 0, "powermeter.service not running"
    status = dict(line.split(":", 1) for line in guest.sh(f"cat /proc/{main}/status").splitlines() if ":" in line)
    uids = status["Uid"].split()
    assert "0" not in uids, f"powermeterd runs with uid 0 ({' '.join(uids)})"
    assert "0" not in status["Gid"].split(), "powermeterd runs with gid 0"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[cap].strip() == "0000000000000000", f"powermeterd has {cap}={status[cap].strip()}"
    assert status["NoNewPrivs"].strip() == "1", "NoNewPrivs is not set"
    assert status["Seccomp"].strip() == "2", "no seccomp filter"
    guest.log(f"exposure {exposure}; uid {' '.join(uids)}; no capabilities; NoNewPrivs, seccomp filter")


def test_watchdog_restart(guest):
    pid1 = int(guest.sh("systemctl show -P MainPID powermeter.service") or 0)
    n1 = int(guest.sh("systemctl show -P NRestarts powermeter.service"))
    assert pid1 > 0, "powermeter.service not running"
    # a counter value that is surely persisted: wait for a state save after reading it
    c0 = int(guest.count())
    s0 = guest.metric("powermeter_state_saves_total")
    saved = wait_until(lambda: guest.metric("powermeter_state_saves_total") != s0, 90)
    assert saved, f"no state save within 90 s (powermeter_state_saves_total {s0})"
    guest.sh(f"kill -STOP {pid1}")
    guest.log(f"SIGSTOP to powermeterd {pid1} (count {c0} saved); waiting for the watchdog")

    def restarted():
        pid = int(guest.sh("systemctl show -P MainPID powermeter.service") or 0)
        active = guest.run("systemctl is-active powermeter.service")[1] == "active"
        return pid if pid > 0 and pid != pid1 and active else 0

    pid2 = wait_until(restarted, 120, every=3)
    assert pid2, "not restarted within 120 s"
    n2 = int(guest.sh("systemctl show -P NRestarts powermeter.service"))
    assert n2 > n1, f"NRestarts {n1} -> {n2}"
    assert guest.ok("journalctl -b -u powermeter.service -o cat | grep -q 'Watchdog timeout'"), \
        "no 'Watchdog timeout' of powermeter.service in the journal: killed by something else"
    c2 = int(guest.count())
    assert c2 >= c0, f"count went back from {c0} to {c2} over the restart"
    guest.log(f"watchdog timeout; restarted as {pid2} (NRestarts {n1} -> {n2}); count {c0} -> {c2}")


def test_persist_reboot(guest, record_property):
    c1 = int(guest.count())
    guest.reboot()
    guest.wait_ready()
    secs = guest.ready_seconds()
    record_property("kernel_to_ready_s", f"{secs:.1f}")
    c2 = int(guest.count())
    assert c2 >= c1, f"count before the reboot {c1} > after {c2}"
    mid = guest.sh("cat /etc/machine-id")
    if "machine-id" in _seen:
        assert mid == _seen["machine-id"], f"machine-id changed over the reboot ({_seen['machine-id']} -> {mid})"
    guest.log(f"count {c1} -> {c2} over a clean reboot; machine-id {mid} kept; READY=1 {secs:.1f} s after kernel start")


def test_journald(guest):
    # a line per boot, each with its 32-hex boot id (the header line has none)
    boots = len(re.findall(r"\b[0-9a-f]{32}\b", guest.sh("journalctl --list-boots --no-pager")))
    if boots < 2:
        guest.reboot()
        guest.wait_ready()
    assert guest.ok("test -d /var/log/journal/$(cat /etc/machine-id)"), \
        "no persistent journal directory /var/log/journal/<machine-id>"
    assert guest.ok('findmnt -no SOURCE -T /var/log/journal | grep -q "$(readlink -f /dev/disk/by-partlabel/data)"'), \
        "the journal is not on the data partition"
    # entries of the daemon itself (not only systemd's about it) from the previous boot
    rc, j, err = guest.run("journalctl -b -1 -o json --no-pager "
                           "SYSLOG_IDENTIFIER=powermeterd _SYSTEMD_UNIT=powermeter.service")
    assert rc == 0, f"journalctl -b -1 failed: {err.strip()[-200:]}"
    assert j.strip(), "no powermeterd entries from the previous boot in the journal"
    keys: set[str] = set()
    for line in j.splitlines():
        keys.update(json.loads(line).keys())
    fields = sorted(k for k in keys if k in ("CODE_FILE", "CODE_LINE", "TARGET", "PRIORITY") or k.startswith("F_"))
    assert "CODE_FILE" in fields and "PRIORITY" in fields, f"the daemon's entries are not structured (fields: {fields})"
    guest.log(f"{len(j.splitlines())} powermeterd entries from the previous boot, fields {' '.join(fields)}; "
              f"{guest.sh('journalctl --disk-usage')}")
