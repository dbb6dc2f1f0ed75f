"""The Pi 4 image file booted the way a Pi 4 boots it, on qemu's raspi4b machine: a long
scenario, not in the default run (`ci/system-test rpi-raspi4b-boot` runs it; 125 s alone on a
quiet machine, up to 25 min next to other guests).

`images/rpi4/run --raspi4b` starts the Pi build of U-Boot from the image's boot partition
(u-boot-rpi), which finds boot.scr on the emulated SD card, keeps the boot state in
powermeter.env on the card's FAT, loads slot A's kernel and initramfs from it; the initramfs
opens slot A on the SD card (sdhci-iproc, mmcblk) under dm-verity, and systemd starts the same
units as on a Pi, powermeter.service with the image's default configuration (GPIO 27).

What differs from a real Pi 4: qemu loads U-Boot and the device tree itself (the firmware's
start4.elf/config.txt stage does not run; /chosen/bootargs stands in for cmdline.txt), the
device tree has HDMI, the GPU, Wi-Fi and the second SD controller switched off
(images/rpi4/raspi4b-dtb), there is no network (so no SSH: the console is all the scenario
reads), the SD card has no DMA (the kernel takes minutes to load), and the watchdog driver is
kept out (qemu's resets at once when armed). The boot is judged on the console, up to
mark-good marking slot A good (powermeter healthy, its input GPIO 27 armed on the emulated
gpiochip).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from powermeter_lab.layout import ARM64, REPO

pytestmark = [pytest.mark.long, pytest.mark.xdist_group("raspi4b")]

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# what must show on the console, in this order
STEPS = [
    ("uboot_script_s", "U-Boot ran the image's boot script from the card", r"powermeter: booting slot A"),
    ("state_saved_s", "U-Boot wrote the boot state to the card's FAT", r"\d+ bytes written"),
    ("linux_s", "Linux started", r"Booting Linux on physical CPU"),
    ("root_verified_s", "the initramfs verified slot A on the SD card",
     r"powermeter-initramfs: root /dev/mmcblk\S+ verified by dm-verity"),
    ("systemd_s", "systemd runs on the verified root", r"Welcome to .*powermeter appliance"),
    ("ready_s", "powermeter.service is ready (Type=notify)", r"Started powermeter\.service"),
    # /health answered 200 with the default configuration: GPIO 27 of the emulated bcm2711 gpiochip
    # (systemd shortens long unit names on the console: "powermeter-mark-good.serv…")
    ("marked_good_s", "mark-good marked slot A good", r"Finished powermeter-mark-good\.serv"),
]
TIMEOUT = 40 * 60


def test_rpi_raspi4b_boot(record_property):
    img = ARM64.build / "powermeter-rpi4.img"
    assert img.is_file(), f"no {img}: images/rpi4/build first"
    wd = ARM64.build / "test" / "raspi4b"
    wd.mkdir(parents=True, exist_ok=True)
    log = wd / "serial.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(REPO / "images" / "rpi4" / "run"), "--raspi4b", "--fresh", "--dir", str(wd)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    pos = 0
    try:
        for key, what, pattern in STEPS:
            rx = re.compile(pattern)
            while True:
                text = ANSI.sub("", log.read_text(errors="replace"))
                m = rx.search(text, pos)
                if m:
                    pos = m.end()
                    record_property(key, round(time.monotonic() - t0))
                    break
                last = [line for line in text.splitlines() if line.strip()][-1:]
                assert proc.poll() is None, f"qemu ended before: {what} (last line: {last}; log {log})"
                assert time.monotonic() - t0 < TIMEOUT, \
                    f"not within {TIMEOUT} s: {what} (last line: {last}; log {log})"
                time.sleep(5)
        print(f"  [raspi4b] powermeter ready {time.monotonic() - t0:.0f} s after qemu start", flush=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
