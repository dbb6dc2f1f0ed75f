"""Where things are: the repository, the build directory, and the disk layout of the qemu
appliance (read from `images/qemu/layout.env`, the one source the image build uses too)."""

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
class Layout:
    """Partition sizes and the dm-verity hash offset of the qemu appliance's disk."""

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
    """Read layout.env by sourcing it in bash, exactly as the build does."""
    env = path or (REPO / "images" / "qemu" / "layout.env")
    out = subprocess.run(
        ["bash", "-c", '. "$1" && echo "$ESP_SIZE_MIB $SLOT_SIZE_MIB $DATA_SIZE_MIB $VERITY_HASH_OFFSET"',
         "layout", str(env)],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    esp, slot, data, off = (int(v) for v in out)
    return Layout(esp, slot, data, off)
