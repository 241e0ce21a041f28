"""Probe v13 (2): van B's ack latency while a hostile van floods, shipped TLS+ACL broker, real receiver.

Standalone (not collected): run from the worktree root
    .venv/bin/python -m tests.attack_v13.probe_flood --store sqlite --derive separate --runs 5
    .venv/bin/python -m tests.attack_v13.probe_flood --store pg     --derive inline   --runs 5

Shipped central configuration: scripts/install-central writes derive = "separate" and runs the
datalab-deriver unit (`datalab-receiver derive --store $DATALAB_STORE --follow`); both are started here
exactly so. Van A's uploads come from this file's own Hypothesis generator (not tests/hostile.py):
byte-level damage of honest payloads, v1 JSON bodies with hostile field values, contradictory sequence
shapes, identity attacks (another device in the body), and honest van-A batches. About 1,600 uploads are
published at QoS 1 as fast as the broker acknowledges (the v13b shape). Van B publishes one honest
batch every 0.25 s. Own oracle: the store is read with plain SQL afterwards, van B's samples counted
against what was sent, van A's rejections against dead letters, no row under van-b from van A.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from core.sample import Sample, TimeSource
from core.wire import MAGIC, Batch, Gap, batch_topic, content_hash, decode_ack, encode_batch
from simulator.broker import LocalBroker, SecureSetup
from tests.test_broker_security import Probe

P = "datalab/v1"
T0 = 1_780_000_000_000
COLS = ["seq", "sensor", "t_utc_ms", "t_mono_ms", "time_src", "values", "flags", "boot"]


# ---- own generator -------------------------------------------------------------------------

def honest_batch(device: str, epoch: str, first: int, n: int = 6) -> Batch:
    ss = []
    for i in range(n):
        seq, t = first + i, T0 + (first + i) * 500
        if i % 2:
            ss.append(Sample("gps", t, 1000 + seq * 500, TimeSource("gps"),
                             {"lat": 52.37 + seq * 1e-5, "lon": 4.89, "speed": 4.0, "fix_quality": 1},
                             (), seq, "boot-b"))
        else:
            ss.append(Sample("pm", t, 1000 + seq * 500, TimeSource("gps"), {"pm25": 7.5 + i, "pm10": 12.0},
                             (), seq, "boot-b"))
    return Batch(device, epoch, first, first + n - 1, ss, [])


def v1(body: Any) -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    return MAGIC + b"\x01" + zlib.compress(raw, 1)


def row(seq: Any, sensor: Any = "pm", t: Any = T0, mono: Any = 5000, src: Any = "gps",
        vals: Any = None, flags: Any = None, boot: Any = "b") -> list[Any]:
    return [seq, sensor, t, mono, src, {"pm25": 5.0} if vals is None else vals, [] if flags is None else flags,
            boot]


EDGE_INTS = [0, -1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**40, True]
EDGE_FLOATS = [1e300, -1e308, 1.7976931348623157e308, float("nan"), float("inf"), 5e-324]
EDGE_TEXT = ["\x00", "a\x00b", "x" * 100_000, "\ud800", "/", "+", "#", "", " " * 3, "é" * 5000]


def deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = [v]
    return v


@st.composite
def hostile(draw: st.DrawFn, tag: str) -> tuple[str, str, bytes]:
    """(kind, expectation 'reject'|'any'|'store', payload)."""
    epoch = tag + "-" + draw(st.uuids()).hex[:16]
    kind = draw(st.sampled_from(["flip", "truncate", "int_field", "float_val", "text_field", "nest",
                                 "seq_shape", "identity", "cols", "honest_a", "gap_shape", "huge_gap_reason"]))
    first = draw(st.integers(1, 10**6))
    good = encode_batch(honest_batch("van-a", epoch, first))
    if kind == "flip":
        b = bytearray(good)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << draw(st.integers(0, 7))
        return kind, "any", bytes(b)
    if kind == "truncate":
        return kind, "reject", good[: draw(st.integers(0, len(good) - 1))]
    rows = [row(first + i, t=T0 + i * 1000, mono=1000 + i) for i in range(4)]
    body: dict[str, Any] = {"device": "van-a", "epoch": epoch, "first": first, "last": first + 3, "cols": COLS,
                            "samples": rows, "gaps": []}
    if kind == "int_field":
        field = draw(st.sampled_from(["seq", "t", "mono", "first", "last", "gapnum"]))
        v = draw(st.sampled_from(EDGE_INTS))
        if field == "seq":
            rows[-1][0] = v
        elif field == "t":
            rows[1][2] = v
        elif field == "mono":
            rows[2][3] = v
        elif field in ("first", "last"):
            body[field] = v
        else:
            body["gaps"] = [[v, v, "lost"]]
        return kind + ":" + field, "reject" if v not in (0, -1) or field != "mono" else "any", v1(body)
    if kind == "float_val":
        rows[draw(st.integers(0, 3))][5] = {"pm25": draw(st.sampled_from(EDGE_FLOATS))}
        return kind, "any", v1(body)
    if kind == "text_field":
        where = draw(st.sampled_from(["sensor", "boot", "src", "epoch", "flag", "key"]))
        s = draw(st.sampled_from(EDGE_TEXT))
        if where == "sensor":
            rows[0][1] = s
        elif where == "boot":
            rows[0][7] = s
        elif where == "src":
            rows[0][4] = s
        elif where == "epoch":
            body["epoch"] = epoch + s
        elif where == "flag":
            rows[0][6] = [s]
        else:
            rows[0][5] = {s: 1.0}
        return kind + ":" + where, "any", v1(body)
    if kind == "nest":
        n = draw(st.integers(50, 20000))
        rows[0][5] = {"pm25": "@@DEEP@@"}
        text = json.dumps(body).replace('"@@DEEP@@"', "[" * n + "1" + "]" * n)
        return kind, "reject", v1(text.encode())
    if kind == "seq_shape":
        shape = draw(st.sampled_from(["wide", "narrow", "inverted", "dup", "outside", "empty", "huge_last"]))
        if shape == "wide":
            body["last"] = first + 3 + draw(st.integers(1, 10**9))
        elif shape == "narrow":
            body["first"] = first + 1
        elif shape == "inverted":
            body["first"], body["last"] = first + 3, first
        elif shape == "dup":
            rows[1][0] = rows[0][0]
        elif shape == "outside":
            rows[0][0] = first - 1
        elif shape == "empty":
            body["samples"] = []
        else:
            body["last"] = 2**62
        return kind + ":" + shape, "reject", v1(body)
    if kind == "gap_shape":
        shape = draw(st.sampled_from(["over_sample", "inverted", "huge", "zero"]))
        g = {"over_sample": [first, first + 1, "x"], "inverted": [first + 2, first + 1, "x"],
             "huge": [1, 2**63 - 1, "x"], "zero": [0, 0, "x"]}[shape]
        body["gaps"] = [g]
        return kind + ":" + shape, "reject" if shape != "huge" else "any", v1(body)
    if kind == "identity":
        body["device"] = draw(st.sampled_from(["van-b", "van-b ", "VAN-B", "van-b\x00", "../van-b"]))
        return kind, "reject", v1(body)
    if kind == "cols":
        body["cols"] = draw(st.sampled_from([COLS[:-1], COLS[::-1], None, COLS + ["x"], "seq"]))
        return kind, "reject", v1(body)
    if kind == "huge_gap_reason":
        body["gaps"] = [[first + 4, first + 4 + draw(st.integers(0, 9)), "r" * draw(st.integers(10_000, 400_000))]]
        body["last"] = body["last"]
        return kind, "any", v1(body)
    return "honest_a", "store", good


def generate(n: int, seed: int) -> list[tuple[str, str, bytes]]:
    out: list[tuple[str, str, bytes]] = []

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        out.append(data.draw(hostile(f"e{seed}")))

    random.seed(seed)
    while len(out) < n:
        collect()
    return out[:n]


# ---- the run -------------------------------------------------------------------------------

class Van:
    def __init__(self, broker: LocalBroker, device: str) -> None:
        info = broker.secure_info
        assert info is not None
        self.device = device
        self.probe = Probe(info.device_port, username=device, password=info.passwords[device],
                           ca_file=info.ca_file, client_id=f"v13-{device}-{os.getpid()}")
        self.acks: dict[str, list[tuple[float, Any]]] = defaultdict(list)
        self.lock = threading.Lock()
        self.probe.c.on_message = self._on
        assert self.probe.connect() == "ok"
        self.probe.subscribe(f"{P}/{device}/ack")

    def _on(self, c: Any, u: Any, msg: Any) -> None:
        ack = decode_ack(msg.payload, self.device)
        with self.lock:
            self.acks[ack.sha256[:32]].append((time.monotonic(), ack))

    def send(self, payload: bytes) -> float:
        t = time.monotonic()
        self.probe.publish(batch_topic(P, self.device), payload)
        return t


def one_run(broker: LocalBroker, store: str, derive: str, workdir: Path, n_a: int, seed: int,
            flood_s: float = 0.0) -> dict[str, Any]:
    cfg = broker.receiver_config(store)
    keys = ("store", "host", "port", "tls", "ca_file", "username", "password")
    conf = workdir / "receiver.toml"
    conf.write_text("[receiver]\n" + "".join(f"{k} = {json.dumps(getattr(cfg, k))}\n" for k in keys)
                    + f'derive = "{derive}"\n')
    ready, log = workdir / "ready", workdir / "receiver.log"
    procs = []
    with open(log, "ab") as out:
        rx = subprocess.Popen([sys.executable, "-m", "receiver.cli", "run", "--config", str(conf),
                               "--ready-file", str(ready)], stdout=out, stderr=subprocess.STDOUT)
        procs.append(rx)
        if derive == "separate":
            procs.append(subprocess.Popen([sys.executable, "-m", "receiver.cli", "derive", "--store", store,
                                           "--follow"], stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert rx.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    uploads = generate(n_a, seed)
    a, b = Van(broker, "van-a"), Van(broker, "van-b")
    done = threading.Event()
    a_times: list[float] = []

    def flood() -> None:
        t = time.monotonic()
        for i, (_, _, p) in enumerate(uploads):
            a.send(p)
            if flood_s:  # paced: upload i goes out at i * flood_s / n (the v13b shape: 1,600 in ~13 s)
                time.sleep(max(0.0, t + (i + 1) * flood_s / len(uploads) - time.monotonic()))
        a_times.append(time.monotonic() - t)
        done.set()

    th = threading.Thread(target=flood, daemon=True)
    th.start()
    b_sent: list[tuple[str, float]] = []
    while not done.is_set() or len(b_sent) < 20:
        p = encode_batch(honest_batch("van-b", f"eb{seed}", 1 + 6 * len(b_sent)))
        b_sent.append((content_hash(p), b.send(p)))
        time.sleep(0.25)
    th.join()
    end = time.monotonic() + 180
    shas_a = Counter(content_hash(p) for _, _, p in uploads)
    while time.monotonic() < end:
        with a.lock, b.lock:
            if all(a.acks.get(s[:32]) for s in shas_a) and all(b.acks.get(s[:32]) for s, _ in b_sent):
                break
        time.sleep(0.2)
    rss = 0.0
    for line in Path(f"/proc/{rx.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            rss = int(line.split()[1]) / 1024
    alive = rx.poll() is None
    time.sleep(3 if derive == "separate" else 0)  # let the deriver catch up before reading positions
    lat, b_bad, b_missing = [], [], 0
    for s, t in b_sent:
        got = b.acks.get(s[:32])
        if not got:
            b_missing += 1
            continue
        lat.append(got[0][0] - t)
        if got[0][1].status != "stored":
            b_bad.append(got[0][1].status)
    a_outcome: Counter[tuple[str, str]] = Counter()
    a_unanswered, a_wrong = 0, []
    for kind, expect, p in uploads:
        got = a.acks.get(content_hash(p)[:32])
        if not got:
            a_unanswered += 1
            continue
        st_ = got[0][1].status
        a_outcome[(kind.split(":")[0], st_)] += 1
        if (expect == "reject" and st_ != "rejected") or (expect == "store" and st_ not in ("stored", "duplicate")):
            a_wrong.append((kind, st_, (got[0][1].reason or "")[:120]))
    for v in (a, b):
        v.probe.close()
    for pr in procs:
        pr.terminate()
    for pr in procs:
        try:
            pr.wait(30)
        except subprocess.TimeoutExpired:
            pr.kill()
    # own reader
    n_rej = sum(n for (_, s), n in a_outcome.items() if s == "rejected")
    distinct_rej = len({content_hash(p) for k, e, p in uploads
                        if (g := a.acks.get(content_hash(p)[:32])) and g[0][1].status == "rejected"})
    if store.startswith("postgresql"):
        import psycopg
        c: Any = psycopg.connect(store)
        c.execute("SET search_path TO datalab, public")
    else:
        c = sqlite3.connect(store)
    q = lambda s: c.execute(s).fetchone()[0]  # noqa: E731
    db = {
        "b_samples": q("SELECT count(*) FROM samples WHERE device='van-b'"),
        "b_batches_from_a": q("SELECT count(*) FROM batches WHERE device='van-b' AND epoch NOT LIKE 'eb%'"),
        "b_positions": q("SELECT count(*) FROM positions WHERE device='van-b'"),
        "dead_a": q("SELECT count(*) FROM dead_letters WHERE topic='datalab/v1/van-a/batch'"),
        "dead_a_distinct": q("SELECT count(DISTINCT sha256) FROM dead_letters WHERE topic='datalab/v1/van-a/batch'"),
        "parked": q("SELECT count(*) FROM derive_parked"),
        "queue_left": q("SELECT count(*) FROM derive_queue"),
    }
    c.close()
    st_out = subprocess.run([sys.executable, "-m", "receiver.cli", "stats", "--store", store, "--json"],
                            capture_output=True, text=True, timeout=120)
    try:
        stats = json.loads(st_out.stdout)
    except ValueError:
        stats = {"unparsed": st_out.stdout[-300:] + st_out.stderr[-300:]}

    def find(d: Any, key: str) -> Any:
        if isinstance(d, dict):
            if key in d:
                return d[key]
            for v in d.values():
                r = find(v, key)
                if r is not None:
                    return r
        return None
    db["stats_dead_letters"] = find(stats, "dead_letters")
    db["stats_dead_letters_repeated"] = find(stats, "dead_letters_repeated")
    lat.sort()
    logtxt = log.read_text(errors="replace")
    return {
        "store": "pg" if store.startswith("postgresql") else "sqlite", "derive": derive, "seed": seed,
        "a_uploads": len(uploads), "a_flood_s": round(a_times[0], 1) if a_times else None,
        "a_unanswered": a_unanswered, "a_wrong": a_wrong[:10], "a_wrong_n": len(a_wrong),
        "a_rejected": n_rej, "a_rejected_distinct": distinct_rej,
        "b_sent": len(b_sent), "b_missing": b_missing, "b_not_stored": b_bad,
        "b_expected_samples": 6 * len(b_sent),
        "b_lat_median": round(lat[len(lat) // 2], 3) if lat else None,
        "b_lat_p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
        "b_lat_max": round(lat[-1], 3) if lat else None, "b_over_5s": sum(1 for x in lat if x > 5.0),
        "rx_alive": alive, "rx_peak_rss_mb": round(rss), "db": db,
        "log_tracebacks": logtxt.count("Traceback"), "log_unreachable": logtxt.count("unreachable"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", choices=["sqlite", "pg"], required=True)
    ap.add_argument("--derive", choices=["separate", "inline"], required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--uploads", type=int, default=1600)
    ap.add_argument("--out", default="")
    ap.add_argument("--flood-s", type=float, default=0.0, help="spread van A's uploads over this long")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="v13-flood-"))
    broker = LocalBroker("mosquitto", workdir=root / "broker", secure=SecureSetup(devices=("van-a", "van-b")))
    broker.start()
    pg = None
    if args.store == "pg":
        from tests.pg import PgCluster
        pg = PgCluster().start()
    results = []
    try:
        for r in range(args.runs):
            wd = root / f"run{r}"
            wd.mkdir()
            store = pg.create_database() if pg else str(wd / "datalab.sqlite")
            res = one_run(broker, store, args.derive, wd, args.uploads, seed=1000 * r + 7, flood_s=args.flood_s)
            res["flood_s_target"] = args.flood_s
            print(json.dumps(res), flush=True)
            results.append(res)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(res) + "\n")
    finally:
        broker.close()
        if pg:
            pg.stop()
    lats = [r["b_lat_max"] for r in results if r["b_lat_max"] is not None]
    print(f"SUMMARY {args.store}/{args.derive}: runs={len(results)} worst={max(lats) if lats else None}"
          f" p99s={[r['b_lat_p99'] for r in results]}")


if __name__ == "__main__":
    main()
