"""The card under a van (issue 14, points 1-3), proved end to end by the oracle.

A real tmpfs held full and then freed, a poisoned unsealed row, bytes flipped
in unsealed rows and in sealed batches: each with the agent, a real
Mosquitto, a receiver process and ``simulator.oracle``. Every test prints what
it exercised and asserts that it happened.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from buffer import recovery
from buffer.store import Buffer
from edge.agent import Agent
from core.clock import SimClock
from edge.config import parse_config
from core.sample import Sample, TimeSource
from simulator.oracle import check
from simulator.value_sensors import OracleSensor
from simulator.world import VanWorld
from tests.delivery_harness import report, store_counters
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_delivery_faults import assert_all_delivered, rx  # noqa: F401  (fixture, used by name)
from tests.test_store_contract import MakeStore, make, q  # noqa: F401  (fixture, used by name)
from tests.test_receiver_store import T, put
from tests.tmpfs import mounted_tmpfs
from uplink.mqtt import MqttLink
from core.wire import Batch

T0 = 1_795_000_000.0


@pytest.fixture
def card(tmp_path):
    """A real 5 MiB file system under the buffer, as in the issue."""
    with mounted_tmpfs(tmp_path / "card", "5m") as mnt:
        yield mnt


def make_agent(data_dir: Path, port: int, *, device: str = "van-card", batch: int = 200,
               max_age_s: float = 600.0, sensors: int = 2, **agent_kw: Any) -> tuple[Agent, MqttLink]:
    """An agent on simulated time with oracle sensors, a real MQTT link and default buffer settings."""
    cfg = parse_config({
        "device": {"id": device, "data_dir": str(data_dir)},
        "sampling": {"commit_interval_s": 1.0},
        "batch": {"max_samples": batch, "max_age_s": max_age_s},
        "uplink": {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2, "ack_timeout_s": 5.0,
                   "heartbeat_s": 1.0},
    })
    clock = SimClock(T0)
    world = VanWorld(clock, shift_start_utc=T0)
    drivers = [OracleSensor(world, name=f"oracle{i + 1}") for i in range(sensors)]
    bc = cfg.buffer
    buf = Buffer(cfg.buffer_path, cfg.device.id, max_bytes=bc.max_bytes, reserve_bytes=bc.reserve_bytes,
                 wal_autocheckpoint=bc.wal_autocheckpoint)
    link = MqttLink(cfg.uplink, cfg.device.id)
    return Agent(cfg, drivers, clock, buf, link, **agent_kw), link


def drive(agent: Agent, virtual_s: float, *, chunk_s: float = 5.0, pause_s: float = 0.01,
          probe: Callable[[], None] | None = None) -> None:
    """Run the agent ``virtual_s`` simulated seconds, yielding real time for the network between chunks."""
    done = 0.0
    while done < virtual_s:
        agent.run(duration_s=chunk_s)
        time.sleep(pause_s)
        if probe:
            probe()
        done += chunk_s


def fill(path: Path) -> None:
    """Someone else (logs, a core dump) takes every last block of the file system."""
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 512):
            try:
                while f.write(b"\1" * size):
                    pass
            except OSError:
                pass


def stored_rows(store: Path, device: str, epoch: str, where: str = "1", params: tuple = ()) -> list[tuple]:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(
            f"SELECT seq, flags, boot_id, t_utc_ms, t_mono_ms FROM samples WHERE device=? AND epoch=? AND {where}",
            (device, epoch, *params),
        ).fetchall()
    finally:
        db.close()


def store_gaps(store: Path, device: str) -> list[tuple[str, int, int, str]]:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT epoch, first_seq, last_seq, reason FROM gaps WHERE device=?", (device,)).fetchall()
    finally:
        db.close()


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str, tick: Callable[[], None]) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"{what}: not within {timeout_s} s"
        tick()
    return time.monotonic() - t0


# --- 1. a full card loses nothing that was committed ---------------------------------------


def test_full_card_held_then_freed_loses_nothing_committed(tmp_path, mosquitto, rx, card):
    agent, link = make_agent(card, mosquitto.port, sensors=4, batch=100, max_age_s=10.0, max_pending=800)
    buf = agent.buffer
    seen = {"min_unsealed": 0, "disk_full_status": 0, "max_at_risk": 0, "acked_while_full": 0}

    def probe() -> None:
        seen["min_unsealed"] = min(seen["min_unsealed"], buf.unsealed_count)
        st = agent.status()
        if st["health"] == "disk_full":
            seen["disk_full_status"] += 1
            seen["max_at_risk"] = max(seen["max_at_risk"], st["samples_at_risk"])

    link.start()
    drive(agent, 120, probe=probe)  # online, delivering
    wait_for(lambda: agent.stats.acked_batches > 0, 30, "first acks", lambda: drive(agent, 5))
    fill(card / "filler")
    assert shutil.disk_usage(card).free < 64 * 1024
    acked_before = agent.stats.acked_batches
    drive(agent, 300, probe=probe)  # full, online: acks must still be recorded
    seen["acked_while_full"] = agent.stats.acked_batches - acked_before
    mosquitto.stop()  # out of coverage while full: commits refused, samples held, then lost
    drive(agent, 1500, probe=probe)
    status_full = agent.status()
    lost_while_full = agent.stats.lost_in_memory
    mosquitto.start()  # back in coverage, card still full: acks make room in the file's own pages
    drive(agent, 300, probe=probe)
    (card / "filler").unlink()  # space returns
    last_before_free = buf.last_seq()
    epoch = buf.epoch
    resumed_s = wait_for(
        lambda: bool(stored_rows(rx.store, "van-card", epoch, "seq > ?", (last_before_free,))),
        60, "a sample committed after space returned reaching the store", lambda: drive(agent, 5),
    )
    assert agent.drain(timeout_s=120)
    link.stop()
    (v,) = check(rx.store, [buf.path])
    counters = store_counters(rx.store)
    gaps = store_gaps(rx.store, "van-card")
    report("full-card", committed=v.last_seq, gap_records=len(gaps), stored=v.stored, gapped=v.gapped, refused_commits=agent.stats.buffer_full,
           lost_in_memory=agent.stats.lost_in_memory, max_at_risk=seen["max_at_risk"],
           acked_while_full=seen["acked_while_full"], acks_deferred=buf.counters().get("acks_deferred", 0),
           reserve_releases=buf.reserve_releases,
           published=agent.stats.published, resent=agent.stats.resent,
           receiver_duplicates=counters.get("batches_duplicate", 0), resumed_after_free_s=round(resumed_s, 1))
    # The card really was full: commits refused, samples held in memory and some lost.
    assert agent.stats.buffer_full > 0 and lost_while_full > 0
    assert status_full["health"] == "disk_full" and status_full["samples_at_risk"] > 0
    assert seen["disk_full_status"] > 0 and seen["max_at_risk"] > 0
    assert seen["acked_while_full"] > 0, "no ack arrived while the card was full"
    assert buf.reserve_releases > 0  # the ballast was given up for them
    # Nothing committed was lost or doubled; the only gaps own up to the samples lost in memory.
    assert_all_delivered([v])
    assert v.gapped == agent.stats.lost_in_memory
    assert gaps and all(r.startswith("card full: ") for _, _, _, r in gaps)
    assert buf.counters().get("samples_dropped", 0) == 0
    # No resend storm: what the store had was not sent again (a few in-flight at the outage may be).
    assert counters.get("batches_duplicate", 0) <= 5
    assert agent.stats.resent <= agent.stats.published // 10 + 5
    # The count of unsealed samples stayed true, and sealing resumed.
    assert seen["min_unsealed"] >= 0 and buf.unsealed_count == buf._count_unsealed() == 0
    assert agent.status()["health"] == "ok" and agent.status()["samples_at_risk"] == 0
    assert buf.reserve_path.exists(), "the space reserve came back with the space"


# --- 2. a row that cannot be sealed is set aside -------------------------------------------


def _buffer_db(agent: Agent) -> sqlite3.Connection:
    """A second connection to the van's buffer file: what the card does behind the agent's back."""
    return sqlite3.connect(agent.buffer.path, isolation_level=None)


@pytest.mark.parametrize("kind", ["checksum", "no-checksum"])
def test_poisoned_unsealed_row_is_set_aside_and_sealing_goes_on(tmp_path, mosquitto, rx, kind):
    agent, link = make_agent(tmp_path / "van", mosquitto.port, device="van-poison", batch=200)
    agent.run(duration_s=250)  # offline: 500 samples, two batches sealed by count, the rest unsealed
    db = _buffer_db(agent)
    (seq,) = db.execute("SELECT max(seq) - 5 FROM samples").fetchone()
    # One ':' changed to ';' in its JSON. "no-checksum": a row from a file made before
    # checksums (crc NULL), so only the JSON can tell.
    db.execute("UPDATE samples SET vals = replace(vals, ':', ';') WHERE seq=?", (seq,))
    if kind == "no-checksum":
        db.execute("UPDATE samples SET crc = NULL WHERE seq=?", (seq,))
    db.close()
    sealed_before = agent.stats.sealed_batches
    agent.run(duration_s=300)  # sealing passes over the poisoned row
    link.start()
    assert agent.drain(timeout_s=120)
    link.stop()
    (v,) = check(rx.store, [agent.buffer.path])
    bad = agent.buffer._db.execute("SELECT seq, reason, raw FROM bad_rows").fetchall()
    gaps = store_gaps(rx.store, "van-poison")
    report("poisoned-row", kind=kind, seq=seq, set_aside=[(s, r) for s, r, _ in bad], gaps=gaps,
           sealed_after=agent.stats.sealed_batches - sealed_before, stored=v.stored)
    assert [(s, b'"check";' in raw) for s, _, raw in bad] == [(seq, True)]  # its bytes kept
    assert bad[0][1] == ("row checksum mismatch" if kind == "checksum" else "row unreadable: JSONDecodeError")
    assert [(a, b) for _, a, b, _ in gaps] == [(seq, seq)]
    assert gaps[0][3].startswith("unsealable row set aside")
    assert agent.stats.sealed_batches - sealed_before >= 3  # sealing went on past it
    assert_all_delivered([v])
    assert v.gapped == 1 and v.stored == v.last_seq - 1


# --- 3. integrity from commit to store -----------------------------------------------------


def _flip_digit(data: bytearray, needle: bytes, rng: random.Random) -> bool:
    """Change one digit inside the first occurrence of ``needle``: still valid JSON, another value."""
    at = data.find(needle)
    if at < 0:
        return False
    digits = [i for i in range(at, at + len(needle)) if chr(data[i]).isdigit()]
    i = rng.choice(digits)
    data[i] = ord(str((int(chr(data[i])) + rng.randrange(1, 10)) % 10))
    return True


def _damage(agent: Agent, n_rows: int, rng: random.Random) -> tuple[list[int], str, int]:
    """Flip bytes on the file: a digit in ``n_rows`` unsealed rows and one byte in one sealed batch.

    Returns the seqs whose row text was hit, and the id and size of the damaged batch.
    """
    buf = agent.buffer
    buf._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file
    rows = buf._db.execute("SELECT seq, vals FROM samples ORDER BY seq").fetchall()
    batches = buf._db.execute("SELECT first_seq, last_seq, n_samples, payload FROM batches").fetchall()
    buf.close()
    data = bytearray(buf.path.read_bytes())
    hit: list[int] = []
    used: set[str] = set()
    for seq, vals in rng.sample(rows[: len(rows) - 10], 4 * n_rows):
        if vals in used:  # two oracle sensors at one instant write the same text
            continue
        # The first copy in the file may be this row's twin: find which row it was afterwards.
        if _flip_digit(data, vals.encode(), rng):
            used.add(vals)
            hit.append(seq)
        if len(hit) == n_rows:
            break
    first, last, n, payload = batches[len(batches) // 2]
    at = data.find(payload[40:80])
    assert at > 0
    data[at + 7] ^= 0x10
    buf.path.write_bytes(bytes(data))
    return hit, batch_id_of(agent, first, last), n


def batch_id_of(agent: Agent, first: int, last: int) -> str:
    return f"{agent.cfg.device.id}/{agent.buffer.epoch}/{first}-{last}"


def _assert_true_to_the_source(store: Path, device: str, epoch: str, boot_id: str) -> list[tuple]:
    """Every stored sample of the epoch is as the van took it: value, boot id, timestamp."""
    from simulator.value_sensors import oracle_check

    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute("SELECT seq, vals, boot_id, t_utc_ms, t_mono_ms, flags FROM samples"
                          " WHERE device=? AND epoch=?", (device, epoch)).fetchall()
    finally:
        db.close()
    import json

    assert rows
    assert {r[2] for r in rows} == {boot_id}
    assert len({r[3] - r[4] for r in rows}) == 1, "a timestamp was altered (no clock step in this run)"
    assert all(json.loads(r[1])["check"] == oracle_check(r[4]) for r in rows)
    return rows


def test_flipped_bytes_in_rows_and_batches_never_reach_the_store(tmp_path, mosquitto, rx):
    """SQLite cannot see damage inside a row: the row checksum and the batch hash do."""
    rng = random.Random(14)
    agent, link = make_agent(tmp_path / "van", mosquitto.port, device="van-flip", batch=200)
    agent.run(duration_s=550)  # 1100 samples: five batches sealed, 100 rows unsealed
    epoch, last = agent.buffer.epoch, agent.buffer.last_seq()
    hit, bad_batch, bad_n = _damage(agent, 5, rng)
    agent2, link2 = make_agent(tmp_path / "van", mosquitto.port, device="van-flip", batch=200)
    assert agent2.buffer.epoch == epoch  # not quarantined: the damage is invisible to SQLite
    agent2.run(duration_s=100)
    link2.start()
    assert agent2.drain(timeout_s=120)
    link2.stop()
    (v,) = check(rx.store, [agent2.buffer.path])
    gaps = store_gaps(rx.store, "van-flip")
    set_aside = [r[0] for r in agent2.buffer._db.execute("SELECT seq FROM bad_rows")]
    report("flipped-live", rows_hit=len(hit), set_aside=len(set_aside), batch_hit=bad_batch,
           hash_mismatches=agent2.stats.corrupt_batches, gaps=[(a, b, r[:40]) for _, a, b, r in gaps])
    assert len(hit) == 5 and len(set_aside) == 5  # each damaged row caught (the hit row or its twin)
    assert agent2.stats.corrupt_batches == 1
    row_gaps = [(a, b) for _, a, b, r in gaps if "row checksum mismatch" in r]
    batch_gaps = [(a, b) for _, a, b, r in gaps if "content hash mismatch" in r]
    assert sorted(a for a, _ in row_gaps) == sorted(set_aside) and len(batch_gaps) == 1
    assert batch_gaps[0][1] - batch_gaps[0][0] + 1 == bad_n
    assert_all_delivered([v])
    assert v.gapped == 5 + bad_n and v.last_seq >= last
    _assert_true_to_the_source(rx.store, "van-flip", epoch, agent2.boot_id)


def _garble_page(path: Path, table: str) -> None:
    db = sqlite3.connect(path)
    try:
        (page,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()
    finally:
        db.close()
    with open(path, "r+b") as f:
        f.seek((page - 1) * 4096)
        f.write(random.Random(2).randbytes(4096))


def test_salvage_uploads_only_rows_that_verify_flagged_salvaged(tmp_path, mosquitto, rx):
    """A file SQLite finds corrupt is quarantined; its salvage keeps only what verifies."""
    rng = random.Random(41)
    agent, link = make_agent(tmp_path / "van", mosquitto.port, device="van-salv", batch=200)
    agent.run(duration_s=550)
    old_epoch, old_last = agent.buffer.epoch, agent.buffer.last_seq()
    unsealed = agent.buffer.unsealed_count
    hit, bad_batch, bad_n = _damage(agent, 5, rng)
    _garble_page(agent.buffer.path, "counters")  # and a page SQLite itself will find bad
    agent2, link2 = make_agent(tmp_path / "van", mosquitto.port, device="van-salv", batch=200)
    qdirs = list((tmp_path / "van" / "quarantine").iterdir())
    assert agent2.buffer.epoch != old_epoch and len(qdirs) == 1
    agent2.run(duration_s=100)
    link2.start()
    assert agent2.drain(timeout_s=120)
    link2.stop()
    gaps = [(a, b, r) for e, a, b, r in store_gaps(rx.store, "van-salv") if e == old_epoch]
    rows = _assert_true_to_the_source(rx.store, "van-salv", old_epoch, agent2.boot_id)
    stored = {r[0] for r in rows}
    salvaged = {r[0] for r in rows if "salvaged" in r[5].split(",")}
    gapped = {q for a, b, _ in gaps for q in range(a, min(b, old_last) + 1)}
    db = sqlite3.connect(f"file:{rx.store}?mode=ro", uri=True)
    shown = {r[0] for r in db.execute(
        "SELECT DISTINCT seq FROM observations WHERE device='van-salv' AND epoch=? AND ',' || flags || ','"
        " LIKE '%,salvaged,%'", (old_epoch,))}
    db.close()
    report("salvage", quarantined=len(qdirs), old_committed=old_last, stored=len(stored), salvaged=len(salvaged),
           gapped=len(gapped), reasons=sorted({r for _, _, r in gaps}))
    # Every number of the dead epoch is stored once or owned up to; nothing both.
    assert stored | gapped == set(range(1, old_last + 1)) and not stored & gapped
    # The unsealed rows that verified came back flagged, and observations shows the flag;
    # the damaged ones did not come back, each owned up to with the reason.
    assert len(salvaged) == unsealed - 5 and shown == salvaged
    not_salvaged = [(a, b) for a, b, r in gaps if "unsealed row not salvaged (row checksum mismatch)" in r]
    assert len(not_salvaged) == 5 and all(a == b for a, b in not_salvaged)
    # Sealed batches come back byte for byte (so not re-flagged); the damaged one is a gap.
    assert any("sealed batch unreadable" in r and b - a + 1 == bad_n for a, b, r in gaps)
    assert len(stored) == old_last - 5 - bad_n
    assert_all_delivered(check(rx.store, [agent2.buffer.path]))


def test_salvaged_flag_shows_in_observations_on_both_stores(make: MakeStore) -> None:  # noqa: F811
    s = make()
    b = Batch("van-001", "e1", 1, 2, [
        Sample("pm", T + 1000, 1000, TimeSource.NTP, {"pm25": 12.5}, ("salvaged",), 1, "b" * 32),
        Sample("pm", T + 2000, 2000, TimeSource.NTP, {"pm25": 13.5}, (), 2, "b" * 32),
    ])
    assert put(s, b).status == "stored"
    got = sorted(q(s, "SELECT seq, flags FROM observations WHERE device='van-001' AND quantity='pm25'"))
    print(f"[salvaged-flag] {type(s).__name__}: {got}")
    assert got == [(1, "salvaged"), (2, "")]


def test_service_health_says_disk_full_and_keeps_the_watchdog_fed(tmp_path):
    """A full card is reported, not 'fixed' by a watchdog restart that would lose what is held."""
    from edge.systemd_supervisor import Health

    h = Health(60.0, writable=lambda: True)
    h.commit_result(False, full=True, error="disk_full: 120 samples at risk")
    ok, reason = h.check()
    print(f"[health] {ok} {reason}")
    assert ok and reason == "disk_full: 120 samples at risk"
    h.commit_result(True)
    assert h.check() == (True, "ok")
