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
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from buffer import recovery
from buffer.store import Buffer
from edge.agent import Agent
from edge.clock import SimClock
from edge.config import parse_config
from edge.model import Sample, TimeSource
from simulator.oracle import check
from simulator.sensors import OracleSensor
from simulator.world import VanWorld
from tests.delivery_harness import Receiver, report, store_counters
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_delivery_faults import assert_all_delivered
from tests.test_store_contract import MakeStore, make, q  # noqa: F401  (fixture, used by name)
from tests.test_receiver_store import put
from uplink.mqtt import MqttLink
from uplink.wire import Batch

T0 = 1_795_000_000.0


@pytest.fixture
def rx(tmp_path, mosquitto):
    r = Receiver(tmp_path / "store.sqlite", mosquitto.port)
    r.start()
    yield r
    r.stop()


@pytest.fixture
def card(tmp_path):
    """A real 5 MiB file system under the buffer, as in the issue."""
    mnt = tmp_path / "card"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


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
           published=agent.stats.published, resent=agent.stats.resent,
           receiver_duplicates=counters.get("batches_duplicate", 0), resumed_after_free_s=round(resumed_s, 1))
    # The card really was full: commits refused, samples held in memory and some lost.
    assert agent.stats.buffer_full > 0 and lost_while_full > 0
    assert status_full["health"] == "disk_full" and status_full["samples_at_risk"] > 0
    assert seen["disk_full_status"] > 0 and seen["max_at_risk"] > 0
    assert seen["acked_while_full"] > 0, "no ack arrived while the card was full"
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
