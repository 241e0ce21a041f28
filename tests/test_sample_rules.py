"""The van and the receiver judge a sample by one rule set (core/sample_rules.py).

The van's commit check used to be only part of the receiver's schema: a sample
with a control character in its sensor name, a 200-character boot id, JSON
nested 40 deep, a GPS latitude of 200 or 65 flags was committed, sealed and
sent, and the receiver then refused its whole batch (the good samples with it).
A flag with a comma came back as two flags, an empty flag vanished. Now the
buffer refuses such a sample alone at commit (bad_rows + a gap record), and a
property test holds the two sides to one answer for generated samples: the van
admits a sample if and only if the receiver accepts it. Real SQLite buffer,
the real wire encoding and the receiver's own ``check_batch``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buffer.store import Buffer
from core.errors import PayloadError
from core.sample import Sample, TimeSource
from receiver.validate import check_batch
from tests.delivery_harness import report
from core.wire import Batch, decode_batch

T0 = 1_795_000_000_000


def _mk(sensor: str = "pm", values: object = None, flags: tuple[str, ...] = (), boot: str = "boot") -> Sample:
    return Sample(sensor, T0, 5_000, TimeSource("gps"), {"v": 1.0} if values is None else values,  # type: ignore[arg-type]
                  flags, None, boot)


def _refused(buf: Buffer) -> list[int]:
    return [q for q, in buf._db.execute("SELECT seq FROM bad_rows ORDER BY seq")]


def _send_all(buf: Buffer) -> list[Batch]:
    """Seal and hand over everything, through the receiver's own door (check_batch)."""
    out = []
    while (sb := buf.seal(100, 0)) is not None:
        out.append(check_batch(decode_batch(sb.payload)))  # raises PayloadError if the receiver refuses
        buf.acknowledge(sb.batch_id)
    return out


# Each of these was committed by the van and then cost its whole batch at the receiver.
REFUSED = {
    "control char in sensor": _mk(sensor="pm\x07"),
    "NUL in text value": _mk(values={"status": "ok\x00"}),
    "sensor name of 129": _mk(sensor="s" * 129),
    "boot id of 129": _mk(boot="b" * 129),
    "control char in key": _mk(values={"v\n": 1.0}),
    "JSON 40 deep": _mk(values={"cfg": "[" * 40 + "]" * 40}),
    "lone surrogate": _mk(values={"txt": "a\ud800"}),
    "GPS lat 200": _mk(sensor="gps", values={"lat": 200.0, "lon": 5.0}),
    "GPS quality 2.5": _mk(sensor="gps", values={"fix_quality": 2.5}),
    "65 flags": _mk(flags=tuple(f"f{i}" for i in range(65))),
    "flag with a comma": _mk(flags=("warming_up,clock_step",)),
    "empty flag": _mk(flags=("warming_up", "")),
    "control char in flag": _mk(flags=("bad\tflag",)),
    "bool as a fix field": _mk(sensor="gps", values={"lat": True}),
}


def test_a_sample_the_receiver_would_refuse_is_set_aside_alone_at_commit(tmp_path):
    buf = Buffer(tmp_path / "b.sqlite", "van-rules", reserve_bytes=0)
    good = [_mk(values={"v": float(i)}, flags=("warming_up",)) for i in range(3)]
    given_ = [good[0], *REFUSED.values(), good[1], _mk(sensor="gps", values={"lat": 90.0, "lon": -180.0}), good[2]]
    seqs = buf.commit(given_)
    refused = _refused(buf)
    reasons = [r for r, in buf._db.execute("SELECT reason FROM bad_rows ORDER BY seq")]
    batches = _send_all(buf)  # would raise PayloadError had one of them ridden along
    sent = [x.seq for b in batches for x in b.samples]
    gaps = sorted(q for b in batches for g in b.gaps for q in range(g.first_seq, g.last_seq + 1))
    report("commit-rules", refused=len(refused), sent=sent, reasons=[r[:60] for r in reasons])
    assert refused == seqs[1:1 + len(REFUSED)]  # each one alone, none of the good ones
    assert sent == [seqs[0], *seqs[1 + len(REFUSED):]]
    assert gaps == refused  # every refused sample owned up to once, with its reason
    assert all(r.startswith("refused at commit: ") for r in reasons)
    # Flags come back exactly as given: none split, none dropped.
    assert [x.flags for b in batches for x in b.samples if x.sensor == "pm"] == [("warming_up",)] * 3
    buf.close()


# --- the property: van admits <=> receiver accepts ---------------------------------------------

ANY_CHAR = st.characters(codec=None, categories=None)  # controls, NUL and lone surrogates included
NAMES = st.one_of(st.sampled_from(["pm", "gps", "v", "lat", "lon", "fix_quality", "warming_up", "a,b", ""]),
                  st.text(alphabet=ANY_CHAR, max_size=6), st.text(max_size=135))
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.integers(-300, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2e15, 2e15),
    st.text(alphabet=ANY_CHAR, max_size=8),
    st.integers(25, 40).map(lambda n: "[" * n + "]" * n), st.integers(25, 40).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.lists(st.integers(), max_size=2),
)
SAMPLES = st.builds(
    Sample,
    sensor=st.one_of(st.sampled_from(["pm", "gps", "no2"]), NAMES),
    t_utc_ms=st.one_of(st.none(), st.integers(-(2**64), 2**64), st.just(T0)),
    t_mono_ms=st.one_of(st.integers(-5, 2**64), st.just(5_000)),
    time_src=st.sampled_from(list(TimeSource)),
    values=st.one_of(st.dictionaries(NAMES, VALUES, max_size=4),
                     st.integers(255, 258).map(lambda n: {f"k{i}": 1 for i in range(n)})),
    flags=st.one_of(st.lists(NAMES, max_size=3).map(tuple), st.integers(63, 66).map(lambda n: ("f",) * n)),
    seq=st.none(),
    boot_id=st.one_of(st.just("boot-1"), st.just(""), NAMES),
)


def _receiver_accepts(s: Sample) -> bool:
    try:
        check_batch(Batch("van-prop", "e0", s.seq or 1, s.seq or 1, [s]))
    except PayloadError:
        return False
    return True


def test_van_admits_a_sample_if_and_only_if_the_receiver_accepts_it(tmp_path: Path):
    buf = Buffer(tmp_path / "b.sqlite", "van-prop", reserve_bytes=0)
    seen = {"admitted": 0, "refused": 0}

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(SAMPLES)
    def prop(s: Sample) -> None:
        given_ = copy.deepcopy(s)
        (q,) = buf.commit([s])  # never raises for a bad sample: it is set aside
        admitted = q not in _refused(buf)
        # The receiver judges the sample as the van would send it (NaN made None and flagged).
        assert admitted == _receiver_accepts(copy.deepcopy(s)), (given_, s)
        batches = _send_all(buf)  # the receiver's door again, on what the wire carried
        sent = [x for b in batches for x in b.samples]
        if admitted:
            (back,) = sent
            assert (back.sensor, back.values, back.flags, back.boot_id) == (s.sensor, s.values, s.flags, s.boot_id)
        else:
            assert not sent and [(g.first_seq, g.last_seq) for b in batches for g in b.gaps] == [(q, q)]
        seen["admitted" if admitted else "refused"] += 1

    prop()
    report("van-receiver-agree", **seen)
    assert seen["admitted"] >= 20 and seen["refused"] >= 20  # both sides of the property exercised
    buf.close()


@pytest.mark.parametrize("flags", [("a,b",), ("",), ("ok", "")])
def test_a_flag_is_never_split_or_dropped_silently(tmp_path, flags):
    """Flags are stored comma-joined: "a,b" used to come back as two flags and "" vanished."""
    buf = Buffer(tmp_path / "b.sqlite", "van-flags", reserve_bytes=0)
    (q,) = buf.commit([_mk(flags=flags)])
    batches = _send_all(buf)
    sent = [x.flags for b in batches for x in b.samples]
    report("flag", given=flags, refused=_refused(buf), sent=sent)
    assert _refused(buf) == [q] and sent == []  # refused, with its bytes and a gap, never altered
    assert "flag" in buf._db.execute("SELECT reason FROM bad_rows").fetchone()[0]
    buf.close()
