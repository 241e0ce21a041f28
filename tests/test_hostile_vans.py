"""Issue 13's hostile-van suite: one bad van never stops the city's data.

A real Mosquitto runs the shipped TLS and ACL configuration (simulator.broker,
secure mode, as in tests/test_broker_security.py); the real receiver process
(``datalab-receiver run`` with a TOML config, over TLS with its own account)
consumes from it into SQLite or a throwaway PostgreSQL (tests/pg.py). Van A,
through its own TLS account, sends hundreds of uploads of every kind in
tests/hostile.py (Hypothesis-generated defects and issue 13's known killers)
plus hostile status and sync messages, as fast as the broker takes them. Van B
meanwhile uploads ordinary batches. Asserted:

* every van B batch is stored and answered ``stored`` within 5 s of sending
  (issue 13: after van A's payloads van B got 0 of 54 confirmed);
* every van A upload gets its answer, the one its defect calls for (``rejected``
  with a reason and a dead letter holding the payload, or ``stored``);
* what was stored is exactly van B's batches and van A's valid ones;
* the receiver process stays up, and its peak RSS (printed) stays under
  ``RSS_BOUND_MB`` (issue 13: 300 MB by default, whatever vans send).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pytest

from receiver.store_factory import open_store
from simulator.broker import LocalBroker, SecureSetup, mosquitto_path
from tests.hostile import (
    HOSTILE_STATUS,
    REJECTED,
    STORED,
    Hostile,
    collect,
    hostile_sync,
    killers,
    ordinary,
)
from tests.pg import pg_cluster, pg_dsn  # noqa: F401
from tests.test_broker_security import Probe
from core.wire import Ack, batch_topic, content_hash, decode_ack, status_topic, sync_topic

pytestmark = pytest.mark.skipif(not mosquitto_path(), reason="mosquitto is not installed")

P = "datalab/v1"
B_LATENCY_S = 5.0  # issue 13: every van B batch stored and answered within 5 s of sending
B_EVERY_S = 0.25
RSS_BOUND_MB = 300  # issue 13, point 5: the receiver's RSS stays within 300 MB whatever vans send


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    b = LocalBroker("mosquitto", workdir=tmp_path_factory.mktemp("hostile-broker"),
                    secure=SecureSetup(devices=("van-a", "van-b")))
    b.start()
    yield b
    b.close()


@pytest.fixture(params=["sqlite", "pg"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "datalab.sqlite") if request.param == "sqlite" else request.getfixturevalue("pg_dsn")


class Van:
    """One van's TLS connection with its own account: publishes, and notes every ack with its time."""

    def __init__(self, broker: LocalBroker, device: str) -> None:
        info = broker.secure_info
        assert info is not None
        self.device = device
        self.probe = Probe(info.device_port, username=device, password=info.passwords[device],
                           ca_file=info.ca_file, client_id=f"hostile-{device}")
        # first 32 hex of the payload's sha256 (what a binary ack carries) -> (arrival, ack)
        self.acks: dict[str, list[tuple[float, Ack]]] = defaultdict(list)
        self.lock = threading.Lock()
        self.probe.c.on_message = self._on_message
        assert self.probe.connect() == "ok"
        self.probe.subscribe(f"{P}/{device}/ack")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        ack = decode_ack(msg.payload, self.device)  # binary for v4 batches, JSON for the rest
        with self.lock:
            self.acks[ack.sha256[:32]].append((time.monotonic(), ack))

    def send(self, topic: str, payload: bytes) -> float:
        """Publish at QoS 1 and wait for the broker's PUBACK; when it was sent."""
        t = time.monotonic()
        self.probe.publish(topic, payload)
        return t

    def answered(self, sha: str, times: int = 1) -> bool:
        with self.lock:
            return len(self.acks.get(sha[:32], ())) >= times

    def close(self) -> None:
        self.probe.close()


@dataclass
class Report:
    a_sent: Counter[str] = field(default_factory=Counter)  # by kind
    a_outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, status)
    b_latencies: list[float] = field(default_factory=list)
    other_sent: int = 0  # status and sync messages from van A
    peak_rss_mb: float = 0.0


@contextmanager
def receiver_process(broker: LocalBroker, store_url: str, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``datalab-receiver run`` for the secure broker (TLS, the receiver account), until stopped."""
    cfg = broker.receiver_config(store_url)
    keys = ("store", "host", "port", "tls", "ca_file", "username", "password")
    conf = workdir / "receiver.toml"
    conf.write_text("[receiver]\n" + "".join(f"{k} = {json.dumps(getattr(cfg, k))}\n" for k in keys))
    ready, log = workdir / "receiver.ready", workdir / "receiver.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "receiver.cli", "run", "--config", str(conf),
                                 "--ready-file", str(ready)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        yield proc
        assert proc.poll() is None, f"the receiver died: {log.read_text()[-3000:]}"
        # Its TLS connection held (issue 13 re-test: the worker wrote the SSL socket beside the
        # loop thread; "bad record mac" at the broker, a dropped connection, a crash).
        assert "broker unreachable" not in log.read_text(errors="replace"), log.read_text()[-3000:]
        assert "bad record mac" not in broker.log_path.read_text(errors="replace")
    finally:
        proc.terminate()
        proc.wait(30)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_hostile(broker: LocalBroker, store_url: str, uploads: list[Hostile], workdir: Path, *,
                min_b: int = 20, timeout_s: float = 120.0) -> Report:
    a = b = None
    report = Report()
    with receiver_process(broker, store_url, workdir) as rx:
        try:
            a, b = Van(broker, "van-a"), Van(broker, "van-b")
            payloads = [(h, h.build(f"h{i:05d}")) for i, h in enumerate(uploads)]
            a_done = threading.Event()

            def flood() -> None:
                assert a is not None
                try:
                    for i, (h, p) in enumerate(payloads):
                        a.send(batch_topic(P, "van-a"), p)
                        report.a_sent[h.kind] += 1
                        if i % 10 == 0:  # hostile heartbeats and sync requests among the uploads
                            k = i // 10
                            a.send(status_topic(P, "van-a"), HOSTILE_STATUS[k % len(HOSTILE_STATUS)])
                            syncs = hostile_sync("van-a", "van-a/x/1-2")
                            a.send(sync_topic(P, "van-a"), syncs[k % len(syncs)])
                            report.other_sent += 2
                finally:
                    a_done.set()

            flooder = threading.Thread(target=flood, name="van-a", daemon=True)
            flooder.start()
            b_sent: list[tuple[str, float]] = []
            while not a_done.is_set() or len(b_sent) < min_b:
                p = ordinary("van-b", 1 + 6 * len(b_sent)).build("b1")
                b_sent.append((content_hash(p), b.send(batch_topic(P, "van-b"), p)))
                time.sleep(B_EVERY_S)
            flooder.join(timeout_s)

            # Every upload's answer, then judge them.
            shas = Counter(content_hash(p) for _, p in payloads)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and not (
                all(a.answered(s, n) for s, n in shas.items()) and all(b.answered(s) for s, _ in b_sent)
            ):
                time.sleep(0.1)
            report.peak_rss_mb = peak_rss_mb(rx.pid)
        finally:
            for van in (a, b):
                if van is not None:
                    van.close()
    assert a is not None and b is not None
    missing_b = [s for s, _ in b_sent if not b.answered(s)]
    assert not missing_b, f"{len(missing_b)} of {len(b_sent)} van B batches never answered"
    for sha, sent_at in b_sent:
        arrived, ack = b.acks[sha[:32]][0]
        assert ack.status == STORED, ack
        report.b_latencies.append(arrived - sent_at)
    for h, p in payloads:
        got = a.acks.get(content_hash(p)[:32], [])
        assert got, f"van A's {h.kind} upload got no answer"
        statuses = {ack.status for _, ack in got}
        allowed = {STORED, "duplicate"} if h.expect == STORED else {REJECTED}
        assert statuses <= allowed, (h.kind, [ack.reason for _, ack in got])
        if h.expect == REJECTED:
            assert all(ack.reason for _, ack in got), h.kind
        report.a_outcomes[(h.kind, got[0][1].status)] += 1

    # The store holds exactly what was valid; every rejection is a dead letter with its payload.
    store = open_store(store_url)
    try:
        conn: Any = store.conn
        ph = "?" if type(store).__name__ == "SQLiteStore" else "%s"
        n_b = conn.execute(f"SELECT count(*) FROM samples WHERE device = {ph}", ("van-b",)).fetchone()[0]
        assert n_b == 6 * len(b_sent)
        valid_a = sum(n for (_, st), n in report.a_outcomes.items() if st == STORED)
        n_a = conn.execute(f"SELECT count(*) FROM batches WHERE device = {ph}", ("van-a",)).fetchone()[0]
        assert n_a == valid_a
        rejected_sends = sum(1 for h, _ in payloads if h.expect == REJECTED)
        dead = conn.execute(f"SELECT count(*), min(length(reason)) FROM dead_letters WHERE topic = {ph}",
                            (batch_topic(P, "van-a"),)).fetchone()
        assert dead[0] == rejected_sends and dead[1] > 0
        assert store.fleet_status() == []  # no hostile heartbeat was kept
    finally:
        store.close()
    return report


def _print_and_check(report: Report, label: str, min_uploads: int) -> None:
    lat = sorted(report.b_latencies)
    print(f"\n{label}: van A sent {sum(report.a_sent.values())} uploads of {len(report.a_sent)} kinds"
          f" and {report.other_sent} status/sync messages; outcomes by kind: {sorted(report.a_outcomes.items())}")
    print(f"{label}: van B {len(lat)} batches, ack latency median {lat[len(lat) // 2]:.3f} s,"
          f" max {lat[-1]:.3f} s; receiver peak RSS {report.peak_rss_mb:.0f} MB")
    assert sum(report.a_sent.values()) >= min_uploads
    assert sum(n for (_, st), n in report.a_outcomes.items() if st == REJECTED) >= min_uploads * 0.8
    assert len(report.a_sent) >= 40  # generated kinds and the killers
    assert lat[-1] <= B_LATENCY_S, f"a van B batch waited {lat[-1]:.1f} s for its ack"
    assert 0 < report.peak_rss_mb <= RSS_BOUND_MB


def test_hostile_van_does_not_stop_the_others(broker: LocalBroker, store_url: str, tmp_path: Path) -> None:
    uploads = collect("van-a", 9) + killers("van-a")
    report = run_hostile(broker, store_url, uploads, tmp_path)
    _print_and_check(report, "sqlite" if not store_url.startswith("postgresql") else "postgresql", 200)


@pytest.mark.slow
def test_hostile_van_long_run(broker: LocalBroker, store_url: str, tmp_path: Path) -> None:
    uploads = collect("van-a", 80) + killers("van-a") * 10
    report = run_hostile(broker, store_url, uploads, tmp_path, min_b=100, timeout_s=600)
    _print_and_check(report, "long " + ("sqlite" if not store_url.startswith("postgresql") else "postgresql"),
                     2000)
