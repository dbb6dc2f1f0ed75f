"""The licenses the images' recipes must declare for powermeterd's binaries: the package's own
(Cargo.toml, "MIT OR Apache-2.0", whose two texts the repository ships) and every license of a
crate compiled into the binaries that those two do not cover, with the crates' license files.

A crate is covered when one of the choices its SPDX expression offers needs only MIT and
Apache-2.0 (the texts every image already ships): "MIT", "Apache-2.0 OR MIT", "Unlicense OR MIT".
Otherwise the choice with the fewest other licenses is taken and those licenses are "extra":
ring ("Apache-2.0 AND ISC") needs ISC, subtle ("BSD-3-Clause") BSD-3-Clause. Only crates that
end up in the binaries count: the normal dependencies of the package, not build dependencies,
proc macros and what they use, or dev-dependencies, over every target and feature the images
build.

Used by ci/check-yocto and ci/check-buildroot (the recipes' LICENSE and license files), and
images/sbom/crate-licenses (the same as JSON, for a person updating the recipes).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

# The texts the repository ships (LICENSE-MIT, LICENSE-APACHE).
SHIPPED = frozenset({"MIT", "Apache-2.0"})
# What the images build: the Pi 4 (aarch64), the Pi Zero W / Pi 1 (ARMv6), armv7, qemu x86-64.
TARGETS = (
    "x86_64-unknown-linux-gnu",
    "aarch64-unknown-linux-gnu",
    "armv7-unknown-linux-gnueabihf",
    "arm-unknown-linux-gnueabi",
)
FEATURES = "gpio,rppal"
# The names a crate's license texts have at its top (ring: LICENSE, LICENSE-BoringSSL, ...).
LICENSE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)


def choices(expression: str) -> list[frozenset[str]]:
    """The ways to comply with an SPDX expression (its disjunctive normal form): each a set of
    license ids that must all be followed. "/" is the old spelling of OR."""
    tokens = re.findall(r"\(|\)|[^\s()/]+|/", expression)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def either() -> list[frozenset[str]]:
        out = both()
        while peek() in ("OR", "or", "/"):
            take()
            out = out + both()
        return out

    def both() -> list[frozenset[str]]:
        out = one()
        while peek() in ("AND", "and"):
            take()
            right = one()
            out = [a | b for a in out for b in right]
        return out

    def one() -> list[frozenset[str]]:
        t = take() if peek() is not None else ""
        if t == "(":
            inner = either()
            if peek() != ")":
                raise ValueError(f"unbalanced parentheses in {expression!r}")
            take()
            return inner
        if not t or t in (")", "AND", "OR", "and", "or", "/"):
            raise ValueError(f"not an SPDX expression: {expression!r}")
        return [frozenset({t.removesuffix("+")})]

    result = either()
    if peek() is not None:
        raise ValueError(f"not an SPDX expression: {expression!r}")
    return result


def extra_licenses(expression: str) -> frozenset[str]:
    """The licenses beyond MIT and Apache-2.0 that following `expression` needs (empty when
    one of its choices needs only those two)."""
    return min((c - SHIPPED for c in choices(expression)), key=lambda s: (len(s), sorted(s)))


def metadata(repo: Path, target: str, features: str = FEATURES) -> dict:
    """`cargo metadata` of the package app/ for `target`, locked, as the build (it downloads a
    crate of that target that the cache lacks)."""
    cmd = ["cargo", "metadata", "--format-version", "1", "--locked",
           "--filter-platform", target, "--features", features]
    run = subprocess.run(cmd, cwd=repo / "app", capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr}")
    return json.loads(run.stdout[run.stdout.index("{"):])


def version_key(version: str) -> list[tuple[int, int | str]]:
    """Orders versions as cargo vendor does for the plain directory name (numbers as numbers)."""
    return [(0, int(x)) if x.isdigit() else (1, x) for x in re.split(r"[.+-]", version)]


def linked(meta: dict) -> set[str]:
    """Package ids compiled into the root package's binaries: the root and its normal
    dependencies, transitively, stopping at proc macros (they run in the compiler)."""
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    proc_macro = {i for i, p in packages.items() if any("proc-macro" in t["kind"] for t in p["targets"])}
    seen, todo = set(), [meta["resolve"]["root"]]
    while todo:
        i = todo.pop()
        if i in seen or i in proc_macro:
            continue
        seen.add(i)
        todo += [d["pkg"] for d in nodes[i]["deps"] if any(k["kind"] is None for k in d["dep_kinds"])]
    return seen


def survey(repo: Path) -> dict:
    """own: the package's license; extra: {license: [crates]}; crates: [{name, version,
    license, extra, dir (the crate's source), vendor_dir (its directory under cargo vendor's
    VENDOR/), files (its license files)}] of the crates that need an extra license."""
    by_id: dict[tuple[str, str], dict] = {}
    own = None
    for target in TARGETS:
        meta = metadata(repo, target)
        ids = linked(meta)
        root = meta["resolve"]["root"]
        for p in meta["packages"]:
            if p["id"] == root:
                own = p["license"]
            elif p["id"] in ids:
                by_id[(p["name"], p["version"])] = p
    versions: dict[str, list[str]] = {}
    for name, version in by_id:
        versions.setdefault(name, []).append(version)
    crates, extra = [], {}
    for (name, version), p in sorted(by_id.items()):
        if not p.get("license"):
            raise ValueError(f"{name} {version} declares no SPDX license (license-file only)")
        need = extra_licenses(p["license"])
        if not need:
            continue
        src = Path(p["manifest_path"]).parent
        newest = max(versions[name], key=version_key)
        crates.append({
            "name": name,
            "version": version,
            "license": p["license"],
            "extra": sorted(need),
            "dir": str(src),
            # cargo vendor: the newest version of a crate gets the plain name, older ones name-version
            "vendor_dir": name if version == newest else f"{name}-{version}",
            "files": sorted(f.name for f in src.iterdir() if f.is_file() and LICENSE_FILE.match(f.name)),
        })
        for lic in need:
            extra.setdefault(lic, set()).add(name)
    return {"own": own, "extra": {k: sorted(v) for k, v in sorted(extra.items())}, "crates": crates}


def yocto_license(s: dict) -> str:
    """The recipe's LICENSE from a survey's own and extra: "(MIT | Apache-2.0) & BSD-3-Clause & ISC"."""
    own = s["own"].replace(" OR ", " | ").replace(" AND ", " & ")
    return " & ".join([f"({own})" if s["extra"] else own] + sorted(s["extra"]))


def buildroot_license(s: dict) -> str:
    """POWERMETER_LICENSE: "MIT or Apache-2.0, BSD-3-Clause (subtle), ISC (ring, ...)"."""
    own = s["own"].replace(" OR ", " or ").replace(" AND ", " and ")
    return ", ".join([own] + [f"{lic} ({', '.join(crates)})" for lic, crates in sorted(s["extra"].items())])
