"""The kernel's GPIO simulator in a guest, standing in for the meter.

The module and the pulse generator come from the test-only disk labelled `gpiosim`
(`images/qemu/gpio-sim/build`), attached to the guest as a second, read-only drive; nothing
test-only is in the verified root. The simulator makes a chip whose line 27 is named `GPIO27`,
like the Pi's header pin; writing `pull-up`/`pull-down` to the line's `pull` attribute makes the
edges the daemon sees, stamped by the kernel.

The daemon is switched to the GPIO default configuration of the Pi images
(`meta-powermeter/.../powermeter.toml`: `source = "gpio"`, pin 27) by a bind mount over
/etc/powermeter/powermeter.toml (in RAM, gone at the next boot); the unit stays as shipped.
"""

from __future__ import annotations

import re
from pathlib import Path

from .guest import Guest, GuestError, wait_until
from .layout import REPO, qemu_build

CONFIGFS = "/sys/kernel/config/gpio-sim"
MOUNT = "/run/gpio-sim"
CONFIG = "/etc/powermeter/powermeter.toml"
PI_DEFAULT_CONFIG = REPO / "meta-powermeter" / "recipes-powermeter" / "powermeter" / "files" / "powermeter.toml"


def disk_image() -> Path:
    """The test-only disk with gpio-sim.ko and pulsegen."""
    img = qemu_build() / "gpio-sim" / "gpio-sim.img"
    if not img.exists():
        raise FileNotFoundError(f"no {img}: run images/qemu/gpio-sim/build (ci/system-test does)")
    return img


def qemu_args() -> str:
    """qemu arguments that attach the test disk read-only."""
    return (f"-drive if=none,id=gpiosim,format=raw,readonly=on,file={disk_image()} "
            "-device virtio-blk-pci,drive=gpiosim")


class GpioSim:
    """gpio-sim in `guest`: load it, make or remove the meter's chip, send pulses."""

    def __init__(self, guest: Guest, name: str = "meter"):
        self.g = guest
        self.name = name
        self.pull = ""
        self.chip = ""
        #: pulsegen's figures of the last train: late_starts, max_late_us, max_bounce_us
        self.report: dict[str, int] = {}

    def load(self) -> None:
        """Mount the test disk and load the module (idempotent)."""
        self.g.sh(f"mountpoint -q {MOUNT} || {{ mkdir -p {MOUNT} && "
                  f"mount -o ro /dev/disk/by-label/gpiosim {MOUNT}; }}")
        kver, running = self.g.sh(f"cat {MOUNT}/KVER; uname -r").splitlines()
        if kver != running:
            raise GuestError(f"gpio-sim.ko is for {kver}, the guest runs {running}: rebuild it")
        self.g.sh("modprobe configfs && { lsmod | grep -q '^gpio_sim ' || insmod "
                  f"{MOUNT}/gpio-sim.ko; }} && {{ mountpoint -q /sys/kernel/config || "
                  "mount -t configfs none /sys/kernel/config; }")

    def create(self, line: int = 27, line_name: str = "GPIO27", num_lines: int = 28) -> str:
        """Make the simulated chip (bank of `num_lines`, line `line` named `line_name`) live;
        returns its device (/dev/gpiochipN). Chip names are read from configfs, not assumed."""
        d = f"{CONFIGFS}/{self.name}"
        self.g.sh(f"mkdir {d} {d}/bank0 {d}/bank0/line{line} && echo {num_lines} > {d}/bank0/num_lines && "
                  f"echo {line_name} > {d}/bank0/line{line}/name && echo 1 > {d}/live")
        dev_name, chip_name = self.g.sh(f"cat {d}/dev_name {d}/bank0/chip_name").splitlines()
        self.pull = f"/sys/devices/platform/{dev_name}/{chip_name}/sim_gpio{line}/pull"
        self.chip = f"/dev/{chip_name}"
        self.g.sh(f"udevadm settle; test -c {self.chip}")
        return self.chip

    def remove(self, line: int = 27) -> None:
        """Take the chip away (as if it were unplugged)."""
        d = f"{CONFIGFS}/{self.name}"
        self.g.sh(f"echo 0 > {d}/live && rmdir {d}/bank0/line{line} {d}/bank0 {d}")

    def command(self, count: int, period_ms: float, bounce_ms: tuple[float, ...] = ()) -> str:
        """The guest command line of a pulse train (see `pulses`)."""
        bounces = "".join(f" {int(b * 1000)}" for b in bounce_ms)
        return f"{MOUNT}/pulsegen {self.pull} {count} {int(period_ms * 1000)}{bounces}"

    def pulses(self, count: int, period_ms: float, bounce_ms: tuple[float, ...] = (), background: bool = False) -> int:
        """`count` pulses, a rising edge every `period_ms` (plus contact bounce: an extra rising
        edge `b` ms after each for every b in `bounce_ms`); returns the rising edges written.
        With `background` it returns at once (0) and the train runs on."""
        cmd = self.command(count, period_ms, bounce_ms)
        if background:
            self.g.sh(f"setsid nohup {cmd} >/run/pulsegen.log 2>&1 </dev/null &")
            return 0
        out = self.g.sh(cmd, timeout=count * period_ms / 1000 * 3 + 120)
        return self._report(out)

    def _report(self, out: str) -> int:
        """Log pulsegen's last line, keep its figures in `self.report`; the rising edges."""
        line = out.strip().splitlines()[-1] if out.strip() else ""
        self.g.log(f"pulsegen: {line}")
        m = re.match(r"(\d+) rising edges, (\d+) late starts \(max (\d+) us late\), "
                     r"bounces up to (\d+) us after their pulse$", line)
        if not m:
            raise GuestError(f"pulsegen printed {out!r}")
        edges, late, max_late, bounce = (int(g) for g in m.groups())
        self.report = {"late_starts": late, "max_late_us": max_late, "max_bounce_us": bounce}
        return edges

    def wait_pulsegen(self, timeout: float) -> int:
        """Wait for a background train to end; the rising edges it wrote."""
        done = wait_until(lambda: self.g.run("pgrep -x pulsegen")[0] != 0, timeout)
        if not done:
            raise GuestError(f"pulsegen still running after {timeout:.0f} s")
        return self._report(self.g.sh("cat /run/pulsegen.log"))


def use_config(guest: Guest, text: str, restart: bool = True) -> None:
    """Make `text` the daemon's configuration (a bind mount over the shipped file), checked
    with --check-config, and restart the service."""
    guest.sh("mkdir -p /run/powermeter-test && cat > /run/powermeter-test/powermeter.toml <<'EOF'\n"
             f"{text}\nEOF\n"
             f"findmnt -n {CONFIG} >/dev/null || mount --bind /run/powermeter-test/powermeter.toml {CONFIG}; "
             f"powermeterd --check-config --config {CONFIG}")
    if restart:
        guest.sh("systemctl restart powermeter.service")


def gpio_config(debounce_ms: int | None = None) -> str:
    """The Pi images' default configuration (GPIO 27), optionally with another debounce."""
    text = PI_DEFAULT_CONFIG.read_text()
    if debounce_ms is not None:
        text = text.replace("debounce_ms = 20", f"debounce_ms = {debounce_ms}")
    return text
