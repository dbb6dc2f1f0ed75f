"""The serial console of a guest, read all the time into a log file.

A guest's serial output must be consumed: a qemu chardev socket nobody reads stalls the guest's
UART once its buffer is full. So one thread per guest is the only reader of the labgrid console
driver; it appends everything to `serial.log` (the artifact of a failed scenario) and keeps the
text for `wait_for()`. Tests never `expect()` on the driver themselves.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path


class ConsoleLog:
    """Continuously reads `console` (a labgrid ConsoleProtocol driver) into `path`."""

    def __init__(self, console, path: Path):
        self._console = console
        self.path = path
        self._text: list[str] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 (closed by close())
        self._thread = threading.Thread(target=self._run, name=f"console-{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # the driver's own read primitive: the public read() records a labgrid step,
                # and steps are not thread-safe
                data = self._console._read(size=4096, timeout=0.5)  # noqa: SLF001
            except Exception:  # timeouts, a powered-off or restarting qemu
                time.sleep(0.2)
                continue
            if not data:
                time.sleep(0.2)
                continue
            self._file.write(data)
            with self._cond:
                self._text.append(data.decode("utf-8", "replace").replace("\r", ""))
                self._cond.notify_all()

    def text(self) -> str:
        """Everything read so far (all boots of this guest)."""
        with self._lock:
            return "".join(self._text)

    def mark(self) -> int:
        """A position in the log; `text(since=...)`/`wait_for(since=...)` look only after it."""
        return len(self.text())

    def since(self, mark: int) -> str:
        """The text read after `mark`."""
        return self.text()[mark:]

    def wait_for(self, pattern: str, timeout: float, since: int = 0) -> re.Match | None:
        """Wait until `pattern` (a regular expression) appears after `since`; None on timeout."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search("".join(self._text)[since:])
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 1.0))

    def close(self) -> None:
        """Stop reading (the log file stays)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._file.close()
