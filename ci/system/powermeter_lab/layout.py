"""Where things are: the repository, the build directory, the appliances under test (the qemu
x86-64 image and the arm64 Pi 4 image booted under qemu -M virt) and their disk layouts (read
from each image's `layout.env`, the one source its build uses too)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
MIB = 1024 * 1024


def build_dir() -> Path:
    """`$POWERMETER_BUILD_DIR` or `<repo>/build`."""
    return Path(os.environ.get("POWERMETER_BUILD_DIR") or REPO / "build")


def qemu_build() -> Path:
    """`build/qemu`: what `images/qemu/build` writes."""
    return build_dir() / "qemu"


@dataclass(frozen=True)
class Appliance:
    """One Debian-built image under test: where its build writes, its layout, its RAUC
    compatible, and the labgrid environment that boots it in qemu."""

    name: str
    build_subdir: str
    layout_env: Path
    compatible: str
    env_file: Path
    # the daemon configuration its test disk is provisioned with (None: the image's default)
    test_config: Path | None = None

    @property
    def build(self) -> Path:
        """build/<subdir>: what the image's build writes (rootfs.img, bundles, the disk)."""
        return build_dir() / self.build_subdir


X86 = Appliance("qemu-x86_64", "qemu", REPO / "images" / "qemu" / "layout.env", "powermeter-debian-qemu-x86_64",
                REPO / "ci" / "system" / "env" / "qemu-x86_64.yaml")
# The Pi image's default counts GPIO 27, which qemu -M virt does not have: its test disk is a
# device provisioned with the qemu image's simulated meter (/data/etc/powermeter/powermeter.toml).
ARM64 = Appliance("qemu-arm64", "rpi4", REPO / "images" / "rpi4" / "layout.env", "powermeter-debian-rpi4",
                  REPO / "ci" / "system" / "env" / "qemu-arm64.yaml",
                  REPO / "images" / "qemu" / "rootfs" / "overlay" / "usr" / "share" / "powermeter" / "powermeter.toml")
APPLIANCES = {a.name: a for a in (X86, ARM64)}


@dataclass(frozen=True)
class Layout:
    """Partition sizes and the dm-verity hash offset of an appliance's disk."""

    esp_mib: int
    slot_mib: int
    data_mib: int
    verity_hash_offset: int

    @property
    def slot_a_offset(self) -> int:
        """Byte offset of slot A (p2) on the disk."""
        return (1 + self.esp_mib) * MIB

    @property
    def data_offset(self) -> int:
        """Byte offset of the data partition (p4) on the disk."""
        return (1 + self.esp_mib + 2 * self.slot_mib) * MIB


def layout(path: Path | None = None) -> Layout:
    """Read a layout.env (default: the qemu x86 image's) by sourcing it in bash, exactly as the
    build does. The boot partition is ESP_SIZE_MIB (qemu) or BOOT_SIZE_MIB (Pi)."""
    env = path or (REPO / "images" / "qemu" / "layout.env")
    out = subprocess.run(
        ["bash", "-c",
         '. "$1" && echo "${ESP_SIZE_MIB:-$BOOT_SIZE_MIB} $SLOT_SIZE_MIB $DATA_SIZE_MIB $VERITY_HASH_OFFSET"',
         "layout", str(env)],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    esp, slot, data, off = (int(v) for v in out)
    return Layout(esp, slot, data, off)
