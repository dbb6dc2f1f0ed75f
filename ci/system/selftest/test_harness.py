"""Checks of the harness itself that boot nothing (ci/check-system-harness, a few seconds):
every labgrid environment file makes a target with the strategy bound, scenario names map
as documented, the bundle server answers range requests as RAUC's streaming needs, overlays
are backed by the pristine disk and bigger than it."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
from labgrid import Environment

from conftest import scenario_name
from powermeter_lab import bundles, disk
from powermeter_lab.layout import layout

ENVS = sorted((Path(__file__).resolve().parents[1] / "env").glob("*.yaml"))


@pytest.mark.parametrize("env_file", ENVS, ids=[e.stem for e in ENVS])
def test_environment_binds(env_file):
    target = Environment(str(env_file)).get_target("main")
    strategy = target.get_driver("PowermeterStrategy", activate=False)
    assert strategy.ssh is not None and strategy.power is not None and strategy.console is not None
    names = {r.name for r in target.resources if type(r).__name__ == "NetworkService"}
    assert names == {"ssh", "legacy", "http"}, f"{env_file.name}: NetworkService names {names}"


def test_scenario_names():
    assert scenario_name("tests/test_base.py::test_boot_ready") == "boot-ready"
    assert scenario_name("tests/test_ota.py::test_ota_rollback_unhealthy@guest-a") == "ota-rollback-unhealthy"


def test_layout_matches_the_build():
    lay = layout()
    assert lay.data_offset == (1 + lay.esp_mib + 2 * lay.slot_mib) * 1024 * 1024
    assert 0 < lay.verity_hash_offset < lay.slot_mib * 1024 * 1024


def _get(url: str, rng: str | None = None):
    req = urllib.request.Request(url, headers={"Range": rng} if rng else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), b""


def test_bundle_server_ranges(tmp_path):
    data = bytes(range(256)) * 40
    f = tmp_path / "x.raucb"
    f.write_bytes(data)
    srv = bundles.BundleServer(tmp_path / "www", host_address="127.0.0.1")
    try:
        url = srv.url(bundles.Bundle(f))
        assert url == f"http://127.0.0.1:{srv.port}/x.raucb"
        st, hdr, body = _get(url)
        assert (st, body) == (200, data) and hdr["Accept-Ranges"] == "bytes"
        st, hdr, body = _get(url, "bytes=100-199")
        assert (st, body, hdr["Content-Range"]) == (206, data[100:200], f"bytes 100-199/{len(data)}")
        st, _, body = _get(url, "bytes=-10")
        assert (st, body) == (206, data[-10:])
        st, _, body = _get(url, f"bytes={len(data) - 5}-")
        assert (st, body) == (206, data[-5:])
        st, hdr, _ = _get(url, f"bytes={len(data)}-")
        assert st == 416 and hdr["Content-Range"] == f"bytes */{len(data)}"
        assert _get(url.replace("x.raucb", "nothing"))[0] == 404
    finally:
        srv.close()


def test_overlay_is_backed_and_bigger(tmp_path):
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    ov = disk.overlay(base, tmp_path / "g" / "disk.qcow2", grow_mib=4)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(ov)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2"
    assert Path(info["backing-filename"]) == base.resolve()
    assert info["virtual-size"] == 12 * 1024 * 1024


def test_xor_byte(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\x00\x0f\xf0")
    assert disk.xor_byte(img, 1) == (0x0F, 0xF0)
    assert img.read_bytes() == b"\x00\xf0\xf0"
