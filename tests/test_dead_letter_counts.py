"""Issue 13: ``stats`` counts each rejected upload once, however often it is delivered.

v13b killed the broker mid-flood: rejected uploads whose answer died with the broker were
sent again by the van, and ``dead_letters`` said 335 for 269 uploads. Now ``dead_letters``
counts distinct rejected uploads (equal bytes on one topic: a sealed batch never changes
its bytes) and ``dead_letters_repeated`` the further deliveries; every delivery still
leaves its row. Store level on both stores, then through a real Mosquitto that is
SIGKILLed and restarted, the real receiver process, and ``datalab-receiver stats``.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from receiver.ingest import Ingestor
from tests.delivery_harness import Receiver
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_store_contract import MakeStore, make, q  # noqa: F401  (make: fixture, both stores)
from core.wire import content_hash, decode_ack

RECEIVED = 1_790_000_000_000
A, B = "datalab/v1/van-a/batch", "datalab/v1/van-b/batch"


def test_a_rejected_upload_counts_once_however_often_it_comes(make: MakeStore) -> None:
    s = make()
    ing = Ingestor(s)
    junk, other = b"not a batch 1", b"not a batch 2"
    for _ in range(3):  # the van sends it again each time its answer is lost
        assert ing.handle(A, junk, RECEIVED).ack.status == "rejected"
    assert ing.handle(B, junk, RECEIVED).ack.status == "rejected"  # another van's upload
    # A broker redelivery (DUP) of a message not acked yet: matched by its packet id, not written again.
    for _ in range(2):
        out = ing.handle_many([(A, other, RECEIVED)], redelivered={0}, mids=[7])
        assert out[0].ack.status == "rejected"
    counts = s.counts()
    rows = q(s, "SELECT topic, sha256 FROM dead_letters ORDER BY id")
    print(f"\n{type(s).__name__}: counters {counts}; rows {len(rows)}")
    assert counts["dead_letters"] == 3  # junk on A, junk on B, other on A
    assert counts["dead_letters_repeated"] == 3  # junk on A twice more, other's DUP copy once
    assert [(t, sha) for t, sha in rows] == [(A, content_hash(junk))] * 3 + [
        (B, content_hash(junk)), (A, content_hash(other))]
    assert counts["dead_letters"] == len({(t, sha) for t, sha in rows})


def _wait(cond: Any, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(cond())


def test_after_a_broker_kill_the_resent_uploads_are_not_counted_again(tmp_path: Path, mosquitto: Any) -> None:
    store = tmp_path / "store.sqlite"
    uploads = [f"hostile upload {i}".encode() for i in range(40)]
    acks: list[str] = []

    def van() -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="van-count", clean_session=True)
        c.on_message = lambda cl, u, m: acks.append(decode_ack(m.payload).sha256)
        c.connect("127.0.0.1", mosquitto.port)
        c.loop_start()
        return c

    def rows() -> int:
        db = sqlite3.connect(store, timeout=30)
        try:
            return int(db.execute("SELECT count(*) FROM dead_letters").fetchone()[0])
        except sqlite3.OperationalError:  # not created yet
            return 0
        finally:
            db.close()

    rx = Receiver(store, mosquitto.port, client_id="rx-count")
    rx.start()
    try:
        # First sending: the receiver rejects each, but the answers never reach the van (it is
        # not subscribed: as if they died with the broker), and then the broker dies.
        v = van()
        for p in uploads:
            v.publish(A, p, qos=1).wait_for_publish(10)
        assert _wait(lambda: rows() == len(uploads)), rows()
        v.loop_stop()
        v.disconnect()
        mosquitto.kill()
        mosquitto.start()
        # The van comes back and sends again everything it has no answer for.
        v = van()
        v.subscribe("datalab/v1/van-a/ack", qos=1)
        time.sleep(0.5)
        for p in uploads:
            v.publish(A, p, qos=1).wait_for_publish(10)
        assert _wait(lambda: set(acks) >= {content_hash(p) for p in uploads}, 90), len(set(acks))
        v.loop_stop()
        v.disconnect()
        assert rx.alive(), rx.log.read_text()[-2000:]
    finally:
        rx.stop()
    out = subprocess.run([sys.executable, "-m", "receiver.cli", "stats", "--store", str(store), "--json"],
                         capture_output=True, text=True, timeout=60)
    counters = json.loads(out.stdout)["counters"]
    print(f"\nafter a broker kill: {len(uploads)} uploads, {rows()} deliveries kept; stats {counters}")
    assert rows() == 2 * len(uploads)  # every delivery leaves its row
    assert counters["dead_letters"] == len(uploads)
    assert counters["dead_letters_repeated"] == len(uploads)


def test_a_groups_rejections_are_one_transaction(tmp_path: Path) -> None:
    """A flood of rejections costs one commit per group, not one each (issue 13: on PostgreSQL one
    transaction per dead letter was most of a hostile group's time, and van B waited behind it)."""
    from receiver.store import SQLiteStore

    s = SQLiteStore(tmp_path / "d.sqlite")
    statements: list[str] = []
    s.conn.set_trace_callback(statements.append)
    group = [(A, b"junk %d" % i, RECEIVED) for i in range(30)] + [(A, b"junk 0", RECEIVED)]
    out = Ingestor(s).handle_many(group)
    s.conn.set_trace_callback(None)
    commits = [x for x in statements if x.strip().upper().startswith("COMMIT")]
    print(f"\n{len(group)} rejected uploads in one group: {len(commits)} commit(s)")
    assert [o.ack.status for o in out] == ["rejected"] * len(group)
    assert len(commits) == 1
    counts = s.counts()
    assert (counts["dead_letters"], counts["dead_letters_repeated"]) == (30, 1)
    assert q(s, "SELECT count(*) FROM dead_letters") == [(31,)]
    s.close()
