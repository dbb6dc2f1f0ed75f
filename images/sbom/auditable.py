"""The dependency list `cargo auditable` embeds in a Rust binary: zlib-compressed JSON in the
ELF section `.dep-v0` (the format cargo-audit, trivy, grype and syft read).

Reads it back (`read`), and writes the same list from `cargo metadata` (`from_metadata`,
`encode`) for builders that have no cargo-auditable (Yocto, Buildroot: images/sbom/embed-audit-data).

Standard library only, any ELF class and byte order: it reads aarch64 and armv7 binaries on x86.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections import defaultdict

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


# Dependency kinds from weakest to strongest, as cargo-auditable orders them.
_DEV, _BUILD, _RUNTIME = 0, 1, 2
_KINDS = {None: _RUNTIME, "normal": _RUNTIME, "build": _BUILD, "dev": _DEV}
_CRATES_IO = "registry+https://github.com/rust-lang/crates.io-index"


def _strongest(dep: dict) -> int:
    return max((_KINDS[k["kind"]] for k in dep.get("dep_kinds", [])), default=_RUNTIME)


def _source(package: dict) -> str:
    source = package.get("source")
    if source is None:
        return "local"
    if source == _CRATES_IO:
        return "crates.io"
    return source.split("+", 1)[0]


def from_metadata(metadata: dict) -> dict:
    """The dependency list cargo-auditable (format 1) records for the root package of `metadata`:
    the output of `cargo metadata --format-version 1 --filter-platform TARGET` run in the package's
    directory with the features of the build. Same walk, same order, same fields, so that the
    JSON is the one `cargo auditable build` would embed (ci/check-supply-chain compares them)."""
    resolve = metadata.get("resolve") or {}
    root = resolve.get("root")
    if root is None:
        raise ValueError("cargo metadata has no root package: run it in the package's directory, without --no-deps")
    nodes = {n["id"]: n for n in resolve["nodes"]}
    proc_macros = {
        p["id"]
        for p in metadata["packages"]
        if len(p["targets"]) == 1 and p["targets"][0]["kind"] == ["proc-macro"]
    }
    # Breadth-first, a package's kind is the strongest over every path to it; a dependency of a
    # build dependency (or of a proc macro) is a build dependency.
    kind = {root: _RUNTIME}
    queue = [nodes[root]]
    while queue:
        following = []
        for parent in queue:
            for dep in parent["deps"]:
                child = dep["pkg"]
                k = min(_strongest(dep), kind[parent["id"]])
                if child in proc_macros:
                    k = min(k, _BUILD)
                if child not in kind or k > kind[child]:
                    kind[child] = k
                    following.append(nodes[child])
        queue = following
    packages = sorted(
        (p for p in metadata["packages"] if kind.get(p["id"], _DEV) != _DEV),
        key=lambda p: (p["name"], p["id"]),
    )
    index = {p["id"]: i for i, p in enumerate(packages)}
    deps: dict[str, list[int]] = defaultdict(list)
    for node in resolve["nodes"]:
        if node["id"] in index:
            deps[node["id"]] = sorted(index[d["pkg"]] for d in node["deps"] if _strongest(d) != _DEV)
    out = []
    for p in packages:
        entry: dict = {"name": p["name"], "version": p["version"], "source": _source(p)}
        if kind[p["id"]] == _BUILD:
            entry["kind"] = "build"
        if deps[p["id"]]:
            entry["dependencies"] = deps[p["id"]]
        if p["id"] == root:
            entry["root"] = True
        out.append(entry)
    return {"packages": out, "format": 1}


def encode(data: dict) -> bytes:
    """The section's contents: the JSON as serde_json writes it (compact), zlib-compressed."""
    return zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 7)
