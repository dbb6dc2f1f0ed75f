"""pytest + labgrid harness of the appliance system test (run it through `ci/system-test`).

- `--lg-env FILE` (labgrid's option) picks the environment: default `env/qemu-x86_64.yaml`.
  Scenarios marked `appliance("qemu-arm64")` (the Pi 4 image under qemu -M virt, tests/test_rpi.py)
  boot from their own environment file when the main one is the qemu x86 one, in the same run
  and in parallel with the x86 groups.
- Scenarios are test functions; a scenario's name is the function's name without `test_`,
  with `-` for `_` (`test_boot_ready` is `boot-ready`). `--scenario NAME` (repeatable) runs
  only those.
- Guests: every test is in an `xdist_group`; the tests of a group share one guest, booted from
  a fresh qcow2 overlay of the pristine test disk when the group's first test asks for it. Groups
  run in parallel under pytest-xdist (`-n 2 --dist loadgroup`), one guest per worker at a time.
- The controller prints `PASS <scenario>` / `FAIL <scenario>: <why>` as results come in, then
  `N passed, M failed` and the scenarios' times. A failed scenario leaves its guest's serial
  console, qemu log and journal in `build/qemu/test/artifacts/<scenario>/`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

import pytest
from labgrid import Environment
from labgrid.pytestplugin.hooks import LABGRID_ENV_KEY

from powermeter_lab import bundles, gpiosim
from powermeter_lab import disk as disks
from powermeter_lab.guest import TEMPLATE_DEFAULTS, Guest
from powermeter_lab.layout import APPLIANCES, X86, build_dir, qemu_build
from powermeter_lab.ota import Updater

# what the environment files refer to, before labgrid's plugin loads one
for _k, _v in TEMPLATE_DEFAULTS.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("POWERMETER_BUILD_DIR", str(build_dir()))

HERE = Path(__file__).resolve().parent
DEFAULT_ENV = HERE / "env" / "qemu-x86_64.yaml"
DEFAULT_GROUP = "guest-a"
FIRST_GROUPS = ["rpi-b", "guest-p", "rpi", "guest-a", "guest-b"]


def scenario_name(item_or_nodeid) -> str:
    """`test_boot_ready` -> `boot-ready`."""
    nodeid = getattr(item_or_nodeid, "nodeid", item_or_nodeid)
    name = nodeid.split("::")[-1].split("@")[0]  # xdist adds @<group>
    return name.removeprefix("test_").replace("_", "-")


def group_of(item) -> str:
    marker = item.get_closest_marker("xdist_group")
    return marker.args[0] if marker and marker.args else DEFAULT_GROUP


def pytest_addoption(parser):
    parser.addoption("--scenario", action="append", default=[], help="run only this scenario (repeatable)")


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): the scenarios that share one guest")
    config.addinivalue_line("markers", "gpio_sim: the group's guest gets the gpio-sim test disk")
    config.addinivalue_line("markers", "alone: the group's guest runs with no other guest on the machine")
    config.addinivalue_line("markers", "appliance(name): the group's guest is that appliance (layout.APPLIANCES), "
                            "booted from its own labgrid environment next to the main one")
    config.addinivalue_line("markers", "boot_folder(make): the group's guest boots a disk with make(lab) "
                            "(name -> bytes) in the boot partition's folder powermeter/ (first-boot import)")
    config.addinivalue_line("markers", "long: a long scenario, run only when named with --scenario")
    config.addinivalue_line("markers", "qemu_x86: needs the qemu x86 appliance (GRUB's environment, a "
                            "disk patched before boot); skipped on other labgrid environments")
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(Reporter(config), "powermeter-reporter")


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--scenario")
    if wanted:
        known = {scenario_name(i) for i in items}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise pytest.UsageError(f"no such scenario: {' '.join(unknown)} (known: {' '.join(sorted(known))})")
        keep = [i for i in items if scenario_name(i) in wanted]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
    else:
        long = [i for i in items if i.get_closest_marker("long")]
        if long:
            config.hook.pytest_deselected(items=long)
            items[:] = [i for i in items if i not in long]
    # the tests of a group one after another, in file order (a group is one guest's life); the
    # groups in order of FIRST_GROUPS, then of their files. xdist's loadgroup gives each of the
    # two workers two groups at the start, alternating (1st and 3rd, 2nd and 4th), the rest to
    # whichever is free first: so one worker runs the two arm64 guests (rpi-b, rpi; the first
    # waits for the Pi 4 image build) while the other runs guest-p (provisioning) and guest-a,
    # then guest-b goes to the first free worker, and guest-c (GPIO, run alone) comes last
    order: dict[str, int] = {}
    for i in items:
        order.setdefault(group_of(i), len(order))
    items.sort(key=lambda i: (FIRST_GROUPS.index(group_of(i)) if group_of(i) in FIRST_GROUPS else len(FIRST_GROUPS),
                              order[group_of(i)]))


# --- what the controller prints ----------------------------------------------------------------

def _why(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash else str(report.longrepr)
    first = text.strip().splitlines()[0] if text.strip() else "failed"
    for prefix in ("AssertionError: ", "powermeter_lab.guest.GuestError: ", "GuestError: ", "Failed: "):
        first = first.removeprefix(prefix)
    return first


class Reporter:
    """Prints a `PASS/FAIL <scenario>` line per result (on the controller only, so once under
    xdist), then the count and the scenarios' times."""

    def __init__(self, config):
        self.config = config
        self.results = []  # (scenario, outcome, seconds, properties)

    def _line(self, text: str) -> None:
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr:
            tr.write_line(text)

    def pytest_runtest_logreport(self, report):
        name = scenario_name(report.nodeid)
        if report.when == "setup" and report.failed:
            self._line(f"FAIL {name}: setup: {_why(report)}")
            self.results.append((name, "failed", report.duration, dict(report.user_properties)))
        elif report.when == "call":
            if report.skipped:
                self._line(f"SKIP {name}")
            else:
                self._line(f"PASS {name}" if report.passed else f"FAIL {name}: {_why(report)}")
            self.results.append((name, report.outcome, report.duration, dict(report.user_properties)))

    def pytest_terminal_summary(self, terminalreporter):
        if not self.results:
            return
        passed = sum(1 for r in self.results if r[1] == "passed")
        failed = sum(1 for r in self.results if r[1] == "failed")
        tr = terminalreporter
        tr.write_line("")
        tr.write_line("scenario times (s, without the group's first boot):")
        for name, _, secs, props in self.results:
            extra = "".join(f", {k} {v}" for k, v in props.items())
            tr.write_line(f"  {name}: {secs:.0f}{extra}")
        tr.write_line(f"{passed} passed, {failed} failed")


# --- fixtures ------------------------------------------------------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def wait_for_build(status: str | None, log: Path, timeout: float = 3600) -> None:
    """Wait for an image build that ci/system-test started beside the first guests: it writes
    its exit status to the file `status` when it ends. Nothing to wait for without one."""
    if not status:
        return
    path = Path(status)
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"the image build did not end within {timeout:.0f} s (log: {log})")
        time.sleep(5)
    if time.monotonic() - t0 > 5:
        print(f"  waited {time.monotonic() - t0:.0f} s for the image build", flush=True)
    rc = path.read_text().strip()
    if rc != "0":
        raise RuntimeError(f"the image build failed (exit {rc}; log: {log})")


class Lab:
    """What every guest of this worker is made from: the labgrid environment file, and for qemu
    environments the image it names (`images.disk`), of which a pristine copy with the test
    key is made once, and OVMF's variable store (`images.ovmf_vars`) where it has one."""

    def __init__(self, config, env_file: Path | None = None):
        self.env_file = (env_file or Path(config.getoption("lg_env") or DEFAULT_ENV)).resolve()
        env = config.stash.get(LABGRID_ENV_KEY, None) if env_file is None else None
        cfg = env.config if env else Environment(str(self.env_file)).config
        self.appliance = cfg.get_option("appliance", "")
        images = cfg.data.get("images") or {}
        self.build = qemu_build()
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.workdir = self.build / "test" / (worker if env_file is None else f"{worker}-{self.appliance}")
        self.artifacts = self.build / "test" / "artifacts"
        self.key = disks.ssh_key(self.build)
        self.qemu = "disk" in images
        app = APPLIANCES.get(self.appliance)
        if app is not None and app.name == "qemu-arm64":
            wait_for_build(os.environ.get("POWERMETER_RPI4_BUILD_STATUS"), build_dir() / "rpi4-build.log")
        self.pristine = disks.pristine(Path(cfg.get_image_path("disk")), self.key,
                                       app.test_config if app else None) if self.qemu else None
        self.ovmf_vars = Path(cfg.get_image_path("ovmf_vars")) if "ovmf_vars" in images else None
        self._n = 0

    def guest(self, name: str, disk_path: Path | None = None, extra_args: str = "",
              boot_files: dict[str, bytes] | None = None) -> Guest:
        """A new guest: for qemu, on `disk_path` or else a fresh overlay of the pristine disk
        (with `boot_files`: a raw copy with them in the boot partition's folder powermeter/);
        on a bench, the card is written with the environment's `images.sdcard` when it has one."""
        self._n += 1
        wd = self.workdir / f"{self._n:02d}-{name}"
        shutil.rmtree(wd, ignore_errors=True)
        wd.mkdir(parents=True)
        disk = vars_ = None
        if self.qemu and boot_files is not None and disk_path is None:
            disk_path = disks.with_boot_folder(self.pristine, wd / "disk.img", boot_files)
        if self.qemu:
            disk = disk_path or disks.overlay(self.pristine, wd / "disk.qcow2")
        if self.ovmf_vars:
            vars_ = disks.copy_vars(self.ovmf_vars, wd / "vars.fd")
        g = Guest(name, self.env_file, wd, disk=disk, ovmf_vars=vars_, key=self.key, extra_args=extra_args)
        if not self.qemu and "sdcard" in (g.env.config.data.get("images") or {}):
            g.strategy.flash(g.env.config.get_image_path("sdcard"))
        return g


@pytest.fixture(scope="session")
def labs(request) -> dict[str, Lab]:
    """The main lab, and the other appliances' labs as scenarios ask for them."""
    return {"": Lab(request.config)}


def lab_of(item, labs: dict[str, Lab]) -> Lab:
    """The lab a scenario's guest comes from: its `appliance` marker's, when the main lab is
    the qemu x86 one (a bench runs everything on its own hardware), else the main lab."""
    main = labs[""]
    marker = item.get_closest_marker("appliance")
    want = marker.args[0] if marker and marker.args else ""
    if not want or want == main.appliance or main.appliance != "qemu-x86_64":
        return main
    if want not in labs:
        labs[want] = Lab(item.config, APPLIANCES[want].env_file)
    return labs[want]


@pytest.fixture
def lab(request, labs) -> Lab:
    return lab_of(request.node, labs)


class Guests:
    """One booted guest per group; a group's guest goes off after its last test.

    Timing-sensitive groups (marker `alone`: the GPIO pulse trains) run with no other guest on
    the machine: every guest holds a shared lock on build/qemu/test/.guests.lock while it is up,
    an `alone` guest an exclusive one, so it waits for the other worker's group to end (with two
    groups of similar length before it, that costs about nothing)."""

    def __init__(self, lab: Lab):
        self.lab = lab  # the main lab: the lock file lives in its build directory
        self.group = None
        self.current: Guest | None = None
        self.boot_error: str | None = None
        self._lock = None

    def _take_lock(self, alone: bool) -> None:
        self._lock = open(self.lab.build / "test" / ".guests.lock", "a")  # noqa: SIM115 (closed in close())
        if alone:
            t0 = time.monotonic()
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            if time.monotonic() - t0 > 1:
                print(f"  [{self.group}] waited {time.monotonic() - t0:.0f} s to run alone", flush=True)
        else:
            fcntl.flock(self._lock, fcntl.LOCK_SH)

    def get(self, group: str, extra_args: str = "", alone: bool = False, lab: Lab | None = None,
            boot_files: dict[str, bytes] | None = None) -> Guest:
        if group != self.group:
            self.close()
            self.group = group
            self.boot_error = None
            self._take_lock(alone)
            t0 = time.monotonic()
            self.current = (lab or self.lab).guest(group, extra_args=extra_args, boot_files=boot_files)
            try:
                self.current.boot()
                self.current.log(f"ready {time.monotonic() - t0:.0f} s after power on; kernel start "
                                 f"to READY=1 {self.current.ready_seconds():.1f} s")
            except Exception as e:  # every test of the group fails with this
                self.boot_error = f"the appliance did not boot to powermeter ready: {e}"
        if self.boot_error:
            pytest.fail(self.boot_error)
        g = self.current
        # a scenario starts with a running guest (a failed one may have left it down)
        if not g.alive() or g.try_sh("true") is None:
            g.log("not answering: booting it again")
            if g.alive():
                g.power_cut()
            g.boot_again()
        return g

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
        if self._lock is not None:
            self._lock.close()  # releases the flock
        self.current = None
        self.group = None
        self._lock = None


@pytest.fixture(scope="session")
def guests(labs, request):
    g = Guests(labs[""])
    request.config._pm_guests = g
    yield g
    g.close()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """A group's guest goes off after its last test (releasing its lock for an `alone` group);
    trylast: after the test's fixtures are torn down (artifacts are saved there)."""
    g = getattr(item.config, "_pm_guests", None)
    if g is not None and g.group == group_of(item) and (nextitem is None or group_of(nextitem) != g.group):
        g.close()


def _keep_artifacts(request, lab: Lab, guest_list) -> None:
    rep = getattr(request.node, "rep_call", None) or getattr(request.node, "rep_setup", None)
    if rep is None or not rep.failed:
        return
    dest = lab.artifacts / scenario_name(request.node)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    captured = "".join(f"\n--- {title} ---\n{text}" for title, text in rep.sections)
    (dest / "failure.txt").write_text(f"{rep.longrepr}\n{captured}")
    for g in guest_list:
        try:
            g.save_artifacts(dest / g.name if len(guest_list) > 1 else dest)
        except Exception as e:  # keep what could be kept
            (dest / "artifact-errors.txt").write_text(f"{g.name}: {e}\n")


@pytest.fixture(autouse=True)
def _only_where_it_applies(request):
    if request.node.get_closest_marker("qemu_x86") and request.getfixturevalue("lab").appliance != "qemu-x86_64":
        pytest.skip("qemu x86 appliance only")


@pytest.fixture
def guest(request, guests, lab) -> Guest:
    """The booted guest of this test's group (SSH and powermeter ready); with the `gpio_sim`
    marker, the gpio-sim test disk is attached to it; with `boot_folder(make)`, its disk has
    `make(lab)` (name -> bytes) in the boot partition's folder powermeter/ before its first boot."""
    extra = gpiosim.qemu_args() if request.node.get_closest_marker("gpio_sim") else ""
    folder = request.node.get_closest_marker("boot_folder")
    g = guests.get(group_of(request.node), extra, alone=bool(request.node.get_closest_marker("alone")), lab=lab,
                   boot_files=folder.args[0](lab) if folder else None)
    yield g
    _keep_artifacts(request, lab, [g])


@pytest.fixture(scope="session")
def bundle_servers(labs):
    """The HTTP servers RAUC streams test bundles from, one per appliance (and worker), each
    started when a scenario of that appliance first asks for it."""
    servers: dict[str, bundles.BundleServer] = {}
    yield servers
    for srv in servers.values():
        srv.close()


@pytest.fixture
def ota(guest, lab, labs, bundle_servers) -> Updater:
    """RAUC on the group's guest, with the bundles of its appliance served from the host (qemu's
    user network reaches it at the guest's `host_address`)."""
    app = APPLIANCES.get(lab.appliance, X86)
    srv = bundle_servers.get(app.name)
    if srv is None:
        srv = bundle_servers[app.name] = bundles.BundleServer(
            bundles.cache(app) / "www" / labs[""].workdir.name, host_address="10.0.2.2")
    srv.host_address = guest.host_address
    return Updater(guest, srv)


@pytest.fixture
def new_guest(request, lab):
    """A factory of extra guests for one test (e.g. a copy with a patched disk); they are
    powered off after the test, and their logs kept if it failed."""
    made: list[Guest] = []

    def make(name: str, disk_path: Path | None = None, extra_args: str = "",
             boot_files: dict[str, bytes] | None = None) -> Guest:
        g = lab.guest(name, disk_path, extra_args, boot_files)
        made.append(g)
        return g

    yield make
    _keep_artifacts(request, lab, made)
    for g in made:
        g.close()


def pytest_report_teststatus(report, config):
    """No progress dots: the Reporter's PASS/FAIL lines are the progress."""
    if report.when == "call":
        return report.outcome, "", report.outcome.upper()
    if report.failed:
        return "error", "", "ERROR"
    return None
