"""The image's SBOM, checked against the booted appliance (scenario sbom, group guest-a, ~5 s).

The SBOM in the image (/usr/share/powermeter/sbom.cdx.json) must be the one written next to it
(build/qemu/sbom.cdx.json), valid CycloneDX 1.6, list exactly the Debian packages of dpkg's database
in the running root file system, name the daemon at the version the running binary reports, and list every crate
compiled into that binary (its `cargo auditable` data).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from powermeter_lab.layout import REPO, qemu_build

pytestmark = pytest.mark.xdist_group("guest-a")

IN_IMAGE = "/usr/share/powermeter/sbom.cdx.json"


def test_sbom(guest, tmp_path, record_property):
    text = guest.sh(f"cat {IN_IMAGE}")
    beside = qemu_build() / "sbom.cdx.json"
    assert beside.is_file(), f"no {beside}: images/qemu/build writes the SBOM next to the image"
    assert json.loads(text) == json.loads(beside.read_text()), f"{IN_IMAGE} in the guest is not {beside}"

    # the binaries the SBOM was made from are the ones in the guest: the daemon and the publisher
    binaries = []
    for name in ("powermeterd", "powermeter-mqtt"):
        binary = qemu_build() / "root" / "usr" / "bin" / name
        running = guest.sh(f"sha256sum /usr/bin/{name}").split()[0]
        assert running == hashlib.sha256(binary.read_bytes()).hexdigest(), \
            f"/usr/bin/{name} in the guest is not {binary}"
        binaries += ["--binary", str(binary)]
    version = guest.sh("powermeterd --version").split()[-1]
    assert guest.sh("powermeter-mqtt --version").split()[-1] == version

    sbom = tmp_path / "sbom.cdx.json"
    sbom.write_text(text)
    check = subprocess.run(
        [sys.executable, str(REPO / "images" / "sbom" / "check-sbom"), "--debian",
         "--daemon-version", version, *binaries, str(sbom)],
        capture_output=True, text=True)
    assert check.returncode == 0, f"check-sbom: {check.stdout}{check.stderr}"

    bom = json.loads(text)
    listed = {(c["name"], c["version"]) for c in bom["components"] if c.get("purl", "").startswith("pkg:deb/")}
    # /var/lib is the data partition's at run time: dpkg's database is read from the root file
    # system itself (a bind mount of / without its submounts)
    root = "/run/sbom-root"
    dpkg = guest.sh(f"mkdir -p {root} && {{ mountpoint -q {root} || mount --bind -o ro / {root}; }} && "
                    f"dpkg-query --admindir={root}/var/lib/dpkg -W "
                    "-f '${db:Status-Abbrev}|${Package}|${Version}\\n'; "
                    f"rc=$?; umount {root}; exit $rc")
    rows = [line.split("|") for line in dpkg.splitlines()]
    installed = {(name, version) for status, name, version in rows if status.startswith("ii")}
    assert listed == installed, (f"SBOM vs dpkg in the guest: only in the SBOM {sorted(listed - installed)[:10]}, "
                                 f"only installed {sorted(installed - listed)[:10]}")
    crates = sum(1 for c in bom["components"] if c.get("purl", "").startswith("pkg:cargo/"))
    record_property("sbom", f"{len(listed)} Debian packages, powermeterd {version} with {crates} crates")
    guest.log(f"SBOM: {len(listed)} Debian packages (= dpkg in the guest), powermeterd {version}, {crates} crates")
