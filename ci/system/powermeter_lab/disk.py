"""Disks for guests: one pristine test disk per build, and a qcow2 overlay per guest.

The factory image (`build/qemu/disk.img`) has no SSH key, so nothing can log in. The test disk
is a copy with the test key written into `/data/ssh/authorized_keys` of its data partition
(`images/qemu/provision-key`: debugfs, no mount needed). It is made once per image build and
never booted itself: every guest boots a qcow2 overlay backed by it, bigger than the image so
that the data partition grows at first boot, as it does on a real card. A scenario that wants a
fresh machine takes a new overlay; nothing is ever rebuilt for it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .layout import MIB, REPO, qemu_build


@contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (a lock file), so parallel workers make a file once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ssh_key(build: Path | None = None) -> Path:
    """The test SSH key (ed25519, no pass phrase), made once in build/qemu/testkey/."""
    key = (build or qemu_build()) / "testkey" / "id_ed25519"
    with _locked(key.parent / ".lock"):
        if not key.exists() or key.stat().st_size == 0:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "powermeter-test",
                            "-f", str(key)], check=True)
    return key


def provision_key(disk: Path, pub: Path, config: Path | None = None) -> None:
    """Write `pub` as /data/ssh/authorized_keys (root, 0600), and `config` as the device's daemon
    configuration, into the data partition of the raw disk image `disk`
    (images/qemu/provision-key, which images/qemu/run uses too)."""
    p = subprocess.run([str(REPO / "images" / "qemu" / "provision-key"), str(disk), str(pub),
                        *([str(config)] if config else [])],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip() or f"provision-key {disk} failed")


def pristine(image: Path, key: Path, config: Path | None = None) -> Path:
    """The test disk: <image dir>/test/pristine.img, a copy of `image` with the public half of
    `key` (and `config`, when given) provisioned. Remade when the image, the key or the config is
    newer. Safe from parallel workers."""
    if not image.exists():
        raise FileNotFoundError(f"no {image}: build the image first (ci/system-test does)")
    out = image.parent / "test" / "pristine.img"
    with _locked(out.parent / ".pristine.lock"):
        newest = max(image.stat().st_mtime, key.stat().st_mtime, config.stat().st_mtime if config else 0)
        if not out.exists() or out.stat().st_mtime < newest:
            tmp = out.with_suffix(".tmp")
            subprocess.run(["cp", "--sparse=always", str(image), str(tmp)], check=True)
            provision_key(tmp, Path(f"{key}.pub"), config)
            tmp.rename(out)
    return out


def overlay(base: Path, path: Path, grow_mib: int = 256) -> Path:
    """A new qcow2 overlay at `path` backed by the raw `base`, `grow_mib` bigger than it (the
    card is bigger than the image: the data partition grows into the rest at first boot)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    size = base.stat().st_size + grow_mib * MIB
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base.resolve()),
                    str(path), str(size)], check=True)
    return path


def raw_copy(base: Path, path: Path) -> Path:
    """A sparse raw copy of `base` at `path`, for a guest whose disk is patched on the host
    before it boots (a few seconds; the overlay way would need qemu-io)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "--sparse=always", str(base), str(path)], check=True)
    return path


def with_boot_folder(base: Path, path: Path, files: dict[str, bytes], grow_mib: int = 256) -> Path:
    """A sparse raw copy of `base` at `path`, `grow_mib` bigger (as a card is bigger than the
    image), with `files` in the folder powermeter/ of its FAT boot partition: what an owner
    writes there after flashing, for the first-boot import (images/qemu/boot-folder, which
    images/qemu/run --boot-folder uses too)."""
    raw_copy(base, path)
    os.truncate(path, base.stat().st_size + grow_mib * MIB)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        p = subprocess.run([str(REPO / "images" / "qemu" / "boot-folder"), str(path), tmp],
                           capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip() or f"boot-folder {path} failed")
    return path


def xor_byte(disk: Path, offset: int, mask: int = 0xFF) -> tuple[int, int]:
    """Flip bits of one byte of a raw disk image; returns (old, new)."""
    with open(disk, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ mask]))
    return old, old ^ mask


def copy_vars(template: Path, dest: Path) -> Path:
    """A private copy of OVMF's variable store for one guest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, dest)
    return dest
