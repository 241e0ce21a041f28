"""The van in a real arm64 userland (issue #19, point 2): Debian bookworm arm64 under qemu user mode.

A cached `debootstrap --arch=arm64` rootfs (tests/platform/rootfs.py; the kernel runs its
programs through qemu-aarch64, registered by tests/platform/emulation.py) is booted with
systemd-nspawn like the amd64 one, and the project goes in with scripts/install-pi exactly
as on a Pi: the same aarch64 wheels pip picks on a Pi 4/5. Then the van's own tests run
inside, on the aarch64 Python, numpy, paho-mqtt and an aarch64 Mosquitto.

How the tests get in: install-pi's venv holds only `.[device]`, as on a van, and is left as
install-pi made it. A second venv, /opt/datalab-tests, sees the van's venv through a .pth
file (so the tests run on the very aarch64 wheels install-pi chose, and pip counts them as
installed) and gets only what the tests add: pytest and the test extra's own tools for the
CI-sized run, the centre's `central` extra (the uplink tests deliver to a real receiver)
for the full one. pytest runs from the copied work tree (/usr/src/datalab-edge).

CI-sized in the normal run (marker `platform`): the install and the drivers + buffer tests.
The rest of the van's tests (agent, uplink, config, time keeping ...) under `--run-slow`.
Left out under emulation: the microphone's capture tests (tests/test_microphone_driver.py, and
the other tests/test_noise_*.py that run audio through it in real time; the levels and weighting
tests, which do not, are in the full run): numpy at 48 kHz under qemu (every vector instruction translated) is far
slower than on a Pi's own cores. Tried here: test_microphone_driver.py had 8 passed and 2 failed,
the two that feed 61-62 s of audio and give the driver 30 s, which got through 27 and 57 s of it
under emulation; timing that says nothing about a Pi.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.platform.container import Container, sweep_stale
from tests.platform.emulation import AARCH64, BINFMT, EmulationError, ensure_binfmt, entry
from tests.platform.rootfs import ARM64_PACKAGES, Recipe, ensure_rootfs
from tests.platform.van import SRC, VENV_PY, Van

ROOT = Path(__file__).resolve().parents[1]
TEST_VENV = "/opt/datalab-tests"
# conftest.py finds the captured sensor fixtures beside the repository (../shared/fixtures).
FIXTURES = ROOT.parent / "shared" / "fixtures"

# The van's tests, by part. CI-sized: drivers + buffer (the code closest to the hardware and
# to the SD card, where an architecture would show: struct packing, serial and I2C byte order).
CI_TESTS = (
    "tests/test_buffer.py",
    "tests/test_pm_drivers.py",
    "tests/test_i2c_ads1115.py",
    "tests/test_sound_module.py",
    "tests/test_gps_driver.py",
)
FULL_TESTS = CI_TESTS + (
    "tests/test_buffer_faults.py",
    "tests/test_agent.py",
    "tests/test_timekeeping.py",
    "tests/test_uplink.py",
    "tests/test_uplink_idle.py",
    "tests/test_config.py",
    "tests/test_simulated_hardware.py",
    "tests/test_power.py",
    "tests/test_pm_fixtures.py",
    "tests/test_gps_fixtures.py",
    "tests/test_wire.py",
    # The noise DSP's levels and weighting filters: no real-time loop, they pass under emulation.
    "tests/test_noise_levels.py",
    "tests/test_noise_weighting.py",
)

pytestmark = [pytest.mark.platform, pytest.mark.timeout(5400)]


def _need_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("the platform tests boot a container: they need root")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: scripts/bootstrap --with-tests installs it")
    try:
        ensure_binfmt(AARCH64)
    except EmulationError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def arm64_rootfs() -> Path:
    _need_tools()
    t0 = time.monotonic()
    # 686 s cold here under load (dpkg configures every package under emulation); cached after.
    base = ensure_rootfs(Recipe(arch="arm64", packages=ARM64_PACKAGES))
    print(f"arm64 rootfs ready after {time.monotonic() - t0:.0f} s: {base}")
    return base


def test_arm64_programs_run_in_a_chroot_through_qemu(arm64_rootfs: Path) -> None:
    # The rootfs's programs are aarch64 ELF (e_machine 0xb7), not this machine's.
    with open(arm64_rootfs / "usr/bin/uname", "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF" and header[18:20] == b"\xb7\x00", header
    # The chroot has no qemu of its own: they run only because the F flag had the kernel open
    # the interpreter here, at registration (tests/platform/emulation.py).
    assert not list(arm64_rootfs.glob("usr/bin/qemu-*")) and not (arm64_rootfs / "usr/libexec/qemu-binfmt").exists()
    r = _chroot_uname(arm64_rootfs)
    assert (r.returncode, r.stdout.strip()) == (0, "aarch64"), r


def _chroot_uname(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(root), "/usr/bin/uname", "-m"], capture_output=True, text=True,
                          timeout=120)


def test_a_registration_without_the_F_flag_is_replaced(arm64_rootfs: Path) -> None:
    # As qemu-user-static's registration would be without F: the interpreter is looked up in the
    # chroot, which has none, and nothing there runs (the control that the F flag is what works).
    # For these moments no arm64 program can start on this machine: one arm64 run at a time.
    (BINFMT / AARCH64.name).write_text("-1")
    (BINFMT / "register").write_text(AARCH64.register_line().removesuffix(":PF") + ":P")
    try:
        assert entry(AARCH64)["flags"] == "P"
        r = _chroot_uname(arm64_rootfs)
        assert r.returncode != 0 and r.stdout == "", r
    finally:
        have = ensure_binfmt(AARCH64)
    assert have["state"] == "enabled" and "F" in have["flags"], have
    r = _chroot_uname(arm64_rootfs)
    assert (r.returncode, r.stdout.strip()) == (0, "aarch64"), r


@pytest.fixture(scope="module")
def arm64_van(arm64_rootfs: Path) -> Iterator[Van]:
    sweep_stale()
    box = Container(arm64_rootfs)
    try:
        box.boot(timeout=300)  # systemd under emulation: slower than the amd64 boot's ~2 s
        v = Van(box)
        t0 = time.monotonic()
        r = v.install(ROOT)
        assert r.returncode == 0, f"scripts/install-pi failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        print(f"install-pi under emulation took {time.monotonic() - t0:.0f} s")
        if FIXTURES.is_dir():
            shutil.copytree(FIXTURES, box.path(str(Path(SRC).parent / "shared" / "fixtures")))
        t0 = time.monotonic()
        box.run(["python3", "-m", "venv", TEST_VENV], timeout=600)
        van_site, test_site = (_purelib(box, py) for py in (VENV_PY, f"{TEST_VENV}/bin/python"))
        box.path(test_site).joinpath("van.pth").write_text(van_site + "\n")
        _pip_install(box, _extra("test"))
        print(f"the test venv under emulation took {time.monotonic() - t0:.0f} s")
        yield v
    finally:
        box.close()


def _extra(name: str) -> list[str]:
    """pyproject.toml's requirements of extra ``name``, without the project's own extras."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return [r for r in extras[name] if not re.match(r"datalab-edge\b", r)]


def _purelib(box: Container, python: str) -> str:
    return box.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()


def _pip_install(box: Container, requirements: list[str]) -> None:
    quoted = " ".join(f"'{r}'" for r in requirements)
    box.run(f"{TEST_VENV}/bin/python -m pip install --quiet {quoted}", timeout=3600, env=box.pip_env)


def test_install_pi_gives_an_aarch64_van(arm64_van: Van) -> None:
    box = arm64_van.box
    # The userland is arm64 (what install-pi reads), and the van's Python runs as aarch64.
    assert box.run(["dpkg", "--print-architecture"]).stdout.strip() == "arm64"
    probe = ("import platform, numpy, numpy.linalg, paho.mqtt, serial, smbus2;"
             "print(platform.machine(), numpy.__file__)")
    machine, numpy_at = box.run([VENV_PY, "-c", probe]).stdout.split()
    assert machine == "aarch64", machine
    # numpy came as an aarch64 wheel (a compiled extension for this architecture), not built here:
    # the rootfs has no compiler, as a fresh Pi OS Lite.
    exts = list(box.path(str(Path(numpy_at).parent)).rglob("_multiarray_umath*.so"))
    assert exts and all("aarch64" in e.name for e in exts), exts
    assert box.run(["sh", "-c", "command -v gcc cc"], check=False).stdout.strip() == ""
    assert box.run(["systemctl", "is-enabled", "datalab-edge.service"]).stdout.strip() == "enabled"
    # The agent's own entry point works on this architecture.
    out = box.run(["/opt/datalab-edge/venv/bin/edge", "--help"]).stdout
    assert "Usage" in out
    # The tests' venv runs on the van's own packages, not copies of its own.
    r = box.run([f"{TEST_VENV}/bin/python", "-c", "import numpy, pytest; print(numpy.__file__)"])
    assert r.stdout.strip() == numpy_at, (r.stdout, numpy_at)


def _run_van_tests(van: Van, files: tuple[str, ...], tmp_path: Path) -> ET.Element:
    """pytest inside, on the aarch64 Python; its JUnit report."""
    report = "/tmp/arm64-report.xml"
    t0 = time.monotonic()
    r = van.box.run(
        f"cd {SRC} && {TEST_VENV}/bin/python -m pytest -q -rs -p no:cacheprovider "
        f"--junitxml={report} {' '.join(files)}",
        check=False, timeout=5400)
    took = time.monotonic() - t0
    print(f"{len(files)} test files under emulation: {took:.0f} s\n{r.stdout[-4000:]}")
    # Read from inside: the booted container's /tmp is its own tmpfs, not the overlay seen from here.
    xml = van.box.run(["cat", report], check=False)
    assert xml.returncode == 0, f"pytest left no report:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    (tmp_path / "report.xml").write_text(xml.stdout)
    assert r.returncode == 0, f"the van's tests failed under arm64:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    return ET.parse(tmp_path / "report.xml").getroot()


def _assert_all_ran(root: ET.Element, files: tuple[str, ...]) -> None:
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = [c for c in suite.iter("testcase") if c.find("skipped") is not None]
    ran = {c.get("classname", "").split(".")[1] for c in suite.iter("testcase")
           if c.find("skipped") is None}
    assert failed == 0, f"{failed} failed"
    # Every file contributed passing tests: a file that failed to collect or skipped whole
    # (say, a missing arm64 wheel turned into an import skip) would not.
    assert {Path(f).stem for f in files} <= ran, (sorted(ran), files)
    # Skips only for what is skipped on any machine too (the slow runs behind --run-slow).
    odd = [(c.get("name"), c.find("skipped").get("message", "")) for c in skipped  # type: ignore[union-attr]
           if "--run-slow" not in (c.find("skipped").get("message") or "")]  # type: ignore[union-attr]
    assert not odd, odd
    assert total - len(skipped) > 0


def test_drivers_and_buffer_tests_pass_on_arm64(arm64_van: Van, tmp_path: Path) -> None:
    _assert_all_ran(_run_van_tests(arm64_van, CI_TESTS, tmp_path), CI_TESTS)


@pytest.mark.slow
def test_the_vans_tests_pass_on_arm64(arm64_van: Van, tmp_path: Path) -> None:
    t0 = time.monotonic()
    _pip_install(arm64_van.box, _extra("central"))  # the receiver the uplink tests deliver to
    print(f"the centre's packages under emulation took {time.monotonic() - t0:.0f} s")
    files = FULL_TESTS[len(CI_TESTS):]  # the CI-sized test above has run the others
    _assert_all_ran(_run_van_tests(arm64_van, files, tmp_path), files)
