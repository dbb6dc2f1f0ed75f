"""The labgrid strategy for the powermeter appliance.

States: `off` -> `on` (powered, console read) -> `shell` (root over SSH) -> `ready`
(`powermeter.service` active, i.e. the daemon sent READY=1). The same strategy drives the qemu
guest (QEMUDriver is power and console) and a Raspberry Pi on a bench (a power switch driver, a
SerialDriver, and optionally an SD mux with a USB storage driver to write a fresh image).
The appliance has no console login (root is locked), so commands always go over SSH with the
test key that the harness provisions on the data partition.
"""

from __future__ import annotations

import contextlib
import enum
import time

import attr
from labgrid.factory import target_factory
from labgrid.strategy import Strategy, StrategyError


class Status(enum.Enum):
    """Where the target is."""

    unknown = 0
    off = 1
    on = 2
    shell = 3
    ready = 4


@target_factory.reg_driver
@attr.s(eq=False)
class PowermeterStrategy(Strategy):
    """Takes a powermeter appliance to a state; see the module doc."""

    bindings = {
        "power": "PowerProtocol",
        "console": "ConsoleProtocol",
        "ssh": "SSHDriver",
        "sdmux": {"USBSDMuxDriver", None},
        "storage": {"USBStorageDriver", None},
    }

    boot_timeout = attr.ib(default=600.0, validator=attr.validators.instance_of(float))
    status = attr.ib(default=Status.unknown)

    def alive(self) -> bool:
        """False when the machine is known to be off (qemu exited); True where it can't tell."""
        child = getattr(self.power, "_child", None)
        if hasattr(self.power, "_child"):
            return child is not None and child.poll() is None
        return self.status not in (Status.off, Status.unknown)

    def disconnect(self) -> None:
        """Drop the SSH connection (before a reboot or a power cut)."""
        with contextlib.suppress(Exception):  # a dead control master: nothing left to close
            self.target.deactivate(self.ssh)

    def connect(self, timeout: float) -> bool:
        """One try at an SSH connection within `timeout` s; True when connected."""
        self.disconnect()
        self.ssh.connection_timeout = float(max(timeout, 1))
        try:
            self.target.activate(self.ssh)
            return True
        except Exception:
            return False

    def wait_shell(self, timeout: float) -> None:
        """Wait until a root shell over SSH works."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise StrategyError("the machine went off while booting (qemu exited)")
            if self.connect(min(20.0, max(deadline - time.monotonic(), 1))):
                return
            time.sleep(2)
        raise StrategyError(f"no SSH within {timeout:.0f} s")

    def wait_ready(self, timeout: float) -> None:
        """Wait until powermeter.service is active (a Type=notify unit: READY=1 received)."""
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            out, _, rc = self.ssh.run("systemctl is-active powermeter.service", timeout=30)
            state = " ".join(out) or f"exit {rc}"
            if rc == 0 and state == "active":
                return
            time.sleep(2)
        raise StrategyError(f"powermeter.service not active within {timeout:.0f} s (state: {state})")

    def flash(self, image: str) -> None:
        """Write `image` to the SD card through the SD mux (bench only; qemu guests get a new
        overlay from the harness instead)."""
        if self.sdmux is None or self.storage is None:
            raise StrategyError("no SD mux and USB storage driver on this target")
        self.transition(Status.off)
        self.target.activate(self.sdmux)
        self.sdmux.set_mode("host")
        self.target.activate(self.storage)
        self.storage.write_image(image, mode="bmaptool")
        self.sdmux.set_mode("dut")

    def transition(self, status, *, timeout: float | None = None):  # pylint: disable=arguments-differ
        """Go to `status` (a Status or its name)."""
        if not isinstance(status, Status):
            status = Status[status]
        timeout = self.boot_timeout if timeout is None else timeout
        if status == Status.unknown:
            raise StrategyError(f"can not transition to {status}")
        if status == self.status:
            return
        if status == Status.off:
            self.disconnect()
            self.target.activate(self.power)
            with contextlib.suppress(OSError):  # qemu had already exited
                self.power.off()
        elif status == Status.on:
            self.target.activate(self.console)
            self.target.activate(self.power)
            self.power.on()
        elif status == Status.shell:
            if self.status in (Status.unknown, Status.off):
                self.transition(Status.on)
            self.status = Status.on
            self.wait_shell(timeout)
        elif status == Status.ready:
            if self.status != Status.shell:
                self.transition(Status.shell, timeout=timeout)
            self.wait_ready(timeout)
        self.status = status
