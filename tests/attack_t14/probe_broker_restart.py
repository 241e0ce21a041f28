"""t14 probe: broker restarts with real processes and the DEFAULT uplink settings.

Three agent processes (python -m edge.cli run, the delivery harness's vans with the test-only
reconnect and ack-timeout lines removed), one receiver process, a real Mosquitto. The broker is
killed (SIGKILL) or stopped (SIGTERM) and brought back after outages of 1 to 45 s; for EACH van, the
real time from the broker's return to the first sample of that van stored that was not stored
before (the issue: "first new sample stored within 5 s of the broker's return"). My own oracle at the
end: every number of each van's buffer (sqlite_sequence) stored once or gapped.

Run: ATTACK_T14=1 .venv/bin/python -m pytest tests/attack_t14/probe_broker_restart.py -q -s
"""

from __future__ import annotations

import sqlite3
import time

from tests.delivery_harness import Receiver, Van

OUTAGES = [(1.0, "kill"), (5.0, "kill"), (20.0, "stop"), (45.0, "kill"), (3.0, "stop")]


def _counts(store) -> dict[str, int]:
    c = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        return dict(c.execute("SELECT device, max(rowid) FROM samples GROUP BY device"))
    except sqlite3.OperationalError:
        return {}
    finally:
        c.close()


def test_each_van_back_within_5s_of_the_broker(tmp_path, mosquitto):
    rx = Receiver(tmp_path / "store.sqlite", mosquitto.port)
    rx.start()
    vans = []
    for i in range(3):
        v = Van(f"van-b{i}", tmp_path / "vans", mosquitto.port, speedup=5.0)
        # the field's settings: drop the harness's fast reconnect and short ack timeout
        toml = v.config.read_text()
        toml = "\n".join(ln for ln in toml.splitlines()
                         if not ln.startswith(("reconnect_min_s", "reconnect_max_s", "ack_timeout_s", "keepalive_s")))
        toml = toml.replace("hours = 0.05", "hours = 2")
        v.config.write_text(toml.replace("shift_hours = 0.05", "shift_hours = 2"))
        v.start(drain_timeout=60)
        vans.append(v)
    results = []
    try:
        t0 = time.monotonic()
        while len(_counts(rx.store)) < 3:
            assert time.monotonic() - t0 < 90, "vans never delivered"
            time.sleep(0.2)
        for down, how in OUTAGES:
            time.sleep(3)
            (mosquitto.kill if how == "kill" else mosquitto.stop)()
            time.sleep(down)
            before = _counts(rx.store)
            mosquitto.start()
            back = time.monotonic()
            firsts: dict[str, float] = {}
            while len(firsts) < 3 and time.monotonic() - back < 60:
                now = _counts(rx.store)
                for dev, top in now.items():
                    if dev not in firsts and top > before.get(dev, 0):
                        firsts[dev] = round(time.monotonic() - back, 2)
                time.sleep(0.05)
            results.append((down, how, firsts))
            print(f"broker {how} for {down:.0f} s: first new sample per van after its return: {firsts}", flush=True)
    finally:
        for v in vans:
            v.kill()
    worst = max((max(f.values()) if len(f) == 3 else 99.0) for _, _, f in results)
    print(f"[t14 broker-restart] outages={len(results)} worst_van_s={worst} results={results}")
    # drain and check with my own count (every number stored once or gapped)
    for v in vans:
        v.start(drain_timeout=90)
    time.sleep(5)
    for v in vans:
        v.proc.send_signal(15)
        v.wait(150)
    time.sleep(2)
    rx.stop()
    c = sqlite3.connect(tmp_path / "store.sqlite")
    bad = {}
    for v in vans:
        b = sqlite3.connect(f"file:{v.buffer}?mode=ro", uri=True)
        epoch = dict(b.execute("SELECT key, value FROM meta"))["epoch"]
        top = b.execute("SELECT seq FROM sqlite_sequence WHERE name='samples'").fetchone()[0]
        left = {q for (q,) in b.execute("SELECT seq FROM samples")}
        for a, z in b.execute("SELECT first_seq, last_seq FROM batches WHERE n_samples > 0"):
            left.update(range(a, z + 1))
        b.close()
        stored = [q for (q,) in c.execute("SELECT seq FROM samples WHERE device=? AND epoch=?", (v.device, epoch))]
        gaps = c.execute("SELECT first_seq, last_seq FROM gaps WHERE device=? AND epoch=?", (v.device, epoch)).fetchall()
        have = set(stored) | {q for a, z in gaps for q in range(a, min(z, top) + 1)}
        miss = sorted(set(range(1, top + 1)) - have - left)
        with open(v.log, "rb") as f:
            tail = [ln for ln in f.read().decode(errors="replace").splitlines() if "drain" in ln][-2:]
        print(f"{v.device}: last_seq={top} still on the van={len(left)} drain lines={tail}")
        if miss or len(stored) != len(set(stored)):
            bad[v.device] = (len(miss), miss[:5], len(stored) - len(set(stored)))
    c.close()
    print(f"[t14 broker-restart] oracle problems: {bad}")
    assert not bad
    assert worst <= 5.0, results
