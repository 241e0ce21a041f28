"""v14 probe: the persisted time reference (data_dir/time.ref) forged, damaged, foreign or far ahead.

Real agent, Mosquitto and receiver on a simulated clock (tests/attack_t14/probe_clock.Van: a van
with NTP, no GPS). Run 1: 120 virtual s, agent stopped (same boot), then time.ref is tampered
with, then run 2 for 200 virtual s. My oracle: the receiver's store read directly; truth is
T0 + monotonic - 1000 s (SimClock); a sample is wrong if off the truth by > 1.5 s. I also count
samples of run 2 that are flagged clock_step although the clock never stepped (a forged record
must not flag a van's data for ever), and samples stamped at one identical time.

Run: ATTACK_T14=1 .venv/bin/python -m pytest tests/attack_v14/probe_timeref.py -q -s
"""

from __future__ import annotations

import sqlite3

import pytest

from buffer.sidefile import crc
from tests.attack_t14.probe_clock import DEV, T0, Van
from tests.test_delivery_faults import rx  # noqa: F401 (fixture)

YEAR_MS = 365 * 86400 * 1000


def _rewrite(path, f):
    """Apply f to the 4 fields (boot, offset, last, mono) and write a record with a VALID crc."""
    boot, off, last, mono, _c = path.read_text("ascii").strip().split(" ")
    boot, off, last, mono = f(boot, int(off), int(last), int(mono))
    text = f"{boot} {off} {last} {mono}"
    path.write_text(f"{text} {crc(text)}\n", "ascii")


def _flip(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x04
    path.write_bytes(bytes(b))


CASES = {
    # a record far in the future (valid crc, this boot): spine and newest stamp +1 year
    "future-offset-and-last": (lambda p: _rewrite(p, lambda b, o, l, m: (b, o + YEAR_MS, l + YEAR_MS, m)), 0.0),
    # only the newest stamp ahead (+1 year): the "never go backwards" rule meets it
    "future-last-only": (lambda p: _rewrite(p, lambda b, o, l, m: (b, o, l + YEAR_MS, m)), 0.0),
    # spine offset 1 h off, newest stamp honest
    "offset+1h": (lambda p: _rewrite(p, lambda b, o, l, m: (b, o + 3_600_000, l, m)), 0.0),
    # edge-of-type values (valid crc): must not crash the agent
    "huge-offset": (lambda p: _rewrite(p, lambda b, o, l, m: (b, 10**20, l, m)), 0.0),
    "huge-last": (lambda p: _rewrite(p, lambda b, o, l, m: (b, o, 10**20, m)), 0.0),
    "negative-last": (lambda p: _rewrite(p, lambda b, o, l, m: (b, o, -(10**15), m)), 0.0),
    # another van's record (other boot id): ignored; no step -> nothing wrong
    "other-van": (lambda p: _rewrite(p, lambda b, o, l, m: ("boot-of-van-B", o + 5000, l, m)), 0.0),
    # a damaged record (one bit) AND a backward system step while the agent was down
    "flipped-crc-and-step-2h": (_flip, -7200.0),
    # the record deleted (a card fsck, an operator) AND a backward step while down
    "deleted-and-step-2h": (lambda p: p.unlink(), -7200.0),
}


def judge(store) -> dict:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    rows = db.execute("SELECT sensor, t_utc_ms, t_mono_ms, flags FROM samples WHERE device=?"
                      " AND sensor NOT IN ('gps','calibration') ORDER BY sensor, seq", (DEV,)).fetchall()
    db.close()
    out = {"samples": len(rows), "run2": 0, "run2_flagged": 0, "wrong_unflagged": 0, "disorder_unflagged": 0,
           "max_err_unflagged_s": 0.0, "distinct_t_run2": 0}
    newest: dict[str, int] = {}
    ts = set()
    for sensor, t, mono, flags in rows:
        flagged = "clock_step" in (flags or "").split(",")
        run2 = mono > 1_000_000 + 125_000
        out["run2"] += run2
        out["run2_flagged"] += run2 and flagged
        if run2 and t is not None:
            ts.add(t)
        if t is None:
            continue
        err = t - (int(T0 * 1000) + mono - 1_000_000)
        if not flagged:
            if abs(err) > 1500:
                out["wrong_unflagged"] += 1
                out["max_err_unflagged_s"] = max(out["max_err_unflagged_s"], abs(err) / 1000)
            if sensor in newest and t < newest[sensor]:
                out["disorder_unflagged"] += 1
        newest[sensor] = max(t, newest.get(sensor, t))
    out["distinct_t_run2"] = len(ts)
    out["null_time"] = sum(1 for r in rows if r[1] is None)
    out["run2_flags"] = sorted({(r[3] or "") for r in rows if r[2] > 1_125_000})[:6]
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    out["gaps"] = db.execute("SELECT first_seq, last_seq, substr(reason,1,80) FROM gaps WHERE device=?", (DEV,)).fetchall()[:5]
    out["dead_letters"] = [tuple(str(x)[:120] for x in r) for r in db.execute("SELECT * FROM dead_letters").fetchall()[:3]]
    db.close()
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_timeref_probe(tmp_path, mosquitto, rx, name):  # noqa: F811
    tamper, step_s = CASES[name]
    van = Van(tmp_path, mosquitto.port, ntp=True, gps=False)
    err = None
    try:
        a = van.start()
        a.run(duration_s=120)
        van.stop()
        ref = tmp_path / DEV / "time.ref"
        before = ref.read_text() if ref.exists() else None
        tamper(ref)
        if step_s:
            van.clock.step(step_s)
        van.clock.advance(5)
        try:
            a = van.start()
            a.run(duration_s=200)
            van.stop()
        except Exception as exc:  # noqa: BLE001 - a crash is a finding, report it
            err = repr(exc)
    finally:
        van.close()
    v = judge(rx.store)
    print(f"\n[v14 timeref {name}] ref_before={before!r} crash={err} {v}")
    assert err is None, err
    assert v["run2"] > 0, "run 2 stored nothing"
    assert v["wrong_unflagged"] == 0 and v["disorder_unflagged"] == 0, v
    if not step_s:
        # no clock ever stepped: a tampered record must not leave the van's data flagged after the
        # confirmation window (60 s of 200)
        assert v["run2_flagged"] <= v["run2"] // 2, v
