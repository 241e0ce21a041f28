"""Issue 13 re-test, point 5: a stale un-acked mark must not swallow a new upload's dead letter.

From the v13 tester's probe (probes/test_v13_dead_letter_stale_mark.py on branch v13), kept as
it was: the receiver clears the dead letters' un-acked marks (``dead_letters_acked``) AFTER the
broker acks, and if that DELETE fails it only logs. The acked upload's mark then stays. A later,
genuinely new upload of the same bytes, held in a store outage (a real exclusive lock), receiver
SIGKILLed, redelivered by the broker with DUP, matched the stale mark and got no dead letter:
2 uploads, 1 dead letter. The failing DELETE is injected with a SQLite trigger (standing in for
the store being locked or full at that instant); everything else is real: Mosquitto, the
receiver process (tests/delivery_harness.Receiver), SIGKILL, broker redelivery. Now the mark
carries the MQTT packet id, and the broker re-sends with the original id: the new upload's
copy does not match the old mark.
"""
from __future__ import annotations

import sqlite3
import time
from typing import Any

import paho.mqtt.client as mqtt

from tests.delivery_harness import Receiver
from core.wire import content_hash, decode_ack


def test_stale_mark_does_not_swallow_a_new_upload(tmp_path: Any, mosquitto: Any) -> None:
    store = tmp_path / "store.sqlite"
    bad = b"not a batch v13"
    acks: list[str] = []
    van = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="van-v13dl", clean_session=True)
    van.on_message = lambda c, u, m: acks.append(decode_ack(m.payload, "van-dl13").status)
    van.connect("127.0.0.1", mosquitto.port)
    van.subscribe("datalab/v1/van-dl13/ack", qos=1)
    van.loop_start()

    def wait(cond, timeout=60.0):
        d = time.monotonic() + timeout
        while not cond() and time.monotonic() < d:
            time.sleep(0.05)
        return cond()

    def sql(stmt, *args):
        db = sqlite3.connect(store, timeout=30, isolation_level=None)
        try:
            return db.execute(stmt, args).fetchall()
        finally:
            db.close()

    def rows():
        return sql("SELECT count(*) FROM dead_letters WHERE sha256 = ?", content_hash(bad))[0][0]

    r = Receiver(store, mosquitto.port, client_id="rx-v13dl")
    lock = None
    try:
        r.start()
        # A first, ordinary upload so the store and its tables exist.
        van.publish("datalab/v1/van-dl13/batch", b"warm-up junk", qos=1).wait_for_publish(10)
        assert wait(lambda: len(acks) == 1)
        sql("CREATE TRIGGER v13_fail_clear BEFORE DELETE ON dead_letters_unacked"
            " BEGIN SELECT RAISE(FAIL, 'v13 injected: store refused the write'); END")
        van.publish("datalab/v1/van-dl13/batch", bad, qos=1).wait_for_publish(10)  # upload 1 of X
        assert wait(lambda: len(acks) == 2)
        time.sleep(0.5)
        first = rows()
        marks = sql("SELECT count(*) FROM dead_letters_unacked")[0][0]
        sql("DROP TRIGGER v13_fail_clear")
        lock = sqlite3.connect(store, timeout=30, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        van.publish("datalab/v1/van-dl13/batch", bad, qos=1).wait_for_publish(10)  # upload 2, same bytes
        time.sleep(4)
        held_unacked = len(acks) == 2
        r.kill()
        lock.execute("ROLLBACK")
        lock.close()
        lock = None
        r.start()
        assert wait(lambda: len(acks) == 3, 30), acks
        time.sleep(1)
        total = rows()
    finally:
        if lock is not None:
            lock.close()
        van.loop_stop()
        van.disconnect()
        r.stop()
    print(f"\nupload 1 of X acked ({acks[1]}), its un-acked mark not cleared (marks left: {marks}); dead letters of "
          f"X: {first}; upload 2 of X held un-acked in the outage: {held_unacked}; after kill + DUP "
          f"redelivery: {total} dead letter(s) for 2 uploads; acks {acks}")
    assert first == 1 and marks >= 1  # the injected failure left the acked upload's mark behind
    assert held_unacked  # upload 2 was held in the outage, then redelivered (DUP) to the new run
    assert acks == ["rejected"] * 3
    assert total == 2, f"{total} dead letter(s) for 2 uploads of X"
