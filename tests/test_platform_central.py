"""scripts/install-central on a real Debian (issue 17, what was left of point 4).

A booted bookworm with systemd as PID 1 (tests/platform/, as the van's platform test), with
PostgreSQL, PostGIS and Mosquitto from Debian's apt (tests/platform/central.py caches them).
The work tree is copied in and installed with scripts/install-central exactly as on a server;
the container is rebooted, and then: the central units come up by themselves, a van's upload
through the broker (TLS, its own account, made by `provision add-device`) ends in the store and
is acknowledged, the map timer is scheduled and its build runs, and `grant-reader` gives an
analyst role reads and no writes. The tests share one container and run in file order.
Several minutes on a warm cache (the install's pip is most of it), plus the centre's apt once.
"""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.platform.central import ensure_centre_rootfs
from tests.platform.container import Container, sweep_stale
from tests.platform.van import SRC, copy_tree
from tests.test_platform_systemd import _need_tools

ROOT = Path(__file__).resolve().parents[1]
RX = "/opt/datalab-edge/venv/bin/datalab-receiver"
STORE = "postgresql://datalab@/datalab?host=/var/run/postgresql"
WORKERS = ("datalab-receiver@1.service", "datalab-receiver@2.service")
UNITS = ("mosquitto.service", *WORKERS, "datalab-deriver.service", "datalab-api.service")

pytestmark = [pytest.mark.platform, pytest.mark.timeout(3600)]


def _sql(box: Container, query: str, *, role: str = "", check: bool = True) -> str:
    """psql as the superuser over the local socket (``role``: SET ROLE to that one first)."""
    text = (f"SET ROLE {role}; " if role else "") + query
    r = box.run(["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-d", "datalab", "-tA", "-v", "ON_ERROR_STOP=1",
                 "-c", text], check=check)
    return r.stdout.strip() if r.returncode == 0 else "ERROR: " + r.stderr.strip()


# The container shares this machine's network (as the van's platform test): the centre's
# PostgreSQL, Mosquitto and API listen on these ports here, so they must be free.
PORTS = (5432, 8080, 8883, 8884, 8885)


def _ports_in_use() -> list[int]:
    import socket

    busy = []
    for port in PORTS:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(port)
    return busy


@pytest.fixture(scope="module")
def centre() -> Iterator[Container]:
    _need_tools()
    sweep_stale()
    busy = _ports_in_use()
    if busy:
        pytest.fail(f"ports {busy} are taken on this machine: the centre in the container needs them "
                    "(it shares the network); stop what listens there")
    box = Container(ensure_centre_rootfs(), name=f"centre-test-{os.getpid()}")
    try:
        box.boot(timeout=300)
        copy_tree(ROOT, box.path(SRC))
        t0 = time.monotonic()
        r = box.run(f"cd {SRC} && scripts/install-central --now --workers 2 --broker-name localhost"
                    " --broker-name 127.0.0.1", check=False, timeout=2400, env=box.pip_env)
        assert r.returncode == 0, f"scripts/install-central failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        print(f"install-central took {time.monotonic() - t0:.0f} s")
        box.reboot(timeout=300)  # the centre must come up by itself, as after a power cut
        yield box
    finally:
        box.close()


def test_the_central_units_come_up_at_boot(centre: Container) -> None:
    def up() -> bool:
        return all(centre.run(["systemctl", "is-active", u], check=False).stdout.strip() == "active" for u in UNITS)

    centre.wait_for("the central units active", up, timeout=180)
    for u in UNITS:
        s = centre.show(u, "UnitFileState", "NRestarts", "ActiveState")
        assert s["UnitFileState"] in ("enabled", "indirect") or u.startswith("datalab-receiver@"), s
        assert s["NRestarts"] in ("0", ""), (u, s, centre.journal(u)[-2000:])
    # the store as install-central made it: PostGIS, samples partitioned by month, owned by datalab
    assert _sql(centre, "SELECT extname FROM pg_extension WHERE extname = 'postgis'") == "postgis"
    assert _sql(centre, "SELECT relkind FROM pg_class WHERE oid = 'datalab.samples'::regclass") == "p"
    assert _sql(centre, "SELECT nspowner::regrole FROM pg_namespace WHERE nspname = 'datalab'") == "datalab"
    # the API answers on loopback (Type=simple: active at fork, listening a moment later)
    def answers() -> bool:
        r = centre.run(["/opt/datalab-edge/venv/bin/python", "-c",
                        "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/api/v1/health',"
                        " timeout=10).status)"], check=False)
        return r.stdout.strip() == "200"

    try:
        centre.wait_for("the API answering /api/v1/health", answers, timeout=90, step=2)
    except Exception:
        raise AssertionError(centre.journal("datalab-api.service")[-2000:]) from None


def test_the_map_timer_is_scheduled_and_its_build_runs(centre: Container) -> None:
    t = centre.show("datalab-maps.timer", "ActiveState", "UnitFileState", "NextElapseUSecRealtime")
    assert t["ActiveState"] == "active" and t["UnitFileState"] == "enabled", t
    assert t["NextElapseUSecRealtime"] not in ("", "0"), t  # a next run is on the calendar
    listed = centre.run(["systemctl", "list-timers", "--all", "--no-pager"]).stdout
    assert "datalab-maps.timer" in listed and "datalab-maps.service" in listed, listed
    centre.run(["systemctl", "start", "datalab-maps.service"], timeout=600)  # oneshot: waits for the build
    s = centre.show("datalab-maps.service", "Result", "ExecMainStatus")
    assert s["Result"] == "success" and s["ExecMainStatus"] == "0", (s, centre.journal("datalab-maps.service"))


def test_a_vans_upload_through_the_broker_ends_in_the_store(centre: Container) -> None:
    from core.wire import encode_batch
    from edge.config import UplinkConfig
    from tests.test_receiver_store import batch
    from uplink.mqtt import MqttLink

    centre.run([RX, "provision", "add-device", "van-042", "--ca-dir", "/etc/datalab/ca", "--passwd-file",
                "/etc/mosquitto/datalab/devices.passwd", "--host", "localhost", "--out-dir", "/root/provisioned"])
    centre.run(["systemctl", "reload", "mosquitto.service"])
    up = tomllib.loads(centre.path("/root/provisioned/van-042/uplink.toml").read_text())["uplink"]
    assert up["port"] == 8883 and up["username"] == "van-042"
    # the bundle as it would be copied to the van (its TOML names the van's /etc/datalab-edge/ca.crt)
    cfg = UplinkConfig(host="localhost", port=8883, tls=True, ca_file=str(centre.path("/root/provisioned/van-042/ca.crt")),
                       username="van-042", password=up["password"])
    link = MqttLink(cfg, "van-042")
    link.start()
    try:
        deadline = time.monotonic() + 60  # the reload is asynchronous: the first attempts may be refused
        while not link.connected and time.monotonic() < deadline:
            time.sleep(0.2)
        assert link.connected, centre.journal("mosquitto.service")[-2000:]
        b = batch(0, 3, device="van-042")
        assert link.publish(b.batch_id, encode_batch(b))
        acks: list = []
        deadline = time.monotonic() + 60
        while not acks and time.monotonic() < deadline:
            acks.extend(link.acks())
            time.sleep(0.2)
        assert [(a.batch_id, a.status) for a in acks] == [("van-042/e1/1-6", "stored")], \
            centre.journal("datalab-receiver@1.service")[-2000:]
    finally:
        link.stop()
    assert _sql(centre, "SELECT count(*) FROM datalab.samples WHERE device = 'van-042'") == "6"
    # the workers only store (derive = "separate"): datalab-deriver places the values (the first
    # one precedes the first fix: no_fix, as tests/test_receiver_store.py's batches give)
    centre.wait_for("the deriver placing van-042's values", lambda: _sql(
        centre, "SELECT count(*) || ' ' || count(lat) FROM datalab.observations WHERE device = 'van-042'") == "3 2",
        timeout=120)
    # the van's password never reached a log
    assert up["password"] not in centre.run(["journalctl", "--no-pager", "-o", "cat"]).stdout


def test_grant_reader_gives_an_analyst_reads_and_no_writes(centre: Container) -> None:
    assert _sql(centre, "SELECT count(*) FROM datalab.observations", role="datalab") == "3"
    # the store's own role may not make roles on a real server: one line saying who may
    r = centre.run(["runuser", "-u", "datalab", "--", RX, "grant-reader", "--store", STORE, "analyst"], check=False)
    assert r.returncode == 1 and "runuser -u postgres" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # as the docs say (docs/datalab.md): as postgres, over the local socket
    r = centre.run(["runuser", "-u", "postgres", "--", RX, "grant-reader", "--store",
                    "postgresql:///datalab?host=/var/run/postgresql", "analyst"], check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    n = _sql(centre, "SELECT count(*) FROM datalab.observations WHERE device = 'van-042'", role="analyst")
    assert n == "3"
    refused = _sql(centre, "INSERT INTO datalab.counters VALUES ('x', 1)", role="analyst", check=False)
    assert refused.startswith("ERROR") and "permission denied" in refused, refused
    # a table the owner makes later (a new month's partitions, as the receiver makes them) is readable too
    centre.run(["runuser", "-u", "datalab", "--", "/opt/datalab-edge/venv/bin/python", "-c",
                "from receiver.store_pg import PostgresStore as P; s = P('" + STORE + "');"
                " s._ensure_months([1893456000000]); s.close()"])  # 2030-01
    assert _sql(centre, "SELECT count(*) FROM datalab.samples_y2030m01_rest", role="analyst") == "0"
