"""wear: how much the appliance writes to its data partition (the SD card) per day at its default
settings, from the block device's own statistics over a measured period, extrapolated to a day.

A long scenario (run only when named): `sudo WEAR_MINUTES=30 ci/system-test wear`. Cost: one
boot (~100 s) + 60 s to settle + WEAR_MINUTES (default 30). What runs is what the image runs:
the daemon (the qemu image's default: a simulated 3600 W meter, a save every 60 s, as on the
Pi), journald (persistent on /data), timesyncd, networkd, sshd for the harness's commands.

Two phases of WEAR_MINUTES/2 each: everything, then the same with powermeter.service stopped.
The difference is the daemon's share (its saves); the second phase is journald's and the rest's
(journald writes into preallocated files, so their sizes cannot show its share). The goal
asserted is issue 18's: everything together under 50 MB per day.
"""

from __future__ import annotations

import os
import time

import pytest

pytestmark = [pytest.mark.long, pytest.mark.xdist_group("wear"), pytest.mark.qemu_x86]

GOAL_BYTES_PER_DAY = 50_000_000


def sectors_written(g, dev: str) -> int:
    """Field 7 of /sys/class/block/DEV/stat: 512-byte sectors written since boot."""
    return int(g.sh(f"cat /sys/class/block/{dev}/stat").split()[6])


def saves(g) -> int:
    return int(g.metric("powermeter_state_saves_total") or 0)


def measure(g, dev: str, seconds: float) -> tuple[int, float]:
    """(bytes written to DEV, seconds) over about `seconds`."""
    w0, t0 = sectors_written(g, dev), time.monotonic()
    time.sleep(seconds)
    w1, t1 = sectors_written(g, dev), time.monotonic()
    return (w1 - w0) * 512, t1 - t0


def test_wear(guest, record_property):
    minutes = float(os.environ.get("WEAR_MINUTES", "30"))
    dev = guest.sh("basename $(findmnt -no SOURCE /data)")
    interval = guest.sh("sed -n 's/^save_interval_s *= *\\([0-9]*\\).*/\\1/p' /etc/powermeter/powermeter.toml")
    # the first boot's one-off work (growing the partition, the machine-id, the host key) is not
    # the daily rate: let it settle
    time.sleep(60)
    s0 = saves(guest)
    all_bytes, all_s = measure(guest, dev, minutes * 30)
    n = saves(guest) - s0
    guest.sh("systemctl stop powermeter.service powermeter.socket powermeter-http.socket")
    try:
        time.sleep(10)  # the stop's own save
        rest_bytes, rest_s = measure(guest, dev, minutes * 30)
    finally:
        guest.sh("systemctl start powermeter.socket powermeter-http.socket powermeter.service")
    per_day = all_bytes / all_s * 86400
    rest_per_day = rest_bytes / rest_s * 86400
    daemon_per_day = per_day - rest_per_day
    per_save = (all_bytes / all_s - rest_bytes / rest_s) * all_s / max(n, 1)
    guest.log(f"{dev}, save_interval_s = {interval}: everything {all_bytes} bytes in {all_s:.0f} s = "
              f"{per_day / 1e6:.1f} MB/day ({n} saves); without the daemon {rest_bytes} bytes in {rest_s:.0f} s = "
              f"{rest_per_day / 1e6:.1f} MB/day; so the daemon {daemon_per_day / 1e6:.1f} MB/day, "
              f"{per_save / 1024:.1f} KiB per save")
    record_property("mb_per_day", round(per_day / 1e6, 1))
    record_property("mb_per_day_without_daemon", round(rest_per_day / 1e6, 1))
    record_property("kib_per_save", round(per_save / 1024, 1))
    assert all_bytes > 0 and n > 0, f"nothing written to {dev} in {minutes / 2} min, {n} saves"
    assert per_day < GOAL_BYTES_PER_DAY, f"{per_day / 1e6:.1f} MB/day written to the data partition, goal < 50"
