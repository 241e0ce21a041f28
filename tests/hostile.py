"""Hostile and broken uploads for the receiver tests (not a test module).

``hostile_upload(device)`` is a Hypothesis strategy of ``Hostile`` recipes: a
random ordinary batch, possibly with one defect of many kinds (a value the
store cannot hold, a NUL, a lone surrogate, nesting, a fix out of range,
64-bit overflow, a wrong device, a truncated or bit-flipped payload ...). Each
recipe knows what the receiver must answer (``expect``), decided by the defect
it injected, not by the receiver's code. ``killers(device)`` is the fixed list
of issue 13's payloads. ``recipe.build(epoch)`` gives the bytes, with a batch
id of its own for every epoch so no two recipes collide in the store.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from core.sample import Sample, TimeSource
from receiver.quality import FLAGGED
from core.wire import MAGIC, Batch, Gap, encode_batch

STORED, REJECTED = "stored", "rejected"
T0 = 1_790_000_000_000  # plausible UTC, ms
INT64 = 2**63
COLS = ["seq", "sensor", "t_utc_ms", "t_mono_ms", "time_src", "values", "flags", "boot"]


@dataclass(frozen=True)
class Hostile:
    kind: str
    expect: str  # STORED or REJECTED
    build: Callable[[str], bytes]  # epoch -> payload
    next_seq: int = 1  # where an ordinary batch right after this one in the same epoch starts


# -- encoding a v1-shaped body (Python objects, possibly hostile) ----------------------


def v1_bytes(body: dict[str, Any] | str | bytes) -> bytes:
    """Version 1 bytes of anything: NaN, infinity, NUL and lone surrogates included."""
    if isinstance(body, dict):
        body = json.dumps(body, allow_nan=True)
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    return MAGIC + b"\x01" + zlib.compress(raw, 1)


def v2_or_v1(body: dict[str, Any]) -> bytes:
    """Version 2 when its encoder can carry the body, else version 1 (as a hostile van would)."""
    try:
        samples = [Sample(r[1], r[2], r[3], TimeSource(r[4]), r[5], tuple(r[6]), r[0], r[7])
                   for r in body["samples"]]
        b = Batch(body["device"], body["epoch"], body["first"], body["last"], samples,
                  [Gap(*g) for g in body["gaps"]])
        return encode_batch(b, 2)
    except (ValueError, TypeError, OverflowError, UnicodeEncodeError, KeyError, IndexError):
        return v1_bytes(body)


def body_of(device: str, rows: list[list[Any]], first: int, last: int,
            gaps: list[list[Any]] | None = None) -> dict[str, Any]:
    return {"device": device, "epoch": "", "first": first, "last": last, "cols": COLS, "samples": rows,
            "gaps": gaps or []}


def recipe(kind: str, expect: str, body: dict[str, Any], *, version: str = "v2",
           mutate: Callable[[bytes], bytes] | None = None, epoch_suffix: str = "") -> Hostile:
    def build(epoch: str) -> bytes:
        b = copy.deepcopy(body)
        b["epoch"] = epoch + epoch_suffix
        out = v1_bytes(b) if version == "v1" else v2_or_v1(b)
        return mutate(out) if mutate else out

    last = body.get("last")
    nxt = last + 1 if isinstance(last, int) and not isinstance(last, bool) and 0 < last < INT64 - 100 else 1
    return Hostile(kind, expect, build, nxt)


def ordinary_rows(first: int, n: int, t0: int = T0) -> list[list[Any]]:
    """pm and gps samples alternating, as a van sends them."""
    rows: list[list[Any]] = []
    for i in range(n):
        seq, t = first + i, t0 + i * 500
        if i % 2:
            rows.append([seq, "gps", t, 10_000 + i * 500, "gps",
                         {"lat": 52.0 + i * 1e-5, "lon": 4.6, "speed": 5.0, "fix_quality": 1}, [], "boot-1"])
        else:
            rows.append([seq, "pm", t, 10_000 + i * 500, "gps", {"pm25": 10.0 + i, "pm10": 20}, [], "boot-1"])
    return rows


def ordinary(device: str, first: int = 1, n: int = 6) -> Hostile:
    return recipe("ordinary", STORED, body_of(device, ordinary_rows(first, n), first, first + n - 1))


# -- the strategy ----------------------------------------------------------------------

# Keys the receiver derives from (quality flags, humidity, calibration inputs) come up often,
# so that valid extremes go through the whole derive path, not only into the raw table.
_NAME = st.one_of(st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12),
                  st.sampled_from(sorted(FLAGGED | {"rh", "rh_pct", "no2_we_mv", "no2_ae_mv", "no2_temp_c"})))
_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)
_GOOD_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.integers(-INT64, INT64 - 1),
    st.floats(-1e9, 1e9, allow_nan=False, allow_infinity=False), st.floats(-1e15, 1e15), _TEXT,
)
_FIX_KEYS = ("lat", "lon", "speed", "course", "alt", "hdop", "fix_quality", "fix_mode", "sats_used",
             "sats_in_view")


@st.composite
def _good_rows(draw: st.DrawFn) -> tuple[list[list[Any]], int, int]:
    first = draw(st.integers(1, 2**62))
    n = draw(st.integers(1, 12))
    rows = []
    for i in range(n):
        sensor = draw(st.sampled_from(["pm", "no2", "noise", "gps", "env"]))
        if sensor == "gps":
            values: dict[str, Any] = {
                "lat": draw(st.floats(-90, 90)), "lon": draw(st.floats(-180, 180)),
                "speed": draw(st.one_of(st.none(), st.floats(0, 1000))),
                "fix_quality": draw(st.integers(0, 9)),
            }
            values.update(draw(st.dictionaries(_NAME.filter(lambda k: k not in _FIX_KEYS), _GOOD_VALUE,
                                               max_size=3)))
        else:
            values = draw(st.dictionaries(_NAME, _GOOD_VALUE, max_size=6))
        # Any 64-bit UTC: implausible ones are kept with the time unknown (the store's screen).
        t_utc = draw(st.one_of(st.none(), st.integers(T0 - 10**9, T0 + 10**9), st.integers(-INT64, INT64 - 1)))
        rows.append([first + i, sensor, t_utc, draw(st.integers(0, INT64 - 1)),
                     draw(st.sampled_from([str(s) for s in TimeSource])), values,
                     draw(st.lists(_NAME, max_size=2)), draw(_NAME)])
    # A batch is named after its first and last sample (receiver/batch_consistency.py).
    return rows, first, first + n - 1


_BIG_INT = st.one_of(st.integers(INT64, 10**600), st.integers(-(10**600), -INT64 - 1),
                     st.sampled_from([10**309, 10**399, -(10**1000), INT64]))
_FIX_OUT = {
    "lat": st.one_of(st.floats(90, 1e15, exclude_min=True), st.floats(-1e15, -90, exclude_max=True)),
    "lon": st.floats(180, 1e15, exclude_min=True),
    "speed": st.floats(-1e15, 0, exclude_max=True),
    "fix_quality": st.one_of(st.integers(10, INT64 - 1), st.integers(-INT64, -1)),
    "hdop": st.floats(100, 1e15, exclude_min=True),
}

DEFECTS = (
    "int_beyond_64bit", "none", "float_beyond_1e15", "nan_or_infinity", "nul_in_value", "nul_in_name",
    "lone_surrogate", "text_too_long", "seq_overflow", "time_overflow", "mono_negative", "fix_out_of_range",
    "fix_not_whole", "fix_is_bool", "deep_json_value", "deep_json_body", "flag_with_comma", "name_too_long",
    "wrong_device", "bad_structure", "truncated", "bit_flipped", "random_bytes", "bool_seq",
    # Numbers that contradict each other (receiver/batch_consistency.py, issue 13's outside tester).
    "range_beyond_samples", "sample_in_gap", "sampleless_misnamed", "cols_mismatch",
)


@st.composite
def hostile_upload(draw: st.DrawFn, device: str, kind: str | None = None) -> Hostile:
    """One upload for ``device``'s topic: ordinary (``kind`` "none"), or with one defect of
    ``kind`` (any of DEFECTS if None); with a defect it must be rejected."""
    rows, first, last = draw(_good_rows())
    kind = kind or draw(st.sampled_from(DEFECTS))
    row = rows[draw(st.integers(0, len(rows) - 1))]
    version = draw(st.sampled_from(["v1", "v2"]))
    mutate: Callable[[bytes], bytes] | None = None
    if kind == "int_beyond_64bit":
        row[5]["big"] = draw(_BIG_INT)
    elif kind == "float_beyond_1e15":
        row[5]["huge"] = draw(st.floats(1e15, exclude_min=True, allow_infinity=False)) * draw(
            st.sampled_from([1, -1]))
    elif kind == "nan_or_infinity":
        row[5]["bad"], version = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")])), "v1"
    elif kind == "nul_in_value":
        row[5]["note"] = draw(_TEXT) + "\x00" + draw(_TEXT)
    elif kind == "nul_in_name":
        where = draw(st.sampled_from(["sensor", "key", "flag", "boot", "epoch"]))
        nul = draw(_NAME) + "\x00"
        if where == "sensor":
            row[1] = nul
        elif where == "key":
            row[5][nul] = 1
        elif where == "flag":
            row[6] = [nul]
        elif where == "boot":
            row[7] = nul
        else:
            return recipe(kind, REJECTED, body_of(device, rows, first, last), version=version, epoch_suffix=nul)
    elif kind == "lone_surrogate":
        row[5]["note"], version = draw(_TEXT) + draw(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)), "v1"
    elif kind == "text_too_long":
        row[5]["note"] = "x" * draw(st.integers(16_385, 60_000))
    elif kind == "seq_overflow":
        big = draw(st.integers(INT64, 2**80))
        for r in rows:
            r[0] = big + (r[0] - first)
        first, last, version = big, big + (last - first), "v1"
    elif kind == "time_overflow":
        field = draw(st.sampled_from([2, 3]))
        row[field], version = draw(st.one_of(st.integers(INT64, 2**90), st.integers(-(2**90), -INT64 - 1))), "v1"
    elif kind == "mono_negative":
        row[3] = draw(st.integers(-INT64, -1))
    elif kind in ("fix_out_of_range", "fix_not_whole", "fix_is_bool"):
        row[1] = "gps"
        row[5].update(lat=52.0, lon=4.6, fix_quality=1)
        if kind == "fix_out_of_range":
            key = draw(st.sampled_from(sorted(_FIX_OUT)))
            row[5][key] = draw(_FIX_OUT[key])
        elif kind == "fix_not_whole":
            row[5]["fix_quality"] = draw(st.floats(0.01, 8.99).filter(lambda x: x != int(x)))
        else:
            row[5][draw(st.sampled_from(["lat", "lon", "speed"]))], version = True, "v1"
    elif kind == "deep_json_value":
        depth = draw(st.integers(33, 20_000))
        row[5]["record"] = "[" * depth + "]" * depth
    elif kind == "deep_json_body":
        depth = draw(st.integers(1_000, 300_000))
        return recipe(kind, REJECTED, {}, mutate=lambda _: v1_bytes("[" * depth + "]" * depth))
    elif kind == "flag_with_comma":
        row[6] = [draw(_NAME) + "," + draw(_NAME)]
    elif kind == "name_too_long":
        row[1] = "s" * draw(st.integers(129, 5000))
    elif kind == "wrong_device":
        return recipe(kind, REJECTED, body_of(draw(st.sampled_from(["van-b", "van-z", device.upper()])), rows,
                                              first, last), version=version)
    elif kind == "bad_structure":
        field = draw(st.sampled_from(["samples", "first", "gaps", "device", "row"]))
        # Nothing here is right for any of those fields (an empty list would be: no samples, no gaps).
        junk = draw(st.one_of(st.none(), st.booleans(), st.floats(), st.just({"a": 1}),
                              st.lists(st.integers(), min_size=1, max_size=3)))
        if field == "gaps" and isinstance(junk, list):
            junk = [junk]  # a gap of the wrong shape
        body = body_of(device, rows, first, last)
        if field == "row":
            body["samples"].append(junk)
        else:
            body[field] = junk
        return recipe(kind, REJECTED, body, version="v1")
    elif kind in ("truncated", "bit_flipped"):
        cut = draw(st.integers(1, 10**6))
        flips = draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=3))

        def mutate(b: bytes) -> bytes:
            if kind == "truncated":
                return b[: len(b) - 1 - cut % (len(b) - 1)]
            out = bytearray(b)
            for pos, bit in {pos % len(out): bit for pos, bit in flips}.items():  # one flip a byte
                out[pos] ^= 1 << bit
            return bytes(out)
    elif kind == "random_bytes":
        tail = draw(st.binary(max_size=300))
        prefix = draw(st.sampled_from([b"", MAGIC, MAGIC + b"\x01", MAGIC + b"\x02", MAGIC + b"\x07"]))
        return recipe(kind, REJECTED, {}, mutate=lambda _: prefix + tail)
    elif kind == "bool_seq":
        row[0], version = True, "v1"
    elif kind == "range_beyond_samples":
        # Declared numbers past the samples, sometimes with a gap row owning up to them (the
        # tester's last = 2^62 with 6 samples): still not a batch a van seals.
        gaps: list[list[Any]] = []
        if first > 1 and draw(st.booleans()):
            new = draw(st.integers(1, first - 1))
            if draw(st.booleans()):
                gaps.append([new, first - 1, "dropped"])
            first = new
        else:
            new = draw(st.one_of(st.integers(last + 1, last + 200), st.integers(last + 1, INT64 - 1)))
            if draw(st.booleans()):
                gaps.append([last + 1, new, "dropped"])
            last = new
        return recipe(kind, REJECTED, body_of(device, rows, first, last, gaps), version=version)
    elif kind == "sample_in_gap":
        seq = row[0]
        gap = [max(1, seq - draw(st.integers(0, 5))), seq + draw(st.integers(0, 5)), "lost"]
        return recipe(kind, REJECTED, body_of(device, rows, first, last, [gap]), version=version)
    elif kind == "sampleless_misnamed":
        a = draw(st.integers(1, 2**61))
        b = a + draw(st.integers(0, 10**6))
        lo = draw(st.integers(1, a))
        hi = draw(st.integers(b, b + 10**6).filter(lambda x, lo=lo: (lo, x) != (a, b) and lo != x))
        return recipe(kind, REJECTED, body_of(device, [], lo, hi, [[a, b, "dropped"]]), version=version)
    elif kind == "cols_mismatch":
        cols = draw(st.one_of(st.builds(lambda k: COLS[:k], st.integers(0, 7)), st.just(COLS + ["extra"]),
                              st.permutations(COLS).filter(lambda c: c != COLS), st.none()))
        body = body_of(device, rows, first, last)
        body["cols"] = cols
        return recipe(kind, REJECTED, body, version="v1")
    expect = STORED if kind == "none" else REJECTED
    return recipe(kind, expect, body_of(device, rows, first, last), version=version, mutate=mutate)


def collect(device: str, per_kind: int) -> list[Hostile]:
    """About ``per_kind`` generated uploads of every kind in DEFECTS (Hypothesis's own choice
    among kinds is far from even), for tests that need a list rather than a property."""
    out: list[Hostile] = []
    for kind in DEFECTS:
        @settings(max_examples=per_kind, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(hostile_upload(device, kind))
        def draw(x: Hostile) -> None:
            out.append(x)

        draw()
    return out


# -- the known killers ---------------------------------------------------------


def _with(device: str, first: int, change: Callable[[list[list[Any]]], None], n: int = 4) -> dict[str, Any]:
    rows = ordinary_rows(first, n)
    change(rows)
    return body_of(device, rows, first, first + n - 1)


def _set(i: int, field: int, value: Any) -> Callable[[list[list[Any]]], None]:
    def change(rows: list[list[Any]]) -> None:
        rows[i][field] = value
    return change


def _val(i: int, key: str, value: Any) -> Callable[[list[list[Any]]], None]:
    def change(rows: list[list[Any]]) -> None:
        rows[i][5][key] = value
    return change


def _raw(device: str, literal: str) -> Callable[[str], bytes]:
    """Version 1 bytes of an ordinary batch whose first pm10 is ``literal`` JSON text (no Python
    object can carry it: 5,000 digits, 1e309, nesting deeper than the recursion limit)."""
    def build(epoch: str) -> bytes:
        body = dict(_with(device, 1, lambda rows: None), epoch=epoch)
        return v1_bytes(json.dumps(body).replace('"pm10": 20', '"pm10": ' + literal, 1))
    return build


def killers(device: str) -> list[Hostile]:
    """Issue 13's payloads that stalled the receiver, and their neighbours."""
    seq_big = _with(device, INT64, lambda rows: None)
    seq_big["first"], seq_big["last"] = INT64, INT64 + 3
    nested = "[" * 200_000 + "]" * 200_000
    valid = _with(device, 1, lambda rows: None)
    return [
        Hostile("deep_json_body", REJECTED, lambda e: v1_bytes(nested)),
        Hostile("deep_json_in_values", REJECTED, _raw(device, "[" * 5000 + "]" * 5000)),
        Hostile("int_4000_digits", REJECTED, _raw(device, "9" * 4000)),
        Hostile("int_5000_digits", REJECTED, _raw(device, "9" * 5000)),
        recipe("seq_2^63", REJECTED, seq_big, version="v1"),
        recipe("t_utc_2^63", REJECTED, _with(device, 1, _set(0, 2, INT64)), version="v1"),
        recipe("t_mono_2^63", REJECTED, _with(device, 1, _set(0, 3, INT64)), version="v1"),
        recipe("fix_1e300", REJECTED, _with(device, 1, _val(1, "lat", 1e300))),
        recipe("fix_quality_2^40", REJECTED, _with(device, 1, _val(1, "fix_quality", 2**40))),
        recipe("value_10^399", REJECTED, _with(device, 1, _val(0, "pm25", 10**399))),
        recipe("value_10^309", REJECTED, _with(device, 1, _val(0, "pm25", 10**309))),
        recipe("value_10^309_v1", REJECTED, _with(device, 1, _val(0, "pm25", 10**309)), version="v1"),
        Hostile("float_1e309_text", REJECTED, _raw(device, "1e309")),
        recipe("nan", REJECTED, _with(device, 1, _val(0, "pm25", float("nan"))), version="v1"),
        recipe("nul_in_sensor", REJECTED, _with(device, 1, _set(0, 1, "p\x00m"))),
        recipe("nul_in_value", REJECTED, _with(device, 1, _val(0, "note", "a\x00b"))),
        recipe("nul_in_key", REJECTED, _with(device, 1, _val(0, "k\x00", 1))),
        recipe("nul_in_gap_reason", REJECTED, dict(valid, gaps=[[1, 1, "lost\x00"]])),
        recipe("lone_surrogate", REJECTED, _with(device, 1, _val(0, "note", "\ud800")), version="v1"),
        recipe("huge_text", REJECTED, _with(device, 1, _val(0, "note", "x" * 200_000))),
        recipe("truncated_v2", REJECTED, valid, mutate=lambda b: b[: len(b) // 2]),
        recipe("bit_flipped_v2", REJECTED, valid, mutate=lambda b: b[:-3] + bytes([b[-3] ^ 0x10]) + b[-2:]),
        recipe("wrong_device", REJECTED, _with("van-b", 1, lambda rows: None)),
        Hostile("bad_magic", REJECTED, lambda e: b"GARBAGE" * 10),
        Hostile("empty", REJECTED, lambda e: b""),
        Hostile("unknown_version", REJECTED, lambda e: MAGIC + b"\x09" + b"\x00" * 20),
        Hostile("zip_bomb", REJECTED, lambda e: MAGIC + b"\x01" + zlib.compress(b"0" * (20 << 20), 9)),
        Hostile("oversized", REJECTED, lambda e: MAGIC + b"\x02" + b"\x00" * ((1 << 20) + 10)),
        recipe("valid_extremes", STORED, _with(device, 1, lambda rows: (
            rows[0][5].update(imax=INT64 - 1, imin=-INT64, f=1e15, g=-1e15, tiny=5e-324, z=-0.0, u="ünï ✓"),
            rows[1][5].update(lat=90.0, lon=-180.0, speed=1000.0, fix_quality=9)))),
    ]


# -- status and sync requests ------------------------------------------------------------

HOSTILE_STATUS = [
    b'{"v":1,"online":true,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"v":1,"online":true,"x":' + b"[" * 40 + b"]" * 40 + b"}",
    b'{"v":1,"online":true,"note":"a\\u0000b"}',
    b'{"v":1,"online":true,"k\\u0000":1}',
    b'{"v":1,"online":true,"note":"\\ud800"}',
    b'{"v":1,"online":true,"n":NaN}',
    b'{"v":1,"online":true,"n":1e309}',
    b'{"v":1,"online":true,"n":' + b"9" * 400 + b"}",
    b'{"v":1,"online":true,"n":' + b"9" * 5000 + b"}",
    b'{"v":1,"online":true,"n":"' + b"x" * 2000 + b'"}',
    b'{"v":1,"online":false,"note":"a\\u0000b"}',  # a last will is merged as jsonb on PostgreSQL
    b"[1,2,3]",
    b"\xff\xfe",
    b"",
]


def hostile_sync(device: str, known_id: str) -> list[bytes]:
    """Sync requests a broken van might send; ``known_id`` is one real batch id among junk."""
    return [
        # The real id among ids no store could look up, another van's, and one too long.
        b'{"v":1,"batches":["' + device.encode() + b'/\\u0000/1-2", "' + known_id.encode() + b'", "van-b/e/1-2", "'
        + device.encode() + b"/" + b"y" * 600 + b'"]}',
        b'{"v":1,"batches":["' + known_id.encode() + b'", 5, null]}',  # not all strings: malformed
        b'{"v":1,"batches":"' + b"[" * 50_000 + b'"}',
        b'{"v":1,"batches":' + b"[" * 50_000 + b"}",
        b'{"v":1,"batches":["' + device.encode() + b"/" + b"x" * 100_000 + b'"]}',
        b"\x00\x01",
        b"{}",
    ]
