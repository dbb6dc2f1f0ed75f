"""GPIO scenarios: the production unit and the `gpio` input (gpiocdev, uAPI v2) against a
real kernel, with the kernel's GPIO simulator standing in for the meter (a test-only disk,
see powermeter_lab/gpiosim.py). The daemon runs the Pi images' default configuration
(`source = "gpio"`, the line named `GPIO27`) in its shipped, sandboxed unit.

Group `guest-c` (its own guest, with the gpio-sim disk). Costs on the 2-core machine (TCG,
quiet): gpio-count ~70 s (a 40 s pulse train, the wiring check), gpio-fast ~25 s,
gpio-debounce ~15 s, gpio-late-line ~45 s, gpio-sandbox ~15 s; plus the guest's boot (~90 s).
"""

from __future__ import annotations

import re
import statistics
import time

import pytest

from powermeter_lab.gpiosim import GpioSim, gpio_config, use_config
from powermeter_lab.guest import Guest, wait_until

# alone: the pulse trains' timing suffers when other guests share the 2 cores (a CI run with
# three guests at once saw a bounce edge written > 20 ms late: a pulse, not a bounce)
pytestmark = [pytest.mark.xdist_group("guest-c"), pytest.mark.gpio_sim, pytest.mark.qemu_x86, pytest.mark.alone]

PULSES_PER_KWH = 800  # the Pi default configuration's


@pytest.fixture
def sim(guest) -> GpioSim:
    """gpio-sim loaded, the GPIO27 chip live, the daemon on the GPIO configuration and armed."""
    s = GpioSim(guest)
    s.load()
    if guest.run("test -d /sys/kernel/config/gpio-sim/meter")[0] != 0:
        s.create()
    else:
        s.chip, s.pull = _chip_paths(guest)
    if "source = \"gpio\"" not in guest.sh("cat /etc/powermeter/powermeter.toml"):
        use_config(guest, gpio_config())
    assert wait_until(lambda: guest.metric("powermeter_input_armed") == "1", 30), \
        f"the GPIO input is not armed: /health says {guest.http('/health')}"
    return s


def _chip_paths(guest: Guest) -> tuple[str, str]:
    d = "/sys/kernel/config/gpio-sim/meter"
    dev_name, chip_name = guest.sh(f"cat {d}/dev_name {d}/bank0/chip_name").splitlines()
    return f"/dev/{chip_name}", f"/sys/devices/platform/{dev_name}/{chip_name}/sim_gpio27/pull"


def figures(guest: Guest) -> dict[str, float]:
    status, body = guest.http("/metrics")
    assert status == 200, f"/metrics: HTTP {status}"
    out = {}
    for line in body.splitlines():
        m = re.match(r'^(powermeter_[a-z_]+(?:\{reason="debounce"\})?) ([0-9.eE+-]+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def settled(guest: Guest, before: dict[str, float], edges: int, timeout: float = 10) -> dict[str, float]:
    """The figures once counted + lost + rejected edges since `before` reach `edges` (or the
    timeout passes): the daemon has read everything the train sent."""
    keys = ("powermeter_pulses_total", "powermeter_edges_lost_total", REJECTED)
    deadline = time.monotonic() + timeout
    while True:
        f = figures(guest)
        if sum(f[k] - before[k] for k in keys) >= edges or time.monotonic() >= deadline:
            return f
        time.sleep(0.5)


REJECTED = 'powermeter_pulses_rejected_total{reason="debounce"}'


def quiet_figures(guest: Guest) -> dict[str, float]:
    """The figures once they have not moved for 2 s (nothing of an earlier train pending)."""
    last = figures(guest)
    for _ in range(15):
        time.sleep(2)
        now = figures(guest)
        keys = ("powermeter_pulses_total", "powermeter_edges_lost_total", REJECTED)
        if all(now[k] == last[k] for k in keys):
            return now
        last = now
    return last


def test_gpio_count(guest, sim, record_property):
    # the wiring check, once, against the simulated meter (the service holds the line: stop it)
    guest.sh("systemctl stop powermeter.service")
    watch = guest.sh("powermeterd --watch-input 6 --config /etc/powermeter/powermeter.toml >/run/watch.log 2>&1 & "
                     f"w=$!; sleep 1; {sim.command(10, 200)} >/dev/null; wait $w; cat /run/watch.log")
    guest.sh("systemctl start powermeter.service")
    assert re.search(r"^watching GPIO27 \(/dev/gpiochip\d+ line 27\)", watch, re.M), watch
    edge_lines = [line for line in watch.splitlines() if re.match(r"^\s+[0-9.]+ s\s", line)]
    assert len(edge_lines) == 10 and all(" counted" in line for line in edge_lines), \
        f"the wiring check did not list 10 counted edges:\n{watch}"
    assert "summary: 10 edges" in watch and "10 counted, 0 rejected" in watch, watch
    guest.log(f"wiring check: {watch.splitlines()[-1]}")
    assert wait_until(lambda: guest.metric("powermeter_input_armed") == "1", 30), "input not armed after the restart"

    before = figures(guest)
    c0 = int(guest.count())
    period_ms = 200
    expected_w = 3.6e6 / PULSES_PER_KWH / (period_ms / 1000)
    sim.pulses(200, period_ms, background=True)
    time.sleep(5)
    samples = []
    for _ in range(12):  # during the train: the power of the last interval
        samples.append(float(guest.metric("powermeter_power_watts")))
        time.sleep(2.5)
    sent = sim.wait_pulsegen(120)
    assert sent == 200
    after = settled(guest, before, 200)
    c1 = int(guest.count())
    assert c1 - c0 == 200, f"port 9001: {c0} -> {c1}, expected +200"
    assert after["powermeter_pulses_total"] - before["powermeter_pulses_total"] == 200, \
        f"/metrics pulses_total moved by {after['powermeter_pulses_total'] - before['powermeter_pulses_total']}"
    assert after["powermeter_edges_lost_total"] == before["powermeter_edges_lost_total"], "the kernel lost edges"
    median = statistics.median(samples)
    record_property("power_w", f"{median:.0f} (expected {expected_w:.0f})")
    assert abs(median - expected_w) / expected_w <= 0.02, \
        f"power {median:.0f} W (median of {samples}), expected {expected_w:.0f} W within 2 %"
    guest.log(f"200 edges at {period_ms} ms: port 9001 {c0} -> {c1}; power median {median:.0f} W "
              f"(expected {expected_w:.0f} W, samples {min(samples):.0f}-{max(samples):.0f})")


def test_gpio_fast(guest, sim):
    # a reload to a small debounce (applies at once), then 1,000 edges at 100 Hz
    use_config(guest, gpio_config(debounce_ms=1), restart=False)
    guest.sh("systemctl reload powermeter.service")
    assert guest.ok("journalctl -u powermeter.service -b --since -30s -o cat | grep -q 'configuration reloaded'"), \
        "the reload was not logged"
    try:
        before = quiet_figures(guest)
        sent = sim.pulses(1000, 10)
        assert sent == 1000
        after = settled(guest, before, 1000)
        counted = after["powermeter_pulses_total"] - before["powermeter_pulses_total"]
        lost = after["powermeter_edges_lost_total"] - before["powermeter_edges_lost_total"]
        rejected = after[REJECTED] - before[REJECTED]
        assert counted + lost + rejected == 1000, \
            f"{counted:.0f} counted + {lost:.0f} lost + {rejected:.0f} rejected != 1000 edges sent"
        assert (counted, lost, rejected) == (1000, 0, 0), \
            f"at 100 Hz: {counted:.0f} counted, {lost:.0f} lost, {rejected:.0f} rejected"
        guest.log("1000 edges at 100 Hz: all counted, none lost")
    finally:
        use_config(guest, gpio_config(), restart=False)
        guest.sh("systemctl reload powermeter.service")


def test_gpio_debounce(guest, sim, record_property):
    # every pulse bounces: extra rising edges 2.5 and 5 ms after it (debounce_ms = 20). Under
    # TCG the simulator delivers edges down to ~2.4 ms apart; closer ones it may merge. Edges
    # that arrive together must all be read: gpiocdev's read_edge_event dropped all but the
    # first of a batch, which this scenario showed as bounce edges "lost by the kernel".
    # pulsegen says how late its bounces really were: a guest stall that put a bounce 15 ms or
    # more after its pulse changed the input (at 20 ms it is a pulse), so such a train is sent
    # again, at most 3 times; the daemon's figures are never excused.
    for attempt in range(1, 4):
        before = quiet_figures(guest)
        sent = sim.pulses(30, 200, bounce_ms=(2.5, 5.0))
        assert sent == 90
        after = settled(guest, before, 90)
        if sim.report["max_bounce_us"] < 15_000:
            break
        guest.log(f"train {attempt}: a bounce was written {sim.report['max_bounce_us']} us after its pulse "
                  "(guest stall): not the input asked for, sending it again")
    else:
        pytest.fail(f"3 trains in a row had a bounce written >= 15 ms after its pulse: the guest is "
                    f"too slow for this scenario (last: {sim.report})")
    counted = after["powermeter_pulses_total"] - before["powermeter_pulses_total"]
    rejected = after[REJECTED] - before[REJECTED]
    lost = after["powermeter_edges_lost_total"] - before["powermeter_edges_lost_total"]
    record_property("bounces", f"{rejected:.0f} rejected, {lost:.0f} lost, train {attempt}, "
                    f"bounces up to {sim.report['max_bounce_us'] / 1000:.1f} ms")
    assert counted == 30, f"30 bouncing pulses counted as {counted:.0f} ({rejected:.0f} rejected, {lost:.0f} lost)"
    # every bounce edge reaches the daemon and is rejected by the debounce
    assert (rejected, lost) == (60, 0), \
        f"of the 60 bounce edges {rejected:.0f} are in {REJECTED} and {lost:.0f} reported lost"
    guest.log(f"30 pulses with 2 bounces each: {counted:.0f} counted, {rejected:.0f} rejected (debounce), none lost")


def _health(guest: Guest) -> tuple[int, str]:
    return guest.http("/health")


def test_gpio_late_line(guest, sim):
    n0 = int(guest.sh("systemctl show -P NRestarts powermeter.service"))
    c0 = int(guest.count())
    # the chip goes away under the running daemon
    sim.remove()
    assert wait_until(lambda: guest.metric("powermeter_input_armed") == "0", 15), \
        "input still armed without its chip"
    code, body = _health(guest)
    assert code == 503 and "input not armed" in body and "GPIO27" in body, f"/health {code}: {body}"
    # and is absent when the daemon starts
    guest.sh("systemctl restart powermeter.service")
    pid = guest.sh("systemctl show -P MainPID powermeter.service")
    time.sleep(8)
    state = guest.run("systemctl is-active powermeter.service")[1]
    assert state == "active", f"powermeter.service is {state} without its line"
    n1 = int(guest.sh("systemctl show -P NRestarts powermeter.service"))
    assert n1 == n0, f"a restart loop: NRestarts {n0} -> {n1}"
    assert int(guest.count()) >= c0, "port 9001 does not serve the saved count"
    code, body = _health(guest)
    assert code == 503 and "input not armed" in body and "GPIO27" in body, f"/health {code}: {body}"
    assert guest.metric("powermeter_input_armed") == "0"
    logged = guest.sh(f"journalctl -b _PID={pid} -o cat | grep -c 'input not armed' || true")
    assert int(logged or 0) == 1, f"the missing line was logged {logged} times in 8 s of retries (once expected)"
    # the line appears: counting within seconds
    t = time.monotonic()
    sim.create()
    assert wait_until(lambda: guest.metric("powermeter_input_armed") == "1", 15), "not armed after the line appeared"
    armed_after = time.monotonic() - t
    before = figures(guest)["powermeter_pulses_total"]
    assert sim.pulses(5, 200) == 5
    assert wait_until(lambda: figures(guest)["powermeter_pulses_total"] - before == 5, 10), \
        "the 5 pulses were not counted"
    assert _health(guest)[0] == 200
    # the line held by another process (a wiring check, for 15 s) when the daemon starts
    cfg = "--config /etc/powermeter/powermeter.toml"
    guest.sh("systemctl stop powermeter.service")
    guest.sh(f"setsid nohup powermeterd --watch-input 15 {cfg} >/run/hold.log 2>&1 </dev/null &")
    time.sleep(2)
    rc, _, err = guest.run(f"powermeterd --watch-input 1 {cfg}")
    assert rc == 1 and "busy" in err.lower() and "systemctl stop powermeter" in err, \
        f"a second wiring check on the held line: exit {rc}: {err}"
    guest.sh("systemctl start powermeter.service")
    code, body = _health(guest)
    assert code == 503 and "busy" in body.lower() and "GPIO27" in body, f"/health with the line held: {code}: {body}"
    assert wait_until(lambda: guest.metric("powermeter_input_armed") == "1", 30), \
        "not armed after the other process let the line go"
    assert _health(guest)[0] == 200
    guest.log(f"chip removed and absent at start: active, 503, no restart; armed {armed_after:.1f} s after it "
              "appeared; a line held by another process: 503 'busy', armed once it was let go")


SANDBOX_SKIP = ("Type", "ExecStart", "ExecReload", "WatchdogSec", "Restart", "RestartSec",
                "RestartPreventExitStatus", "TimeoutStopSec", "StateDirectory", "StateDirectoryMode")


def _sandbox_properties(guest: Guest, drop: str) -> list[str]:
    """powermeter.service's [Service] settings as shipped, minus what runs it and `drop`."""
    text = guest.sh("systemctl cat powermeter.service")
    props, section = [], ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]" or not line or line.startswith("#") or "=" not in line:
            continue
        key = line.split("=", 1)[0]
        if key in SANDBOX_SKIP or line == drop:
            continue
        props.append(line)
    return props


def test_gpio_sandbox(guest, sim):
    def try_open(drop: str) -> tuple[int, str]:
        props = _sandbox_properties(guest, drop)
        args = " ".join(f"-p '{p}'" for p in props)
        rc, out, err = guest.run(f"systemd-run --quiet --wait --pipe --collect {args} "
                                 f"/bin/sh -c 'exec 3<{sim.chip} && echo opened' 2>&1")
        return rc, (out + err).strip()

    assert "SupplementaryGroups=gpio" in _sandbox_properties(guest, "")
    assert "DeviceAllow=char-gpiochip rw" in _sandbox_properties(guest, "")
    rc, out = try_open("")
    assert rc == 0 and "opened" in out, f"the service's own sandbox cannot open {sim.chip}: {out}"
    rc, out = try_open("SupplementaryGroups=gpio")
    assert rc != 0 and "Permission denied" in out, f"without the gpio group: {out}"
    rc2, out2 = try_open("DeviceAllow=char-gpiochip rw")
    assert rc2 != 0 and "Operation not permitted" in out2, f"without DeviceAllow=char-gpiochip: {out2}"
    guest.log(f"same sandbox: opens {sim.chip}; without the gpio group: {out.splitlines()[-1]}; "
              f"without DeviceAllow: {out2.splitlines()[-1]}")
