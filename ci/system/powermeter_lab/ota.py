"""The update side of a guest: RAUC installs, the A/B boot variables, rollbacks.

The qemu appliance keeps RAUC's grub variables in the ESP's grubenv (ORDER, A_OK/A_TRY,
B_OK/B_TRY, A_ROOTHASH/B_ROOTHASH); `powermeter-mark-good.service` marks the booted slot good
once powermeter is healthy.
"""

from __future__ import annotations

import contextlib
import re
import time

from .bundles import Bundle, BundleServer
from .guest import Guest, GuestError, slot_from_cmdline

# RAUC before 1.15 races udev when it sets up the nbd device of a streamed bundle: the device is
# created with NBD_CFLAG_DISCONNECT_ON_CLOSE, udev opens and closes it for probing before RAUC
# has opened it, the kernel disconnects it, and mounting the bundle fails with E2BIG from
# dm-verity ("Hash device is too small"). Fixed upstream in rauc commit cfe93c93 (1.15); trixie
# ships 1.13. Nothing is touched by then, so such an install is retried once, and the retry is
# logged (images/qemu/rauc/README.md, "Known issues").
NBD_RACE = "Failed mounting bundle: Failed to load dm table: Argument list too long"
GRUBENV = "/boot/efi/EFI/BOOT/grubenv"


def other(slot: str) -> str:
    return "B" if slot == "A" else "A"


def dev(slot: str) -> str:
    return f"/dev/disk/by-partlabel/rootfs-{slot.lower()}"


def _tail(text: str, n: int) -> str:
    lines = [line for line in text.splitlines() if not line.startswith("rauc-nbd") and "nbd " not in line]
    return " ".join(lines[-n:])


class Updater:
    """RAUC on `guest`, with bundles served by `server`."""

    def __init__(self, guest: Guest, server: BundleServer):
        self.g = guest
        self.server = server

    def booted(self) -> str:
        slot = slot_from_cmdline(self.g.sh("cat /proc/cmdline"))
        if not slot:
            raise GuestError("cannot tell the booted slot")
        return slot

    def current(self) -> tuple[str, str, str]:
        """(the booted slot, the other slot, the running IMAGE_VERSION)."""
        old = self.booted()
        return old, other(old), self.version()

    def expect_rollback(self, old: str, oldv: str, new: str, timeout: float, what: str) -> None:
        """Reboot into the trial of `new` and wait until the guest is back on `old` (running
        `oldv`, marked good) with `new` marked bad; `what` names the bad slot in messages."""
        with contextlib.suppress(GuestError):  # the guest may come up on the trial slot first
            self.g.reboot()
        self.wait_good(old, timeout)
        assert self.version() == oldv, f"running '{self.version()}', expected the old '{oldv}'"
        assert self.env().get(f"{new}_OK") == "0", f"the {what} slot {new} is not marked bad: {self.env()}"

    def version(self) -> str:
        return self.g.sh('. /etc/os-release; echo "$IMAGE_VERSION"')

    def env(self) -> dict[str, str]:
        lines = self.g.sh(f"grub-editenv {GRUBENV} list").splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def slot_is(self, slot: str, ok: str, tries: str) -> bool:
        e = self.env()
        return e.get(f"{slot}_OK") == ok and e.get(f"{slot}_TRY") == tries

    def count(self) -> int:
        return int(self.g.sh("exec 3<>/dev/tcp/127.0.0.1/9001 && cat <&3"))

    def snapshot(self) -> str:
        """What a refused bundle must not change: boot variables, RAUC's view, the inactive slot."""
        o = other(self.booted())
        return self.g.sh(f"grub-editenv {GRUBENV} list | sort; rauc status --detailed --output-format=shell | "
                         "grep -v -e _INSTALLED_TIMESTAMP= -e _ACTIVATED_TIMESTAMP= | sort; "
                         f"head -c 67108864 {dev(o)} | sha256sum")

    def _nbd_race(self, out: str) -> bool:
        if NBD_RACE not in out:
            return False
        self.g.log("RAUC < 1.15 nbd/udev race while mounting the streamed bundle (rauc commit cfe93c93): retrying once")
        return True

    def install(self, bundle: Bundle, how: str = "url") -> None:
        """Install `bundle` (from a URL, streamed; or `file`: copied to /data first when there is
        room). Fails the test when RAUC refuses."""
        src = None
        if how == "file":
            free = int(self.g.sh("df --output=avail -B1 /data | tail -n1").strip() or 0)
            if free > bundle.path.stat().st_size + 64 * 1024 * 1024:
                self.g.push(bundle.path, "/data/ota.raucb")
                src = "/data/ota.raucb"
            else:
                self.g.log(f"no room for the bundle on /data ({free} bytes free): installing from a URL")
        if src is None:
            src = self.server.url(bundle)
        for attempt in (1, 2):
            rc, out, err = self.g.run(f"rauc install {src} 2>&1; rc=$?; rm -f /data/ota.raucb; exit $rc", timeout=1200)
            if rc == 0:
                self.g.log(f"installed {src}: {out.strip().splitlines()[-1:]}")
                return
            if attempt == 1 and self._nbd_race(out):
                continue
            raise GuestError(f"rauc install {src} failed: {_tail(out + err, 5)}")

    def expect_refused(self, bundle: Bundle, pattern: str) -> None:
        """`rauc install` (from a URL) fails saying `pattern` (a regex), and nothing changes."""
        before = self.snapshot()
        url = self.server.url(bundle)
        # what the client prints, then what rauc.service logged for it (handler output)
        cmd = (f"t=$(date +%s); rauc install {url} 2>&1; rc=$?; "
               "journalctl -u rauc --since @$t --no-pager -o cat | grep -v -e nbd -e '^rauc-'; exit $rc")
        rc, out, _ = self.g.run(cmd, timeout=900)
        if rc != 0 and self._nbd_race(out):
            rc, out, _ = self.g.run(cmd, timeout=900)
        assert rc != 0, f"rauc install accepted {bundle.name}"
        m = re.search(pattern, out)
        assert m, f"refused, but not saying '{pattern}': {_tail(out, 3)}"
        self.g.log(f"refused: {next(line for line in out.splitlines() if re.search(pattern, line))}")
        after = self.snapshot()
        assert before == after, f"a refused bundle changed the slots: before {before!r}, after {after!r}"

    def wait_good(self, slot: str, timeout: float) -> None:
        """Wait until the guest runs `slot` and has marked it good."""
        deadline = time.monotonic() + timeout
        b = s = None
        while time.monotonic() < deadline:
            cmdline = self.g.try_sh("cat /proc/cmdline")
            b = slot_from_cmdline(cmdline) if cmdline else None
            if b == slot:
                s = self.g.try_sh("systemctl show -P ActiveState powermeter-mark-good.service")
                if s == "active":
                    return
                if s == "failed":
                    self.g.log(f"slot {slot} booted but not marked good (waiting for GRUB to go on)")
            time.sleep(5)
        raise GuestError(f"slot {slot} not booted and marked good within {timeout:.0f} s "
                         f"(last booted: {b or 'none'}, mark-good: {s or '?'})")
