"""Provisioning: the owner's settings from the folder powermeter/ on the FAT boot partition, imported
once at first boot (/usr/lib/powermeter/provision, powermeter-provision.service), kept on /data
through updates and rollbacks, and never read again once the device is provisioned.

Group `guest-p`: its guest boots a disk whose boot partition carries a configuration, a host name,
a time zone, an owner's SSH key (not the harness's) and a Wi-Fi file (a secret). Costs on the
2-core machine (TCG, quiet): provision-first-boot ~10 s after the group's first boot (~100-150
s), provision-wifi ~20 s (simulated radios), provision-ignored-later ~110 s (one reboot),
provision-survives-update ~230 s (an install of the built bundle, two reboots), clock-step
~10 s (the wall clock stepped back and forward), config-change ~15 s (powermeter-config),
mqtt-home-assistant ~10 s (a broker on the host, the publisher configured and undone; 8 s measured),
provision-bad-input ~90 s after a boot of a
guest of its own (~100 s), booted once the group's guest is off.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from powermeter_lab import bundles
from powermeter_lab.guest import BOOT_TIMEOUT, Guest, wait_until
from powermeter_lab.layout import qemu_build
from powermeter_lab.mqtt import Broker, Subscriber
from powermeter_lab.ota import other

pytestmark = [pytest.mark.xdist_group("guest-p"), pytest.mark.qemu_x86]

BOOT = "/boot/efi/powermeter"
CONFIG = b"""# provisioned from the boot partition (written on Windows: CRLF)\r
[meter]\r
pulses_per_kwh = 1000\r
[input]\r
source = "sim"\r
[input.sim]\r
watts = 7200.0\r
[state]\r
dir = "/var/lib/powermeter"\r
save_interval_s = 30\r
"""


def owner_key(name: str = "owner") -> Path:
    """An SSH key of the device's owner (not the harness's), made once in build/qemu/testkey/."""
    key = qemu_build() / "testkey" / f"id_{name}"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"powermeter-{name}", "-f", str(key)],
                       check=True)
    return key


def good_folder(lab) -> dict[str, bytes]:
    return {
        "powermeter.toml": CONFIG,
        "hostname": b"meter-cellar\r\n",
        "timezone": b"Europe/Berlin\n",
        "authorized_keys": Path(f"{owner_key()}.pub").read_bytes(),
        "wifi.txt": b"ssid=Home Net\npassphrase=correct horse battery\ncountry=DE\n",
    }


def bad_folder(lab) -> dict[str, bytes]:
    return {
        "powermeter.toml": b"[meter]\npulses_per_kwh = 800\n[input]\nsource = \"sim\"\nwatts = 3600\n",
        "authorized_keys": b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAnot-a-key owner@laptop\n",
        "hostname": b"meter-ok\n",
    }


def wait_provisioned(g: Guest, timeout: float = 600) -> str:
    """Wait until powermeter-provision.service has run (the boot partition is mounted when udev
    gets to it); its result."""
    def done():
        out = g.try_sh("systemctl show -P ActiveState,Result powermeter-provision.service | tr '\\n' ' '; "
                       "test -e /data/etc/powermeter/provisioned && echo marked")
        return out if out and ("marked" in out or "failed" in out) else None

    out = wait_until(done, timeout, every=5)
    assert out and "marked" in out, f"not provisioned within {timeout:.0f} s (powermeter-provision: {out})"
    return g.sh("cat /data/etc/powermeter/provision-result.txt")


def ssh_as(g: Guest, key: Path, cmd: str) -> subprocess.CompletedProcess:
    """`cmd` over SSH with `key` (not the harness's connection)."""
    return subprocess.run(["ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           "-o", "ConnectTimeout=30", "-p", str(g.port("ssh")), f"root@{g.address('ssh')}", cmd],
                          capture_output=True, text=True, timeout=120, check=False)


def reading(g: Guest) -> dict:
    def get():
        status, body = g.http("/api/v1/reading")
        return json.loads(body) if status == 200 else None
    r = wait_until(get, 120, every=3)
    assert r, "no reading from /api/v1/reading"
    return r


def in_effect(g: Guest, what: str) -> None:
    """The provisioned settings are what the device runs with."""
    assert g.sh("hostname") == "meter-cellar", f"{what}: host name '{g.sh('hostname')}', expected meter-cellar"
    assert g.sh("date +%Z") in ("CET", "CEST"), f"{what}: time zone {g.sh('date +%Z')}, expected Europe/Berlin"
    r = reading(g)
    assert r["pulses_per_kwh"] == 1000, f"{what}: the daemon runs with pulses_per_kwh {r['pulses_per_kwh']}"
    p = ssh_as(g, owner_key(), "cat /data/etc/powermeter/provisioned")
    assert p.returncode == 0, f"{what}: SSH with the owner's key failed: {p.stderr.strip()[-200:]}"


@pytest.mark.boot_folder.with_args(good_folder)
def test_provision_first_boot(guest):
    result = wait_provisioned(guest)
    guest.log("result: " + " | ".join(line for line in result.splitlines() if line.startswith(("imported", "refused"))))
    for item in ("powermeter.toml", "hostname: meter-cellar", "timezone: Europe/Berlin", "authorized_keys line 1",
                 "wifi.txt: network 'Home Net', country DE"):
        assert f"imported {item}" in result, f"the result file does not say 'imported {item}': {result}"
    assert "\nrefused" not in result, f"refusals in the result: {result}"
    # the same result on the boot partition, for the owner's PC; the secret is gone from it
    assert guest.sh(f"cat {BOOT}/provision-result.txt") == result, "the boot partition's result differs from /data's"
    files = guest.sh(f"ls {BOOT}").split()
    assert "wifi.txt" not in files, f"the Wi-Fi pass phrase is still on the boot partition: {files}"
    wpa = "/etc/wpa_supplicant/wpa_supplicant-wlan0.conf"  # a link to /data (the Pi image has wlan0)
    assert guest.ok(f"test -L {wpa} && grep -q 'psk=\"correct horse battery\"' /data{wpa} && "
                    f"grep -qx 'country=DE' /data{wpa}"), "the Wi-Fi network was not saved for wpa_supplicant"
    # the daemon was restarted onto the imported configuration and counts with it
    assert guest.sh("systemctl is-active powermeter.service") == "active", "powermeter is not running"
    in_effect(guest, "after the first boot")
    assert guest.sh("readlink /etc/powermeter/powermeter.toml") == "/data/etc/powermeter/powermeter.toml"
    assert guest.ok("grep -q 'watts = 7200.0' /data/etc/powermeter/powermeter.toml"), \
        "the imported file is not in place"
    c1 = int(guest.count())
    c2 = wait_until(lambda: (lambda c: c if c > c1 else None)(int(guest.count())), 60, every=2)
    assert c2, f"not counting after the import (port 9001 stays at {c1})"
    journal = guest.sh("journalctl -b -u powermeter-provision.service -o cat --no-pager")
    assert "imported powermeter.toml" in journal, f"no journal line for the import: {journal[-500:]}"


AP_CONF = """ctrl_interface=DIR=/run/wpa_supplicant-ap
network={
    ssid="Home Net"
    mode=2
    frequency=2412
    key_mgmt=WPA-PSK
    proto=RSN
    pairwise=CCMP
    psk="correct horse battery"
}
"""


def test_provision_wifi(guest):
    """The imported Wi-Fi network is joined: the kernel's simulated radios (mac80211_hwsim) give
    the guest a wlan0 and a wlan1; wlan1 is an access point of that network (wpa_supplicant in AP
    mode), and wlan0's appearance starts wpa_supplicant@wlan0 with the imported file, which must
    associate. No Wi-Fi hardware in qemu, so this stands in for the Pi's."""
    wait_provisioned(guest)
    guest.sh("modprobe mac80211_hwsim radios=2")
    try:
        guest.sh(f"cat > /run/ap.conf <<'EOF'\n{AP_CONF}EOF\n"
                 "wpa_supplicant -B -i wlan1 -c /run/ap.conf -P /run/ap.pid")

        def joined():
            st = guest.try_sh("wpa_cli -p /run/wpa_supplicant -i wlan0 status 2>&1") or ""
            return st if "wpa_state=COMPLETED" in st else None

        st = wait_until(joined, 90, every=3)
        unit = guest.sh("systemctl show -P ActiveState wpa_supplicant@wlan0.service")
        assert st, (f"wlan0 did not join the imported network within 90 s (wpa_supplicant@wlan0 {unit}: "
                    f"{guest.try_sh('journalctl -b -u wpa_supplicant@wlan0 -o cat --no-pager | tail -n 5')})")
        assert "ssid=Home Net" in st and "key_mgmt=WPA2-PSK" in st, f"joined, but not as imported: {st}"
        guest.log("wlan0 joined 'Home Net' (WPA2-PSK) with the imported file")
    finally:
        guest.try_sh("systemctl stop wpa_supplicant@wlan0.service; kill $(cat /run/ap.pid) 2>/dev/null; sleep 1; "
                     "rmmod mac80211_hwsim")


def test_provision_ignored_later(guest):
    """Files dropped on the boot partition of a provisioned device change nothing."""
    wait_provisioned(guest)
    before = guest.sh("sha256sum /data/etc/powermeter/powermeter.toml /data/ssh/authorized_keys "
                      "/data/etc/hostname /data/etc/powermeter/provision-result.txt")
    intruder = owner_key("intruder")
    guest.push(Path(f"{intruder}.pub"), f"{BOOT}/authorized_keys")
    guest.sh(f"printf 'intruder\\n' > {BOOT}/hostname; "
             f"printf '[meter]\\npulses_per_kwh = 1\\n[input]\\nsource = \"sim\"\\n' > {BOOT}/powermeter.toml; "
             f"printf 'ssid=evil\\npassphrase=12345678\\n' > {BOOT}/wifi.txt; sync")
    guest.reboot()
    cond = guest.sh("systemctl show -P ConditionResult powermeter-provision.service")
    assert cond == "no", f"powermeter-provision ran on a provisioned device (ConditionResult={cond})"
    after = guest.sh("sha256sum /data/etc/powermeter/powermeter.toml /data/ssh/authorized_keys "
                     "/data/etc/hostname /data/etc/powermeter/provision-result.txt")
    assert after == before, f"a provisioned device changed after a reboot with new files on boot: {after}"
    assert ssh_as(guest, intruder, "true").returncode != 0, "the key dropped on the boot partition logs in"
    assert guest.ok(f"test -f {BOOT}/wifi.txt"), "the files of a provisioned device's boot partition were touched"
    in_effect(guest, "after a reboot with new files on the boot partition")
    guest.sh(f"rm -f {BOOT}/authorized_keys {BOOT}/hostname {BOOT}/powermeter.toml {BOOT}/wifi.txt")


def test_provision_survives_update(guest, ota):
    """The configuration stays in effect after an A/B update, and after going back."""
    wait_provisioned(guest)
    old, new, _ = ota.current()
    ota.install(bundles.built())
    guest.reboot()
    ota.wait_good(new, BOOT_TIMEOUT)
    in_effect(guest, f"after the update to slot {new}")
    # back to the old slot (what a rollback does), then the same checks
    guest.sh("rauc status mark-active other")
    guest.reboot()
    ota.wait_good(old, BOOT_TIMEOUT)
    assert ota.booted() == old and other(new) == old, f"not back on slot {old}"
    in_effect(guest, f"after going back to slot {old}")


def test_clock_step(guest):
    """A Pi has no RTC: it boots with the clock where it stopped (systemd-timesyncd's last
    stamp), behind the real time, until network time steps it forward. Counting runs on the
    monotonic clock and the state's newest generation wins by number, not by time: a clock
    stepped back, a restart while it is wrong, and the step forward change no count, and the
    last pulse time moves only forward when the clock is put right."""
    assert guest.sh("systemctl is-enabled systemd-timesyncd.service") == "enabled", "no network time"
    guest.sh("systemctl stop systemd-timesyncd.service")
    try:
        right = int(guest.sh("date +%s"))
        r1 = reading(guest)
        past = 1735689600  # 2025-01-01: a clock left behind while the device was off
        guest.sh(f"date -s @{past} >/dev/null")
        guest.sh("sleep 3")
        r2 = reading(guest)
        assert r2["pulses_total"] >= r1["pulses_total"] and r2["energy_kwh"] >= r1["energy_kwh"], \
            f"the count went back when the clock did: {r1['pulses_total']} -> {r2['pulses_total']}"
        assert r2["power_w"] > 0.5 * r1["power_w"], f"power {r1['power_w']} W -> {r2['power_w']} W after the step back"
        assert r2["last_pulse_unix_s"] < right, "the last pulse time does not follow the clock"
        # a restart while the clock is wrong: the state saved now has an older time stamp
        guest.sh("systemctl restart powermeter.service")
        r3 = reading(guest)
        assert r3["pulses_total"] >= r2["pulses_total"], \
            f"a restart with the clock behind lost counts: {r2['pulses_total']} -> {r3['pulses_total']}"
        guest.sh("sleep 3")
        before = reading(guest)
        # network time puts the clock right
        guest.sh(f"date -s @{right + 20} >/dev/null")
        r4 = reading(guest)
        assert r4["pulses_total"] >= before["pulses_total"], "the count went back when the clock was put right"
        assert (r4["last_pulse_unix_s"] or 0) >= (before["last_pulse_unix_s"] or 0), \
            f"the last pulse time went back: {before['last_pulse_unix_s']} -> {r4['last_pulse_unix_s']}"
        assert r4["power_w"] > 0.5 * r1["power_w"], f"power {r1['power_w']} W -> {r4['power_w']} W after the step"
        guest.log(f"pulses {r1['pulses_total']} -> {r2['pulses_total']} (clock back) -> {r3['pulses_total']} "
                  f"(restart) -> {r4['pulses_total']} (clock right); power {r4['power_w']:.0f} W")
    finally:
        guest.try_sh(f"date -s @{int(time.time())} >/dev/null; systemctl start systemd-timesyncd.service")


def test_config_change(guest):
    """powermeter-config over SSH: a typo is refused before it takes effect (the daemon keeps
    counting with the file in use), a good file is installed with the old one kept, undo puts
    the old one back."""
    conf = "/data/etc/powermeter/powermeter.toml"
    before = guest.sh(f"sha256sum < {conf}")
    pid = guest.sh("systemctl show -P MainPID powermeter.service")
    rc, out, err = guest.run("printf '[meter]\\npulses_per_kwh = 0\\n' | powermeter-config set -")
    assert rc == 78 and "meter.pulses_per_kwh" in err, f"a bad file was not refused (exit {rc}): {out} {err}"
    assert guest.sh(f"sha256sum < {conf}") == before, "a refused file changed the configuration"
    assert guest.sh("systemctl show -P MainPID powermeter.service") == pid, "a refused file restarted the daemon"
    good = guest.sh(f"sed 's/^pulses_per_kwh = .*/pulses_per_kwh = 2000/' {conf}")
    guest.sh(f"cat > /run/new.toml <<'EOF'\n{good}\nEOF\npowermeter-config set /run/new.toml")
    assert reading(guest)["pulses_per_kwh"] == 2000, "the daemon does not run with the new file"
    assert guest.sh(f"sha256sum < {conf}.old") == before, "the previous file was not kept"
    guest.sh("powermeter-config undo")
    assert guest.sh(f"sha256sum < {conf}") == before, "undo did not put the previous file back"
    assert reading(guest)["pulses_per_kwh"] == 1000, "the daemon does not run with the previous file after undo"


def test_mqtt_home_assistant(guest):
    """The MQTT publisher in the booted appliance: idle without [mqtt]; configured with
    powermeter-config (a broker on the host, the password in the file the provisioning writes),
    it publishes Home Assistant discovery, retained state and availability, from its own unit
    while the counter keeps its no-network sandbox; undo makes it idle again."""
    assert guest.sh("systemctl is-enabled powermeter-mqtt.service") == "enabled", "the publisher is not enabled"
    idle = guest.sh("systemctl show -P ActiveState,Result powermeter-mqtt.service | tr '\\n' ' '").split()
    assert sorted(idle) == ["inactive", "success"], \
        f"unconfigured publisher: {idle}: {guest.sh('systemctl status powermeter-mqtt --no-pager || true')}"
    ppk = reading(guest)["pulses_per_kwh"]
    broker = Broker()
    try:
        sub = Subscriber(broker, ["powermeter/systest/#", "homeassistant/#"])
        guest.sh(f"umask 077; printf '%s\\n' '{broker.password}' > /data/etc/powermeter/mqtt-password")
        conf = guest.sh("cat /data/etc/powermeter/powermeter.toml")
        mqtt = (f"[mqtt]\nbroker = \"{guest.host_address}\"\nport = {broker.port}\nusername = \"{broker.user}\"\n"
                "password_file = \"/data/etc/powermeter/mqtt-password\"\ndevice_id = \"systest\"\n"
                "publish_interval_s = 2\n")
        guest.sh(f"cat > /run/mqtt.toml <<'EOF'\n{conf}\n{mqtt}EOF\npowermeter-config set /run/mqtt.toml")
        topic = "homeassistant/sensor/powermeter_systest/energy/config"
        _, doc, _ = sub.wait_for("energy discovery", lambda t, p, r: t == topic, 120)
        energy = json.loads(doc)
        assert (energy["device_class"], energy["state_class"], energy["unit_of_measurement"]) == (
            "energy", "total_increasing", "kWh"), f"energy discovery: {doc}"
        sub.wait_for("availability online", lambda t, p, r: t == "powermeter/systest/availability" and p == "online")
        # right after the restart the state carries the restored count, power 0 and no last pulse yet
        _, state, _ = sub.wait_for("a state with pulses, power and the last pulse time",
                                   lambda t, p, r: t == "powermeter/systest/state" and json.loads(p)["pulses_total"] > 0
                                   and json.loads(p)["power_w"] > 0 and json.loads(p)["last_pulse"])
        assert json.loads(state)["last_pulse"].endswith("Z"), f"state: {state}"
        assert guest.sh("systemctl show -P PrivateNetwork powermeter.service") == "yes", "the counter got network"
        uid = guest.sh("stat -c %u /proc/$(systemctl show -P MainPID powermeter-mqtt.service)")
        assert uid != "0", "the publisher runs as root"
        sub.close()
    finally:
        broker.stop()
        guest.try_sh("powermeter-config undo; rm -f /data/etc/powermeter/mqtt-password")
    wait_until(lambda: guest.try_sh("systemctl show -P ActiveState powermeter-mqtt.service") == "inactive", 60,
               every=2)
    assert reading(guest)["pulses_per_kwh"] == ppk, "undo did not restore the previous configuration"


def test_provision_bad_input(guests, new_guest):
    """A broken configuration and a malformed key: refused and reported (journal, result file),
    the device boots, counts with the image's default, and takes the good item (host name)."""
    guests.close()  # the group's guest is done: this guest boots alone in its slot
    g = new_guest("bad-input", boot_files=bad_folder(None))
    g.boot()
    result = wait_provisioned(g)
    g.log("result: " + " | ".join(line for line in result.splitlines() if line.startswith(("imported", "refused"))))
    assert "refused  powermeter.toml" in result and "input.watts" in result, \
        f"the broken configuration is not refused with its key named: {result}"
    assert "refused  authorized_keys line 1" in result, f"the malformed key is not refused: {result}"
    assert "imported hostname: meter-ok" in result, f"the good item beside the bad ones was not imported: {result}"
    journal = g.sh("journalctl -b -u powermeter-provision.service -o cat --no-pager")
    for item in ("refused powermeter.toml", "refused authorized_keys line 1"):
        assert item in journal, f"no journal line '{item}': {journal[-500:]}"
    assert g.ok("cmp -s /data/etc/powermeter/powermeter.toml /usr/share/powermeter/powermeter.toml"), \
        "the device does not run the image's default configuration"
    assert g.sh("systemctl is-active powermeter.service") == "active", "powermeter is not running"
    assert reading(g)["pulses_per_kwh"] == 800, "the daemon does not count with the default"
    c1 = int(g.count())
    assert wait_until(lambda: int(g.count()) > c1, 60, every=2), f"not counting (port 9001 stays at {c1})"
    assert ssh_as(g, owner_key(), "true").returncode != 0, "a key that was not in the folder logs in"
    assert g.sh("hostname") == "meter-ok", "the good host name was not taken"
