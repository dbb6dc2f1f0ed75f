"""The dependency list `cargo auditable` embeds in a Rust binary: zlib-compressed JSON in the
ELF section `.dep-v0` (the format cargo-audit, trivy, grype and syft read).

Standard library only, any ELF class and byte order: it reads aarch64 and armv7 binaries on x86.
"""

from __future__ import annotations

import json
import struct
import zlib

SECTION = b".dep-v0"


class NoAuditData(Exception):
    """The file is not an ELF file built with `cargo auditable`."""


def elf_section(data: bytes, name: bytes) -> bytes | None:
    """The contents of ELF section `name`, or None when there is no such section."""
    if data[:4] != b"\x7fELF":
        raise NoAuditData("not an ELF file")
    end = "<" if data[5] == 1 else ">"
    if data[4] == 2:  # ELFCLASS64
        (shoff,) = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
        fmt = end + "IIQQQQIIQQ"
    else:
        (shoff,) = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x2E)
        fmt = end + "IIIIIIIIII"
    # (name, type, flags, addr, offset, size, ...)
    headers = [struct.unpack_from(fmt, data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx]
    names = data[strtab[4] : strtab[4] + strtab[5]]
    for h in headers:
        if names[h[0] : names.index(b"\0", h[0])] == name:
            return data[h[4] : h[4] + h[5]]
    return None


def read(path: str) -> dict:
    """The embedded dependency data of the binary at `path` ({"packages": [...]})."""
    try:
        with open(path, "rb") as f:
            raw = elf_section(f.read(), SECTION)
    except struct.error as e:
        raise NoAuditData(f"{path}: truncated ELF file ({e})") from e
    except NoAuditData as e:
        raise NoAuditData(f"{path}: {e}") from e
    if raw is None:
        raise NoAuditData(f"{path}: no {SECTION.decode()} section: not built with cargo auditable")
    return json.loads(zlib.decompress(raw))


def runtime_packages(data: dict) -> set[tuple[str, str]]:
    """(name, version) of the packages compiled into the binary (build-only ones left out)."""
    return {(p["name"], p["version"]) for p in data["packages"] if p.get("kind", "runtime") == "runtime"}


def missing_from(listed: set[tuple[str, str]], path: str) -> list[str]:
    """The crates compiled into the binary at `path` that `listed` ((name, version) pairs, e.g. an
    SBOM's components) does not have, as sorted "name version" strings."""
    return sorted(f"{n} {v}" for n, v in runtime_packages(read(path)) - listed)
