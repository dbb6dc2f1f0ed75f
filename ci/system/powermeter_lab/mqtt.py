"""A broker on the host for the appliance's MQTT publisher, and a minimal subscriber.

`Broker` runs Debian's mosquitto on a free port of 127.0.0.1, which a qemu guest reaches as
10.0.2.2 (user networking), with one user and password. `Subscriber` speaks just enough
MQTT 3.1.1 (CONNECT, SUBSCRIBE, PUBLISH at QoS 0) to collect what arrives, retained or not: no
Python MQTT package is needed.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from .guest import free_port


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


class Broker:
    """mosquitto on 127.0.0.1:`port` with user `user` / `password`; stop() ends it."""

    def __init__(self, user: str = "meter", password: str = "system test pw") -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(exe):
            raise AssertionError("mosquitto is not installed (ci/setup installs it)")
        self.user, self.password = user, password
        self.dir = Path(tempfile.mkdtemp(prefix="powermeter-mqtt-"))
        self.port = free_port()
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(self.dir / "passwd"), user, password], check=True)
        root = "user root\n" if os.geteuid() == 0 else ""
        (self.dir / "mosquitto.conf").write_text(
            f"{root}persistence false\nlistener {self.port} 127.0.0.1\nallow_anonymous false\n"
            f"password_file {self.dir / 'passwd'}\nlog_dest file {self.dir / 'mosquitto.log'}\n")
        self.proc = subprocess.Popen([exe, "-c", str(self.dir / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"mosquitto did not listen on {self.port}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Subscriber:
    """Subscribes to `topics` on the broker and collects (topic, payload, retained) tuples."""

    def __init__(self, broker: Broker, topics: list[str]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
        self.buf = b""
        self.seen: list[tuple[str, str, bool]] = []
        body = _string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60) + _string(f"systest-{os.getpid()}")
        body += _string(broker.user) + _string(broker.password)
        self.sock.sendall(bytes([0x10]) + _remaining_length(len(body)) + body)
        kind, payload = self._packet(10)
        if kind != 0x20 or payload[1] != 0:
            raise AssertionError(f"the broker refused the test subscriber: {kind:#x} {payload!r}")
        body = struct.pack("!H", 1) + b"".join(_string(t) + b"\x00" for t in topics)
        self.sock.sendall(bytes([0x82]) + _remaining_length(len(body)) + body)

    def _read(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the broker closed the test subscriber's connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _packet(self, timeout: float) -> tuple[int, bytes]:
        deadline = time.monotonic() + timeout
        first = self._read(1, deadline)[0]
        length, mult = 0, 1
        while True:
            b = self._read(1, deadline)[0]
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        return first, self._read(length, deadline)

    def wait_for(self, what: str, want, timeout: float = 60) -> tuple[str, str, bool]:
        """The first publication (topic, payload, retained) that `want` accepts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                first, body = self._packet(deadline - time.monotonic())
            except TimeoutError:
                break
            if first >> 4 != 3:
                continue
            n = struct.unpack("!H", body[:2])[0]
            msg = (body[2:2 + n].decode(), body[2 + n:].decode(errors="replace"), bool(first & 1))
            self.seen.append(msg)
            if want(*msg):
                return msg
        raise AssertionError(f"no {what} within {timeout:.0f} s; seen: {[m[0] for m in self.seen][-20:]}")

    def close(self) -> None:
        self.sock.close()
