"""wear: how much the appliance writes to its data partition (the SD card) per day at its default
settings, from the block device's own statistics over a measured period, extrapolated to a day.

A long scenario (run only when named): `sudo WEAR_MINUTES=30 ci/system-test wear`. Cost: one
boot (~100 s) + 60 s to settle + WEAR_MINUTES (default 30). What runs is what the image runs:
the daemon (the qemu image's default: a simulated 3600 W meter, a save every 30 s), journald
(persistent on /data), timesyncd, networkd, sshd for the harness's commands. One figure for
all of them: journald writes into preallocated files, so their sizes do not show its share.
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


def test_wear(guest, record_property):
    minutes = float(os.environ.get("WEAR_MINUTES", "30"))
    dev = guest.sh("basename $(findmnt -no SOURCE /data)")
    # the first boot's one-off work (growing the partition, the machine-id, the host key) is not
    # the daily rate: let it settle
    time.sleep(60)
    saves0 = int(guest.sh("curl -s http://127.0.0.1:9002/metrics | "
                          "sed -n 's/^powermeter_state_saves_total \\([0-9]*\\).*/\\1/p'") or 0)
    w0, t0 = sectors_written(guest, dev), time.monotonic()
    time.sleep(minutes * 60)
    w1, t1 = sectors_written(guest, dev), time.monotonic()
    saves1 = int(guest.sh("curl -s http://127.0.0.1:9002/metrics | "
                          "sed -n 's/^powermeter_state_saves_total \\([0-9]*\\).*/\\1/p'") or 0)
    per_day = (w1 - w0) * 512 / (t1 - t0) * 86400
    saves = saves1 - saves0
    guest.log(f"{dev}: {(w1 - w0) * 512} bytes written in {t1 - t0:.0f} s = {per_day / 1e6:.1f} MB/day; "
              f"{saves} state saves ({(w1 - w0) * 512 / max(saves, 1) / 1024:.1f} KiB written per save, all sources)")
    record_property("mb_per_day", round(per_day / 1e6, 1))
    record_property("saves", saves)
    assert w1 > w0, f"nothing written to {dev} in {minutes} min: the daemon saves every 30 s"
    assert per_day < GOAL_BYTES_PER_DAY, f"{per_day / 1e6:.1f} MB/day written to the data partition, goal < 50"
