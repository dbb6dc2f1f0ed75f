"""One appliance under test, driven through labgrid.

A `Guest` is a labgrid target made from an environment file (`ci/system/env/*.yaml`) plus the
per-guest values the file takes as `${LG_*}` templates (its disk, its OVMF variables, its
forwarded ports). For a qemu environment the harness gives every guest its own qcow2 overlay of
the pristine test disk; for a bench Pi the card is what it is (or is flashed by the strategy).

Ports as the host sees them come from the target's NetworkService resources `ssh`, `legacy`
(9001) and `http` (9002); a port of 0 in the environment file means "forwarded by qemu on a free
port of 127.0.0.1", chosen here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from labgrid import Environment
from labgrid.resource import NetworkService

from . import strategy as _strategy  # noqa: F401  (registers PowermeterStrategy)
from .console import ConsoleLog
from .strategy import Status

# The ${LG_*} values an environment file may use; Guest sets them per guest. labgrid's pytest
# plugin also loads the file once at start, before any guest exists: it gets these placeholders.
TEMPLATE_DEFAULTS = {
    "LG_DISK": "", "LG_DISK_FORMAT": "raw", "LG_OVMF_VARS": "", "LG_OVMF_CODE": "", "LG_SSH_KEY": "",
    "LG_SSH_PORT": "0", "LG_LEGACY_PORT": "0", "LG_HTTP_PORT": "0",
    "LG_GUEST_MEM": "1024", "LG_GUEST_SMP": "1", "LG_GUEST_ACCEL": "tcg", "LG_EXTRA_ARGS": "",
}


# How long a boot may take before a wait gives up: ~90 s on a quiet 2-core machine under TCG,
# over 300 s with the machine's cores busy elsewhere. Waits end as soon as the guest is there,
# so a generous bound costs nothing when all is well.
BOOT_TIMEOUT = 900.0
# A booting guest always prints (firmware, GRUB, kernel, systemd): this long a silence is a hang.
HANG_S = 240


class GuestError(AssertionError):
    """A command in the guest failed, or the guest did not do what it had to."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _stderr_to(path: Path):
    """Children started inside get `path` as their stderr (qemu's warnings and errors)."""
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Guest:
    """An appliance: power, serial console log, SSH commands, host-side ports."""

    def __init__(self, name: str, env_file: Path, workdir: Path, *, disk: Path | None = None,
                 ovmf_vars: Path | None = None, key: Path | None = None, extra_args: str = ""):
        self.name = name
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.disk = disk
        self._ports = {"ssh": free_port(), "legacy": free_port(), "http": free_port()}
        values = {
            "LG_DISK": str(disk or ""),
            "LG_DISK_FORMAT": "qcow2" if disk and disk.suffix == ".qcow2" else "raw",
            "LG_OVMF_VARS": str(ovmf_vars or ""),
            "LG_OVMF_CODE": os.environ.get("GUEST_OVMF_CODE", "/usr/share/OVMF/OVMF_CODE_4M.fd"),
            "LG_SSH_KEY": str(key or ""),
            "LG_SSH_PORT": str(self._ports["ssh"]),
            "LG_LEGACY_PORT": str(self._ports["legacy"]),
            "LG_HTTP_PORT": str(self._ports["http"]),
            "LG_GUEST_MEM": os.environ.get("GUEST_MEM", "1024"),
            "LG_GUEST_SMP": os.environ.get("GUEST_SMP", "1"),
            "LG_GUEST_ACCEL": os.environ.get("GUEST_ACCEL", "tcg"),
            "LG_EXTRA_ARGS": extra_args,
        }
        os.environ.update(values)
        self.env = Environment(str(env_file))
        self.target = self.env.get_target("main")
        for svc, port in self._ports.items():
            res = self.target.get_resource(NetworkService, name=svc, wait_avail=False)
            if res.port == 0:
                res.port = port
        self.strategy = self.target.get_driver("PowermeterStrategy")
        self.ssh = self.strategy.ssh
        self.host_address = self.env.config.get_option("host_address", "10.0.2.2")
        self.serial_path = self.dir / "serial.log"
        self.qemu_log = self.dir / "qemu.log"
        self.target.activate(self.strategy.console)
        self.console = ConsoleLog(self.strategy.console, self.serial_path)

    # --- power -------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        """A progress line (stderr, shown with -s and kept in the scenario's captured output)."""
        print(f"  [{self.name} {time.strftime('%H:%M:%S', time.gmtime())}] {msg}", flush=True)

    def power_on(self) -> None:
        """Power on (qemu starts; its stderr goes to qemu.log)."""
        with _stderr_to(self.qemu_log):
            self.strategy.transition(Status.on)
        self.log(f"powered on (ssh :{self.port('ssh')}, 9001 -> :{self.port('legacy')}, "
                 f"9002 -> :{self.port('http')}, serial {self.serial_path})")

    def boot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Power on and wait until powermeter is ready."""
        if self.strategy.status in (Status.unknown, Status.off):
            self.power_on()
        self.strategy.transition(Status.ready, timeout=timeout)

    def wait_ssh(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until a root shell over SSH works."""
        self.strategy.status = Status.on
        self.strategy.transition(Status.shell, timeout=timeout)

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait for SSH and powermeter.service active (READY=1 received)."""
        self.strategy.status = Status.on
        self.strategy.transition(Status.ready, timeout=timeout)

    def alive(self) -> bool:
        """The machine is powered (qemu still runs)."""
        return self.strategy.alive()

    def power_cut(self) -> None:
        """Pull the plug: qemu quits at once (what the guest had not written is lost)."""
        self.strategy.transition(Status.off)
        self.log("power cut")

    def boot_again(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Power on after a power cut, on the same disk, and wait for SSH."""
        self.power_on()
        self.wait_ssh(timeout)

    def boot_id(self) -> str:
        """The guest's current boot id."""
        return self.sh("cat /proc/sys/kernel/random/boot_id")

    def reboot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Clean reboot; returns once SSH answers with a new boot id.

        A qemu that goes silent right after the reset (no console output for HANG_S s, SSH
        down) is power-cycled once, loudly: twice in this project's runs a TCG guest stopped
        after OVMF's "BdsDxe: starting Boot0001" following a reboot, with not even the armed
        i6300esb firing, i.e. the emulation, not the appliance, hung. The console up to the
        hang is kept as serial.hang-N.log next to serial.log."""
        old = self.boot_id()
        start = self.console.mark()
        self.try_sh("systemctl reboot")
        self.wait_new_boot(old, start, timeout)

    def wait_new_boot(self, old: str, start: int, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until SSH answers with a boot id other than `old` after a reset the guest did
        itself (`systemctl reboot`, an emergency reset, its watchdog); `start`: the console mark
        from before the reset. A reset that hangs the emulation is power-cycled once (see
        `reboot`)."""
        self.strategy.disconnect()
        deadline = time.monotonic() + timeout
        seen = self.console.mark()
        quiet_since, cycled = time.monotonic(), False
        while time.monotonic() < deadline:
            if not self.alive():
                raise GuestError("qemu exited during the reboot")
            new = self.try_sh("cat /proc/sys/kernel/random/boot_id")
            if new and new != old:
                self.strategy.status = Status.shell
                return
            self.strategy.disconnect()
            if self.console.mark() != seen:
                seen, quiet_since = self.console.mark(), time.monotonic()
            elif not cycled and time.monotonic() - quiet_since > HANG_S and self._hung_before_kernel(start):
                n = len(list(self.dir.glob("serial.hang-*.log"))) + 1
                shutil.copyfile(self.serial_path, self.dir / f"serial.hang-{n}.log")
                self.log(f"QEMU HANG: no console output for {HANG_S} s after the reset "
                         f"(last: {self.console.text()[-120:]!r}); power-cycling once")
                self.power_cut()
                self.power_on()
                cycled, quiet_since = True, time.monotonic()
            time.sleep(3)
        raise GuestError(f"the guest did not come back within {timeout:.0f} s")

    def _hung_before_kernel(self, since: int) -> bool:
        """The console after `since` shows a reset (a reboot, or sysrq's emergency reset) and no
        kernel start after it."""
        text = self.console.since(since)
        reset = max(text.rfind("machine restart"), text.rfind("sysrq: Resetting"))
        return reset >= 0 and "Linux version" not in text[reset:]

    def close(self) -> None:
        """Power off and release everything (the overlay and logs stay)."""
        try:
            self.strategy.transition(Status.off)
        finally:
            self.console.close()
            self.target.cleanup()

    # --- commands ----------------------------------------------------------------------------

    def _run_once(self, cmd: str, timeout: float) -> tuple[int, str, str]:
        try:
            if self.strategy.status not in (Status.shell, Status.ready) or not self.ssh._check_keepalive():  # noqa: SLF001
                if not self.strategy.connect(10):
                    return 255, "", "no SSH connection"
                self.strategy.status = Status.shell
            out, err, rc = self.ssh.run(cmd, decodeerrors="replace", timeout=timeout)
            return rc, "\n".join(out), "\n".join(err)
        except subprocess.TimeoutExpired:
            return 124, "", f"timed out after {timeout:.0f} s"
        except Exception as e:  # labgrid ExecutionError/StateError: the connection is gone
            self.strategy.disconnect()
            self.strategy.status = Status.on
            return 255, "", str(e)

    def run(self, cmd: str, timeout: float = 300) -> tuple[int, str, str]:
        """Run the shell command `cmd` in the guest as root: (exit status, stdout, stderr).
        Retries while the connection itself fails (status 255), for up to 60 s."""
        deadline = time.monotonic() + 60
        while True:
            rc, out, err = self._run_once(cmd, timeout)
            if rc != 255 or time.monotonic() >= deadline or not self.alive():
                return rc, out, err
            time.sleep(2)

    def sh(self, cmd: str, timeout: float = 300) -> str:
        """Run `cmd`; its stdout (without the last newline). Fails the test on a non-zero exit."""
        rc, out, err = self.run(cmd, timeout)
        if rc != 0:
            raise GuestError(f"`{cmd}` in the guest: exit {rc}: {err.strip()[-300:] or out.strip()[-300:]}")
        return out

    def ok(self, cmd: str, timeout: float = 300) -> bool:
        """True when `cmd` exits 0 in the guest."""
        return self.run(cmd, timeout)[0] == 0

    def try_sh(self, cmd: str, timeout: float = 60) -> str | None:
        """One quick attempt (for a guest that may be rebooting): stdout, or None when the
        connection failed. The command's own exit status is ignored."""
        rc, out, _ = self._run_once(cmd, timeout)
        return None if rc in (255, 124) else out

    def push(self, local: Path, remote: str) -> None:
        """Copy a host file into the guest (atomically: written as REMOTE.part, then renamed)."""
        q = shlex.quote(remote)
        for _ in range(3):
            if self.strategy.status not in (Status.shell, Status.ready):
                self.strategy.connect(20)
                self.strategy.status = Status.shell
            ns = self.ssh.networkservice
            with open(local, "rb") as f:
                p = subprocess.run([self.ssh._ssh, "-x", *self.ssh.ssh_prefix, "-p", str(ns.port), "-l",  # noqa: SLF001
                                    ns.username, ns.address, f"cat > {q}.part && mv {q}.part {q}"],
                                   stdin=f, capture_output=True, timeout=900, check=False)
            if p.returncode == 0:
                return
            if p.returncode != 255:
                break
            self.strategy.disconnect()
            self.strategy.status = Status.on
        raise GuestError(f"could not copy {local} to the guest's {remote}: {p.stderr.decode()[-300:]}")

    # --- the appliance's ports as the host sees them -------------------------------------------

    def port(self, service: str) -> int:
        """The host-side port of `ssh`, `legacy` (9001) or `http` (9002)."""
        return self.target.get_resource(NetworkService, name=service, wait_avail=False).port

    def address(self, service: str) -> str:
        """The host-side address of a service."""
        return self.target.get_resource(NetworkService, name=service, wait_avail=False).address

    def count(self, timeout: float = 10) -> str:
        """What port 9001 answers (the old protocol: the count, then close)."""
        addr = (self.address("legacy"), self.port("legacy"))
        try:
            with socket.create_connection(addr, timeout=timeout) as s:
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
        except OSError as e:
            raise GuestError(f"port 9001 ({addr[0]}:{addr[1]}) did not answer within {timeout:.0f} s: {e}") from e
        return data.decode()

    def http(self, path: str, timeout: float = 10) -> tuple[int, str]:
        """GET `path` on port 9002: (status, body)."""
        url = f"http://{self.address('http')}:{self.port('http')}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (our own guest)
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str) -> str | None:
        """The value of a Prometheus sample on /metrics (None when it is not there)."""
        status, body = self.http("/metrics")
        if status != 200:
            raise GuestError(f"GET /metrics: HTTP {status}")
        for line in body.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == name:
                return parts[1]
        return None

    def ready_seconds(self) -> float:
        """Kernel start (CLOCK_MONOTONIC 0) to READY=1 of powermeter.service in this boot, in s."""
        us = int(self.sh("systemctl show -P ActiveEnterTimestampMonotonic powermeter.service") or 0)
        if us <= 0:
            raise GuestError("powermeter.service has not become active in this boot")
        return us / 1e6

    # --- artifacts ---------------------------------------------------------------------------

    def save_artifacts(self, dest: Path) -> None:
        """Serial console, qemu log and (when the guest answers) its journal (all boots), into
        `dest`."""
        dest.mkdir(parents=True, exist_ok=True)
        for src in (self.serial_path, self.qemu_log):
            if src.exists():
                shutil.copyfile(src, dest / src.name)
        if self.alive():
            journal = self.try_sh("journalctl --no-pager -o short-monotonic", timeout=120)
            if journal is not None:
                (dest / "journal.txt").write_text(journal + "\n")


def wait_until(fn, timeout: float, every: float = 2.0):
    """Call fn() until it returns something true, for at most `timeout` s; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(every)


def slot_from_cmdline(cmdline: str) -> str:
    """The RAUC slot (A or B) named by rauc.slot= on a kernel command line, or ''."""
    m = re.search(r"rauc\.slot=([A-Z])", cmdline)
    return m.group(1) if m else ""
