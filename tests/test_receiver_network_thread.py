"""Issue 13 re-test, point 1: the receiver's TLS socket is written from one thread only.

``run_forever`` (what ``datalab-receiver run`` uses) ran paho's ``loop_forever`` in the
caller's thread; paho then wrote each publish()/ack() the ingest worker made straight to
the SSL socket from the worker's thread while the loop read from it: under a flood the
broker saw "decryption failed or bad record mac" and the receiver once died in malloc.
Here the real receiver service runs ``run_forever`` against the shipped TLS + ACL
Mosquitto; every write to its socket is noted with the thread that made it (paho's own
``_sock_send``, the one place it writes): they must all come from paho's network thread,
none from the ingest worker, and every van batch is still stored and answered.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from receiver.mqtt_consumer import ReceiverService
from tests.hostile import STORED, ordinary
from tests.test_hostile_vans import Van, broker  # noqa: F401  (the secure broker fixture)
from core.wire import batch_topic, content_hash

P = "datalab/v1"


def test_every_socket_write_happens_on_the_network_thread(broker: Any, tmp_path: Path) -> None:  # noqa: F811
    svc = ReceiverService(broker.receiver_config(str(tmp_path / "datalab.sqlite")))
    writers: Counter[str] = Counter()
    real_send = svc.client._sock_send

    def send(buf: bytes | bytearray) -> int:
        writers[threading.current_thread().name] += 1
        return real_send(buf)

    svc.client._sock_send = send  # type: ignore[method-assign]  # instrumented, still the real socket
    runner = threading.Thread(target=svc.run_forever, name="run-forever", daemon=True)
    runner.start()
    van = None
    try:
        assert svc.subscribed.wait(30)
        van = Van(broker, "van-b")
        sent = []
        for i in range(40):  # many acks and answers: each was a write from the worker before
            p = ordinary("van-b", 1 + 6 * i).build("nt")
            van.send(batch_topic(P, "van-b"), p)
            sent.append(content_hash(p))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(van.answered(s) for s in sent):
            time.sleep(0.05)
        assert all(van.answered(s) for s in sent)
        assert {van.acks[s[:32]][0][1].status for s in sent} == {STORED}  # keyed by the digest prefix a binary ack carries
    finally:
        if van is not None:
            van.close()
        svc.request_stop() if hasattr(svc, "request_stop") else svc.client.disconnect()
        runner.join(30)
        svc.stop_threads()
        svc.store.close()
    print(f"\nsocket writes by thread: {dict(writers)}")
    # 40 answers + 40 PUBACKs at least, besides CONNECT/SUBSCRIBE/PINGREQ
    assert sum(writers.values()) >= 80
    assert "ingest" not in writers, f"the ingest worker wrote to the TLS socket: {dict(writers)}"
    assert len(writers) == 1 and next(iter(writers)).startswith("paho-mqtt-client"), dict(writers)
    assert not runner.is_alive()
