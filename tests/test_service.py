"""The agent as a systemd service: sd_notify, the watchdog, stop, reload, logs without secrets."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge.cli import main
from edge.config import parse_config
from edge.logging_setup import JournalJsonFormatter, RedactingFilter, Redactor, secrets_of, setup_logging
from edge.runtime import Runtime, check_config_data, load_full_config
from edge.systemd_supervisor import Notifier
from simulator.broker import free_port

ROOT = Path(__file__).resolve().parents[1]


def sim_toml(data_dir: Path, *, rate: float = 1.0, speedup: float = 20, extra: str = "") -> str:
    return f"""
[device]
id = "van-svc"
data_dir = "{data_dir}"
[sampling]
rate_hz = {rate}
commit_interval_s = 1.0
[uplink]
host = "127.0.0.1"
port = {free_port()}
password = "hunter2-secret"
reconnect_min_s = 0.5
reconnect_max_s = 2.0
[simulation]
enabled = true
speedup = {speedup}
shift_hours = 8.0
[sensors.pm]
driver = "sim-pm"
[sensors.gps]
driver = "sim-gps"
{extra}
"""


class NotifySocket:
    """A fake systemd: binds a unix datagram socket and collects what is sent to it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def has(self, line: str) -> list[float]:
        return [t for t, m in self.messages if line in m.splitlines()]

    def wait_for(self, line: str, timeout: float = 20.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = self.has(line)
            if hits:
                return hits[0]
            time.sleep(0.02)
        raise AssertionError(f"no {line!r} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path):
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def test_edge_run_under_fake_systemd(tmp_path: Path, notify_socket: NotifySocket) -> None:
    """READY=1 after sampling starts, WATCHDOG=1 periodically, STOPPING=1 and a clean exit on SIGTERM."""
    conf = tmp_path / "agent.toml"
    conf.write_text(sim_toml(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "600000", "JOURNAL_STREAM": "8:1"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(conf)], cwd=ROOT,
                            env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        ready = notify_socket.wait_for("READY=1")
        time.sleep(1.5)
        pings = [t for t in notify_socket.has("WATCHDOG=1") if t > ready]
        assert len(pings) >= 4, notify_socket.messages  # every 0.2 s
        assert max(b - a for a, b in zip(pings, pings[1:])) < 0.6
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        took = time.monotonic() - t_term
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert took < 10, "a clean stop must fit well within TimeoutStopSec"
    assert notify_socket.has("STOPPING=1")
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["taken"] > 0 and stats["committed"] == stats["taken"], "every sample committed at stop"
    # The journal gets JSON lines with a priority prefix, and never the password.
    lines = [ln for ln in err.splitlines() if ln.startswith("<")]
    assert lines, err[-2000:]
    entry = json.loads(lines[0][3:])
    assert entry["device"] == "van-svc" and {"level", "logger", "msg"} <= set(entry)
    assert "hunter2-secret" not in err


class BlockingDriver:
    name = "stuck"

    def __init__(self) -> None:
        self.block = threading.Event()
        self.release = threading.Event()

    def read(self):  # type: ignore[no-untyped-def]
        if self.block.is_set():
            self.release.wait(30)
        return None

    def close(self) -> None:
        self.release.set()


def _runtime(tmp_path: Path, notify_path: str, *, extra: str = "", watchdog_s: float = 0.6) -> Runtime:
    (tmp_path / "data").mkdir(exist_ok=True)
    conf = tmp_path / "agent.toml"
    conf.write_text(sim_toml(tmp_path / "data", extra=extra))
    cfg, svc = load_full_config(conf)
    return Runtime(cfg, svc, config_path=conf, notifier=Notifier(notify_path), watchdog_s=watchdog_s)


def _start(rt: Runtime) -> threading.Thread:
    t = threading.Thread(target=rt.run, daemon=True)
    t.start()
    assert rt.supervisor.ready.wait(20)
    return t


def _stop(rt: Runtime, t: threading.Thread) -> None:
    rt.request_stop()
    t.join(15)
    assert not t.is_alive()
    rt.close()


def test_watchdog_stops_when_a_driver_hangs(tmp_path: Path, notify_socket: NotifySocket) -> None:
    rt = _runtime(tmp_path, notify_socket.path)
    stuck = BlockingDriver()
    rt.agent.drivers.append(stuck)
    t = _start(rt)
    time.sleep(0.8)
    assert notify_socket.has("WATCHDOG=1")
    stuck.block.set()
    time.sleep(0.5)  # stall_s = 0.3 s: the tick is stuck from now on
    n = len(notify_socket.has("WATCHDOG=1"))
    time.sleep(1.0)
    assert len(notify_socket.has("WATCHDOG=1")) == n, "no ping while the tick hangs"
    assert any("STATUS=unhealthy" in m for _, m in notify_socket.messages)
    stuck.release.set()
    stuck.block.clear()
    time.sleep(0.8)
    assert len(notify_socket.has("WATCHDOG=1")) > n, "pings resume once the loop moves again"
    _stop(rt, t)


def test_watchdog_stops_when_the_buffer_fails(tmp_path: Path, notify_socket: NotifySocket) -> None:
    import sqlite3

    rt = _runtime(tmp_path, notify_socket.path)
    t = _start(rt)
    time.sleep(0.6)
    assert notify_socket.has("WATCHDOG=1")
    real_commit = rt.agent.buffer.commit

    def failing(samples):  # type: ignore[no-untyped-def]
        raise sqlite3.OperationalError("disk I/O error")

    rt.agent.buffer.commit = failing  # type: ignore[method-assign]
    time.sleep(1.5)  # a commit a virtual second (20 per real second)
    n = len(notify_socket.has("WATCHDOG=1"))
    time.sleep(1.0)
    assert len(notify_socket.has("WATCHDOG=1")) == n, "no ping while commits fail"
    ok, reason = rt.supervisor.health.check()
    assert not ok and "disk I/O error" in reason
    rt.agent.buffer.commit = real_commit  # type: ignore[method-assign]
    time.sleep(1.0)
    assert len(notify_socket.has("WATCHDOG=1")) > n
    _stop(rt, t)


def test_sighup_reload_applies_and_keeps_old_on_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rt = _runtime(tmp_path, "")
    t = _start(rt)
    conf = rt.config_path
    assert conf is not None
    seq_before = rt.agent.stats.taken
    conf.write_text(conf.read_text().replace("rate_hz = 1.0", "rate_hz = 2.0").replace(
        "commit_interval_s = 1.0", "commit_interval_s = 1.0\n[batch]\nmax_samples = 77"))  # fmt: skip
    rt.request_reload()
    deadline = time.monotonic() + 5
    while rt.agent.cfg.sampling.rate_hz != 2.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rt.agent.cfg.sampling.rate_hz == 2.0 and rt.agent.cfg.batch.max_samples == 77
    buffer = rt.agent.buffer
    # An invalid file: logged by key, the running configuration kept.
    conf.write_text(conf.read_text().replace("rate_hz = 2.0", "rate_hz = 500.0").replace(
        "max_samples = 77", "max_samples = 0"))  # fmt: skip
    with caplog.at_level(logging.ERROR):
        rt.request_reload()
        time.sleep(0.5)
    assert rt.agent.cfg.sampling.rate_hz == 2.0
    assert "sampling.rate_hz" in caplog.text and "batch.max_samples" in caplog.text
    rt.request_stop()
    t.join(15)
    assert rt.agent.buffer is buffer
    assert rt.agent.stats.taken > seq_before
    assert rt.agent.stats.committed == rt.agent.stats.taken, "no sample lost across reloads"
    assert buffer.last_seq() == rt.agent.stats.committed and buffer.stats().samples_dropped == 0
    rt.close()


def test_config_check_lists_every_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    device = f'[device]\nid = "van-t"\ndata_dir = "{tmp_path}/data"\n'  # a file must name its van
    bad.write_text(device + '[sampling]\nrate_hz = 0\ncommit_interval_s = "5"\n[uplink]\nport = 70000\n'
                   '[power]\nignition_pin = 99\n[sensors.x]\ndriver = "nope"\n')  # fmt: skip
    r = CliRunner().invoke(main, ["config", "check", str(bad)])
    assert r.exit_code == 2
    for key in ("sampling.rate_hz", "sampling.commit_interval_s", "uplink.port", "power.ignition_pin",
                "sensors.x.driver"):  # fmt: skip
        assert key in r.output, r.output
    assert "5 configuration error(s)" in r.output
    good = tmp_path / "good.toml"
    good.write_text(device + '[power]\nignition_pin = 17\nshutdown_after_s = 60\n[uplink]\npassword = "pw-1234"\n')
    r = CliRunner().invoke(main, ["config", "check", str(good)])
    assert r.exit_code == 0, r.output
    assert '"ignition_pin": 17' in r.output and "pw-1234" not in r.output
    assert check_config_data({"device": {"id": "van 1"}}) [0].key == "device.id"


def test_log_filter_redacts_secrets_everywhere() -> None:
    # Built directly: no driver declares an api_token option (the schema would refuse it), but a
    # secret-named option must be redacted whatever the driver.
    from edge.config import AgentConfig, SensorConfig, UplinkConfig

    cfg = AgentConfig(uplink=UplinkConfig(password="s3cr3t-pw"),
                      sensors=[SensorConfig("x", "sim-pm", {"api_token": "tok-98765"})])  # fmt: skip
    assert set(secrets_of(cfg)) == {"s3cr3t-pw", "tok-98765"}
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter(Redactor(secrets_of(cfg))))
    handler.setFormatter(JournalJsonFormatter("van-9"))
    log = logging.getLogger("test.redact")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("connecting with %s", "s3cr3t-pw")
        log.info("token=tok-98765 in the message")
        try:
            raise RuntimeError("auth failed for s3cr3t-pw")
        except RuntimeError:
            log.exception("oops")
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert "s3cr3t-pw" not in text and "tok-98765" not in text
    assert text.count("***") >= 3
    first = out.getvalue().splitlines()[0]
    assert first.startswith("<4>")
    assert json.loads(first[3:])["device"] == "van-9"


def test_setup_logging_installs_one_redacting_handler() -> None:
    cfg = parse_config({"uplink": {"password": "another-secret"}})
    stream = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        setup_logging(cfg, json_lines=True, stream=stream)
        setup_logging(cfg, json_lines=True, stream=stream)  # again: replaced, not doubled
        logging.getLogger("paho.x").warning("password is another-secret")
        assert stream.getvalue().count("password is ***") == 1
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)


# -- health means measuring (issue #19.4) -------------------------------------------------------


def _pty_pm_runtime(tmp_path: Path, notify_path: str, pty_path: str, *, grace_s: float) -> Runtime:
    """A van with one real PMS5003 driver on a pseudo-terminal (no simulation), real time."""
    (tmp_path / "data").mkdir(exist_ok=True)
    conf = tmp_path / "agent.toml"
    conf.write_text(f"""
[device]
id = "van-deaf"
data_dir = "{tmp_path / 'data'}"
[sampling]
rate_hz = 5
commit_interval_s = 0.2
[uplink]
host = "127.0.0.1"
port = {free_port()}
[sensors.pm]
driver = "pms5003"
port = "{pty_path}"
mode = "active"
""")
    cfg, svc = load_full_config(conf)
    return Runtime(cfg, svc, config_path=conf, notifier=Notifier(notify_path), watchdog_s=0.6,
                   ready_grace_s=grace_s)  # fmt: skip


def test_a_van_whose_sensor_is_silent_is_not_ready_nor_fed_and_says_so(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """A PMS5003 on a line that stays silent: no READY before the grace period, then READY with a
    status that says so, no watchdog pings, and the heartbeat names the silent sensor; frames on the
    line bring the pings back."""
    from drivers.pms import build_data_frame

    master, slave = os.openpty()
    rt = _pty_pm_runtime(tmp_path, notify_socket.path, os.ttyname(slave), grace_s=2.0)
    t = threading.Thread(target=rt.run, daemon=True)
    started = time.monotonic()
    t.start()
    feeding = threading.Event()
    stop_feed = threading.Event()

    def feed() -> None:  # the sensor comes alive: a frame every 0.1 s, as a PMS5003 in active mode
        while not stop_feed.wait(0.1):
            if feeding.is_set():
                os.write(master, build_data_frame(pm_cf1=(5, 8, 12), pm_atm=(5, 8, 12), counts=(1, 2, 3, 4, 5, 6)))

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        ready_at = notify_socket.wait_for("READY=1", timeout=20)
        assert ready_at - started >= 1.5, "READY only after the grace period when no sensor read"
        ready_msg = next(m for _, m in notify_socket.messages if "READY=1" in m.splitlines())
        assert "NOT MEASURING" in ready_msg and "pm silent" in ready_msg, ready_msg
        time.sleep(0.6)
        n = len(notify_socket.has("WATCHDOG=1"))
        time.sleep(1.2)
        assert len(notify_socket.has("WATCHDOG=1")) == n, "no ping while no sensor sample is committed"
        hb = rt.agent.status()
        assert hb["measuring"] is False and hb["sensors"] == 1 and hb["sensors_silent"] == ["pm"]
        assert "not measuring" in hb["health"]
        assert any("STATUS=unhealthy: not measuring" in m for _, m in notify_socket.messages)

        feeding.set()
        deadline = time.monotonic() + 10
        while len(notify_socket.has("WATCHDOG=1")) <= n + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(notify_socket.has("WATCHDOG=1")) > n + 2, "pings resume once readings are committed"
        hb = rt.agent.status()
        assert hb["measuring"] is True and hb["sensors_reading"] == ["pm"] and hb["health"] == "ok"
    finally:
        stop_feed.set()
        feeder.join(2)
        _stop(rt, t)
        os.close(master)
        os.close(slave)
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["committed"] > 0


def test_ready_comes_with_the_first_reading_and_counts_real_sensors_only(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """Two simulated sensors and the calibration pseudo-sensor: READY says "2 of 2 sensors", not 3."""
    rt = _runtime(tmp_path, notify_socket.path)
    assert rt.announcer in rt.agent.drivers
    t = _start(rt)
    try:
        notify_socket.wait_for("READY=1")
        ready_msg = next(m for _, m in notify_socket.messages if "READY=1" in m.splitlines())
        assert "2 of 2 sensors reading" in ready_msg, ready_msg
        assert rt.supervisor.measuring.has_read
        hb = rt.agent.status()
        assert hb["sensors"] == 2 and "calibration" not in hb["sensors_reading"]
    finally:
        _stop(rt, t)


class _Counted:
    """What the Supervisor hands Measuring: a driver with a name and a reading count."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reads = 0
        self.asleep = False


def test_measuring_window_sleep_and_probation() -> None:
    from edge.measuring import Measuring

    now = [0.0]
    m = Measuring(grace_s=10, window_s=5, now=lambda: now[0])
    pm, cal = _Counted("pm"), _Counted("calibration")
    cal.reads = 3  # the pseudo-sensor's records are not measurements
    m.observe([pm, cal], committed=3)
    assert not m.ready and m.check() == (True, "ok")  # in grace
    now[0] = 11
    m.observe([pm, cal], committed=3)
    assert m.ready and not m.has_read
    assert m.check() == (False, "not measuring: no sensor has produced a reading")
    pm.reads = 1
    m.observe([pm, cal], committed=3)
    assert not m.check()[0], "read but not yet committed"
    m.observe([pm, cal], committed=4)
    assert m.check() == (True, "ok")
    now[0] = 17
    m.observe([pm, cal], committed=4)
    assert m.check() == (False, "not measuring: no reading committed for 6 s")
    pm.asleep = True  # parked: the duty cycle put the only sensor to sleep
    m.observe([pm, cal], committed=4)
    assert m.check() == (True, "ok") and m.status()["sensors_asleep"] == ["pm"]
    pm.asleep = False
    m.observe([pm, cal], committed=4)
    m.excused = lambda: True  # a remote change on probation decides (and rolls back) itself
    assert m.check() == (True, "ok")
    m.excused = lambda: False
    # A driver rebuilt by a reload counts from 0: its first reading counts.
    pm2 = _Counted("pm")
    pm2.reads = 1
    m.observe([pm2, cal], committed=4)
    m.observe([pm2, cal], committed=5)
    assert m.check() == (True, "ok")
    assert m.status() == {"measuring": True, "sensors": 1, "sensors_reading": ["pm"], "sensors_silent": [],
                          "sensors_asleep": []}
    # No sensor at all is never healthy after the grace.
    empty = Measuring(grace_s=0, window_s=5, now=lambda: now[0])
    empty.observe([cal], committed=0)
    assert empty.check() == (False, "not measuring: no sensor configured")
