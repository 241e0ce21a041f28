"""Probe v13 (point 6): a van subscribing to $share/..., other vans' batch/ack/status topics through the
shipped TLS+ACL Mosquitto; van B then publishes; van A must receive nothing.

    .venv/bin/python -m tests.attack_v13.probe_acl_subscribe
"""
import tempfile
import time
from pathlib import Path

from core.wire import batch_topic
from simulator.broker import LocalBroker, SecureSetup
from tests.attack_v13.probe_flood import honest_batch
from core.wire import encode_batch
from tests.test_broker_security import Probe

TOPICS = ["$share/ingest/datalab/v1/+/batch", "$share/ingest/#", "$share/x/datalab/v1/van-b/batch",
          "datalab/v1/van-b/batch", "datalab/v1/+/batch", "#", "datalab/v1/van-b/ack", "datalab/v1/+/status",
          "$SYS/#", "datalab/v1/van-b/#"]

root = Path(tempfile.mkdtemp(prefix="v13-acl-"))
b = LocalBroker("mosquitto", workdir=root, secure=SecureSetup(devices=("van-a", "van-b")))
b.start()
try:
    info = b.secure_info
    a = Probe(info.device_port, username="van-a", password=info.passwords["van-a"], ca_file=info.ca_file)
    assert a.connect() == "ok"
    print("suback per topic:", list(zip(TOPICS, [str(x) for x in a.subscribe(*TOPICS)])))
    from receiver.provision import RECEIVER_USER
    rx = Probe(info.receiver_port, username=RECEIVER_USER, password=info.passwords[RECEIVER_USER],
               ca_file=info.ca_file)
    assert rx.connect() == "ok"
    print("receiver suback:", [str(x) for x in rx.subscribe("$share/ingest/datalab/v1/+/batch")])
    vb = Probe(info.device_port, username="van-b", password=info.passwords["van-b"], ca_file=info.ca_file)
    assert vb.connect() == "ok"
    N = 40
    for i in range(N):
        vb.publish(batch_topic("datalab/v1", "van-b"), encode_batch(honest_batch("van-b", "e", 1 + 6 * i)))
    time.sleep(2)
    got = []
    while not a.messages.empty():
        got.append(a.messages.get().topic)
    print("van A received:", got)
    assert not got, got
    print("OK: van A saw none of van B's messages")
    n_rx = 0
    while not rx.messages.empty():
        rx.messages.get()
        n_rx += 1
    print(f"receiver in $share/ingest got {n_rx} of {N} van B batches (van A also in the group)")
    assert n_rx == N
finally:
    b.close()
