"""t14 probe: a 5 MiB card filled by the van's OWN backlog while out of coverage, then coverage returns.

Unlike tests/test_card_faults.py (a filler file takes the card), here nothing but the buffer grows:
the van is offline (broker down) until the card is full, stays full a while (samples held, then
lost in memory), then the broker returns. Later the filler case with a PARTIAL free (a little space
returns, not the whole card).

Truth is my own: ``Buffer.commit`` is wrapped and every (epoch, seq) it returned is recorded with the
sample's fields; the store is read directly (oracle_t14-style, by (epoch, seq) and by value).

Run: ATTACK_T14=1 .venv/bin/python -m pytest tests/attack_t14/probe_fullcard.py -q -s
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from tests.test_card_faults import card, drive, fill, make_agent  # noqa: F401 (fixture)
from tests.tmpfs import mounted_tmpfs


@pytest.fixture
def small_card(tmp_path):
    """2 MiB: the van's own backlog fills it in minutes, and drains in one or two."""
    with mounted_tmpfs(tmp_path / "card", "2m") as mnt:
        yield mnt


def _on_van(buf_path: Path) -> set:
    """(epoch, seq) still in the van's buffer: undelivered, not lost."""
    c = sqlite3.connect(f"file:{buf_path}?mode=ro", uri=True, timeout=30)
    try:
        epoch = dict(c.execute("SELECT key, value FROM meta"))["epoch"]
        left = {(epoch, q) for (q,) in c.execute("SELECT seq FROM samples")}
        for a, z in c.execute("SELECT first_seq, last_seq FROM batches WHERE n_samples > 0"):
            left.update((epoch, q) for q in range(a, z + 1))
        return left
    finally:
        c.close()


def _store_count(store: Path) -> int:
    c = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        return c.execute("SELECT count(*) FROM samples").fetchone()[0]
    finally:
        c.close()
from tests.test_delivery_faults import rx  # noqa: F401 (fixture)


def _record_commits(buf) -> dict:
    truth: dict[tuple[str, int], tuple] = {}
    orig = buf.commit

    def commit(samples):
        seqs = orig(samples)
        for s, q in zip(samples, seqs):
            truth[(buf.epoch, q)] = (s.sensor, s.t_utc_ms, s.t_mono_ms, json.dumps(s.values, sort_keys=True))
        return seqs

    buf.commit = commit
    return truth


def _judge(store: Path, device: str, truth: dict) -> dict:
    c = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    rows = c.execute("SELECT epoch, seq, sensor, t_utc_ms, t_mono_ms, vals FROM samples WHERE device=?",
                     (device,)).fetchall()
    gaps = c.execute("SELECT epoch, first_seq, last_seq, reason FROM gaps WHERE device=?", (device,)).fetchall()
    dup = dict(c.execute("SELECT name, value FROM counters")).get("batches_duplicate", 0)
    c.close()
    seen: dict[tuple[str, int], int] = {}
    altered = []
    invented = []
    for e, q, sensor, t, mono, vals in rows:
        seen[(e, q)] = seen.get((e, q), 0) + 1
        want = truth.get((e, q))
        if want is None:
            invented.append((e, q))
        elif (sensor, t, mono, json.dumps(json.loads(vals), sort_keys=True)) != want:
            altered.append((e, q))
    gapped = {}
    for e, a, b, why in gaps:
        for q in range(a, min(b, a + 10**6) + 1):
            gapped[(e, q)] = why
    missing = [k for k in truth if k not in seen and k not in gapped]
    committed_gapped = [k for k in truth if k in gapped and k not in seen]
    reasons: dict[str, int] = {}
    for e, a, b, why in gaps:
        reasons[why.split(":")[0]] = reasons.get(why.split(":")[0], 0) + (b - a + 1)
    return {"committed": len(truth), "stored": len(seen), "missing": len(missing), "missing_eg": missing[:5],
            "missing_list": missing,
            "doubled": sum(1 for n in seen.values() if n > 1), "altered": len(altered),
            "invented": len(invented), "committed_but_gapped": len(committed_gapped),
            "gap_numbers_by_reason": reasons, "receiver_duplicates": dup}


def _first_new_stored(store: Path, device: str, after: tuple[str, int]) -> bool:
    c = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        return c.execute("SELECT 1 FROM samples WHERE device=? AND epoch=? AND seq>? LIMIT 1",
                         (device, after[0], after[1])).fetchone() is not None
    finally:
        c.close()


@pytest.mark.timeout(1800)
def test_card_filled_by_the_vans_own_backlog(tmp_path, mosquitto, rx, small_card):
    card = small_card
    agent, link = make_agent(card, mosquitto.port, sensors=8, batch=200, max_age_s=30.0)
    buf = agent.buffer
    truth = _record_commits(buf)
    seen = {"disk_full": 0, "max_at_risk": 0, "min_unsealed": 0, "health": set()}

    def probe() -> None:
        st = agent.status()
        seen["health"].add(st["health"])
        if st["health"] == "disk_full":
            seen["disk_full"] += 1
            seen["max_at_risk"] = max(seen["max_at_risk"], st.get("samples_at_risk", 0))
        seen["min_unsealed"] = min(seen["min_unsealed"], buf.unsealed_count)

    mosquitto.stop()  # out of coverage from the start: the backlog grows on the card
    stored_at_stop = _store_count(rx.store) if rx.store.exists() else 0
    link.start()
    t0 = time.monotonic()
    while agent.stats.buffer_full == 0 and time.monotonic() - t0 < 900:
        drive(agent, 200, chunk_s=20, pause_s=0, probe=probe)
    fill_s = time.monotonic() - t0
    assert agent.stats.buffer_full > 0, "the card never filled"
    free_at_full = shutil.disk_usage(card).free
    drive(agent, 900, chunk_s=10, pause_s=0, probe=probe)  # full for 15 virtual minutes: held, then lost
    lost_full = agent.stats.lost_in_memory
    status_full = agent.status()
    stored_before_return = _store_count(rx.store) if rx.store.exists() else 0
    mosquitto.start()  # coverage returns; the card is still full of the van's own data
    last = (buf.epoch, buf.last_seq())
    t1 = time.monotonic()
    resumed = None
    while time.monotonic() - t1 < 120:
        drive(agent, 10, chunk_s=5, pause_s=0.05, probe=probe)
        if _first_new_stored(rx.store, "van-card", last):
            resumed = time.monotonic() - t1
            break
    drained = agent.drain(timeout_s=300)
    link.stop()
    left = _on_van(buf.path)
    v = _judge(rx.store, "van-card", truth)
    v["still_on_van"] = len(left)
    v["missing_not_on_van"] = len([k for k in v.pop("missing_list") if k not in left])
    v["offline_check"] = (stored_at_stop, stored_before_return)
    print(f"\n[t14 self-filled card] fill_real_s={fill_s:.0f} free_at_full={free_at_full} "
          f"refused={agent.stats.buffer_full} lost_in_memory={lost_full}->{agent.stats.lost_in_memory} "
          f"status_full={ {k: status_full.get(k) for k in ('health', 'samples_at_risk', 'samples_held_unnoted')} } "
          f"health_seen={seen['health']} disk_full_ticks={seen['disk_full']} max_at_risk={seen['max_at_risk']} "
          f"min_unsealed={seen['min_unsealed']} resumed_s={resumed} drained={drained} "
          f"published={agent.stats.published} resent={agent.stats.resent} counters={buf.counters()} verdict={v}")
    assert v["missing_not_on_van"] == 0 and v["doubled"] == 0 and v["altered"] == 0 and v["invented"] == 0, v
    assert v["offline_check"][0] == v["offline_check"][1], "the van was not offline (another broker on the port?)"
    assert status_full["health"] == "disk_full" and status_full.get("samples_at_risk", 0) > 0
    assert resumed is not None and resumed <= 60, resumed
    assert seen["min_unsealed"] >= 0
    gapped_lost = v["gap_numbers_by_reason"]
    assert sum(gapped_lost.values()) >= agent.stats.lost_in_memory, (gapped_lost, agent.stats.lost_in_memory)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("free_kib", [64, 256, 1024])
def test_card_freed_only_partly(tmp_path, mosquitto, rx, card, free_kib):
    """A filler takes the card while the van is online; then only ``free_kib`` KiB come back."""
    agent, link = make_agent(card, mosquitto.port, sensors=4, batch=100, max_age_s=10.0)
    buf = agent.buffer
    truth = _record_commits(buf)
    link.start()
    drive(agent, 120)
    fill(card / "filler")
    drive(agent, 600)  # full, online
    lost_full = agent.stats.lost_in_memory
    # give back only free_kib
    with open(card / "filler", "r+b") as f:
        size = f.seek(0, 2)
        f.truncate(max(0, size - free_kib * 1024))
    last = (buf.epoch, buf.last_seq())
    t1 = time.monotonic()
    resumed = None
    while time.monotonic() - t1 < 120:
        drive(agent, 10, chunk_s=5, pause_s=0.05)
        if _first_new_stored(rx.store, "van-card", last):
            resumed = time.monotonic() - t1
            break
    drive(agent, 600)  # the card stays nearly full: does the van keep going?
    refused_late = agent.stats.buffer_full
    drained = agent.drain(timeout_s=120)
    link.stop()
    v = _judge(rx.store, "van-card", truth)
    left = _on_van(buf.path)
    v["missing_not_on_van"] = len([k for k in v.pop("missing_list") if k not in left])
    print(f"\n[t14 partial free {free_kib} KiB] lost_in_memory={lost_full}->{agent.stats.lost_in_memory} "
          f"refused={refused_late} resumed_s={resumed} drained={drained} free_now={shutil.disk_usage(card).free} "
          f"health={agent.status()['health']} published={agent.stats.published} resent={agent.stats.resent} "
          f"counters={buf.counters()} verdict={v}")
    assert v["missing_not_on_van"] == 0 and v["doubled"] == 0 and v["altered"] == 0 and v["invented"] == 0, v
    assert resumed is not None and resumed <= 60, resumed
