"""Signed RAUC test bundles, and the HTTP server the guest streams them from.

Test bundles are made from the build's slot image (build/qemu/rootfs.img, or build/rpi4/ for
the arm64 Pi image: every function takes the `Appliance`, default the x86 one) by repacking its
squashfs with another version in os-release (and, for the `unhealthy` variant, a powermeterd
that exits at once), then formatting a fresh dm-verity tree at VERITY_HASH_OFFSET and signing
with the development PKI through `images/qemu/bundle`: real bootable roots, each with its own
verity tree and root hash. They are cached under build/<image>/ota/ (remade when rootfs.img is
newer), so parallel groups and later runs share them.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from .disk import _locked
from .layout import REPO, X86, Appliance, layout

COMPATIBLE = X86.compatible


def cache(app: Appliance = X86) -> Path:
    """build/<image>/ota: bundles, their slot images' root hashes, the served directory."""
    return app.build / "ota"


def _os_release_version(tree: Path) -> str:
    for f in (tree / "etc" / "os-release", tree / "usr" / "lib" / "os-release"):
        if f.is_file() and not f.is_symlink():
            m = re.search(r'^IMAGE_VERSION="?([^"\n]*)"?$', f.read_text(), re.M)
            return m.group(1) if m else ""
    return ""


def base_version(app: Appliance = X86) -> str:
    """IMAGE_VERSION of the built slot image."""
    with tempfile.TemporaryDirectory() as d:
        tree = Path(d) / "t"
        subprocess.run(["unsquashfs", "-q", "-n", "-d", str(tree), str(app.build / "rootfs.img"),
                        "etc/os-release", "usr/lib/os-release"], capture_output=True, check=False)
        return _os_release_version(tree) or "0"


def _stale(out: Path, app: Appliance = X86) -> bool:
    src = app.build / "rootfs.img"
    return not out.exists() or out.stat().st_size == 0 or out.stat().st_mtime < src.stat().st_mtime


def repack(src: Path, out: Path, version: str, variant: str = "normal", app: Appliance = X86) -> str:
    """Write the slot image `out` (squashfs + verity tree) with IMAGE_VERSION=`version`; its
    root hash goes to out.roothash and is returned."""
    offset = layout(app.layout_env).verity_hash_offset
    with tempfile.TemporaryDirectory(dir=out.parent) as d:
        tree = Path(d) / "tree"
        subprocess.run(["unsquashfs", "-q", "-n", "-d", str(tree), str(src)], check=True, capture_output=True)
        if not _os_release_version(tree):
            raise RuntimeError("no IMAGE_VERSION in the image's os-release")
        for f in (tree / "etc" / "os-release", tree / "usr" / "lib" / "os-release"):
            if f.is_file() and not f.is_symlink():
                f.write_text(re.sub(r"^IMAGE_VERSION=.*$", f"IMAGE_VERSION={version}", f.read_text(), flags=re.M))
        if variant == "unhealthy":
            # a broken build: the daemon exits at once, so it is never ready nor healthy
            daemon = tree / "usr" / "bin" / "powermeterd"
            if not daemon.exists():
                raise RuntimeError(f"no /usr/bin/powermeterd in {src}")
            daemon.write_text(f'#!/bin/sh\necho "powermeterd: deliberately broken test build {version}" >&2\nexit 1\n')
            daemon.chmod(0o755)
        info = subprocess.run(["unsquashfs", "-s", str(src)], capture_output=True, text=True, check=True).stdout
        comp = (re.search(r"^Compression (\S+)", info, re.M) or [None, "gzip"])[1]
        bs = (re.search(r"^Block size (\d+)", info, re.M) or [None, "131072"])[1]
        out.unlink(missing_ok=True)
        subprocess.run(["mksquashfs", str(tree), str(out), "-noappend", "-quiet", "-comp", comp, "-b", bs,
                        "-processors", str(os.cpu_count() or 1)], check=True, capture_output=True)
    size = out.stat().st_size
    if size > offset:
        raise RuntimeError(f"repacked squashfs ({size}) is larger than VERITY_HASH_OFFSET ({offset})")
    dump = subprocess.run(["veritysetup", "dump", f"--hash-offset={offset}", str(src)],
                          capture_output=True, text=True, check=True).stdout

    def field(name: str, default: str) -> str:
        m = re.search(rf"^{name}:\s*(\S+)", dump, re.M)
        return m.group(1) if m else default

    dbs = int(field("Data block size", "4096"))
    with open(out, "r+b") as f:
        f.truncate(offset)
    fmt = subprocess.run(["veritysetup", "format", str(out), str(out), f"--hash-offset={offset}",
                          f"--data-blocks={(size + dbs - 1) // dbs}", f"--hash={field('Hash algorithm', 'sha256')}",
                          f"--data-block-size={dbs}", f"--hash-block-size={field('Hash block size', '4096')}",
                          f"--format={field('Hash type', '1')}"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"^Root hash:\s*([0-9a-f]+)", fmt, re.M)
    if not m:
        raise RuntimeError("veritysetup format printed no root hash")
    out.with_suffix(".roothash").write_text(m.group(1) + "\n")
    return m.group(1)


def _bundle_cmd(out: Path, version: str, compatible: str, rootfs: Path | None = None, env=None,
                app: Appliance = X86) -> None:
    cmd = [str(REPO / "images" / "qemu" / "bundle"), "--version", version, "--compatible", compatible,
           "--output", str(out), "--layout", str(app.layout_env)]
    if rootfs:
        cmd += ["--rootfs", str(rootfs)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    (out.parent / "bundle.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"images/qemu/bundle failed: {(p.stdout + p.stderr).strip()[-300:]}")


class Bundle:
    """A bundle file and the root hash of the slot image inside."""

    def __init__(self, path: Path, roothash: str | None = None):
        self.path = path
        self.roothash = roothash

    @property
    def name(self) -> str:
        return self.path.name


@contextmanager
def _building(out: Path, app: Appliance = X86):
    """Yields True when `out` must be (re)made, holding a lock on its directory, so that
    parallel workers make a cached bundle once."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent / ".lock"):
        yield _stale(out, app)


def make(version: str, variant: str = "normal", compatible: str | None = None, app: Appliance = X86) -> Bundle:
    """A signed bundle of the build's root with IMAGE_VERSION=`version` (cached)."""
    compatible = compatible or app.compatible
    d = cache(app) / f"{variant}-{version}"
    out = d / f"{compatible}-{version}.raucb"
    with _building(out, app) as stale:
        if stale:
            img = d / "rootfs.img"
            repack(app.build / "rootfs.img", img, version, variant, app)
            _bundle_cmd(out, version, compatible, rootfs=img, app=app)
            img.unlink()
    return Bundle(out, (d / "rootfs.roothash").read_text().strip())


def incompatible() -> Bundle:
    """The build's own slot image in a bundle for the same board from another builder
    (powermeter-buildroot-qemu_x86_64): its slots are not interchangeable, so it must be refused."""
    out = cache() / "incompatible" / "powermeter-buildroot-qemu_x86_64-0.raucb"
    with _building(out) as stale:
        if stale:
            _bundle_cmd(out, "0", "powermeter-buildroot-qemu_x86_64")
    return Bundle(out)


def built(app: Appliance = X86) -> Bundle:
    """The bundle the image's build wrote (the newest)."""
    found = sorted(app.build.glob(f"{app.compatible}-*.raucb"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {app.build}/{app.compatible}-*.raucb (the image build makes it)")
    return Bundle(found[-1])


def foreign() -> Bundle:
    """The build's slot image signed by a CA the device does not know."""
    out = cache() / "reject" / "foreign.raucb"
    with _building(out) as stale:
        if stale:
            env = dict(os.environ, POWERMETER_BUILD_DIR=str(out.parent / "other-pki"))
            subprocess.run([str(REPO / "signing" / "dev-pki")], env=dict(env, POWERMETER_PKI_ORG="not powermeter"),
                           check=True, capture_output=True)
            _bundle_cmd(out, "0-foreign", COMPATIBLE, rootfs=X86.build / "rootfs.img", env=env)
    return Bundle(out)


# --- serving bundles to the guest ---------------------------------------------------------------

class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of files in the served directory, with HTTP range requests (RAUC's streaming
    reads the bundle in ranges through nbd)."""

    protocol_version = "HTTP/1.1"
    root: Path = Path(".")

    def log_message(self, *args):  # quiet
        pass

    def _head(self, body: bool):
        p = self.root / os.path.basename(self.path.split("?")[0])
        if not p.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        size = p.stat().st_size
        start, end = 0, size - 1
        m = re.match(r"bytes=(\d*)-(\d*)$", self.headers.get("Range", ""))
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else size - 1
            else:
                start = max(0, size - int(m.group(2)))
            end = min(end, size - 1)
            if start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        return (p, start, end) if body else None

    def do_HEAD(self):  # noqa: N802
        self._head(False)

    def do_GET(self):  # noqa: N802
        r = self._head(True)
        if not r:
            return
        p, start, end = r
        with open(p, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)


class BundleServer:
    """An HTTP server on 127.0.0.1 (a free port) for `rauc install http://...` in the guest,
    which reaches it at `host_address` (10.0.2.2 through qemu's user network)."""

    def __init__(self, directory: Path, host_address: str):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        handler = type("Handler", (_RangeHandler,), {"root": self.dir})
        self._srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._srv.daemon_threads = True
        self.port = self._srv.server_address[1]
        self.host_address = host_address
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._thread.start()

    def url(self, bundle: Bundle) -> str:
        """Serve `bundle` and return its URL as the guest sees it."""
        link = self.dir / bundle.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(bundle.path)
        return f"http://{self.host_address}:{self.port}/{bundle.name}"

    def close(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()


def copy_truncated(src: Path, out: Path, cut: int) -> Path:
    """`src` without its last `cut` bytes (a truncated download)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f, open(out, "wb") as o:
        o.write(f.read(src.stat().st_size - cut))
    return out


def copy_file(src: Path, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out)
    return out

