"""t14 probe: single-bit flips in a stopped van's buffer and side files, then restart and deliver.

Image: 30 samples committed in 3 commits (plus a recorded loss of 3), batch 1-10 sealed and stored
through the real receiver (Ingestor over SQLiteStore), batch 11-20 sealed but not delivered, 21-30
unsealed. The buffer is closed (WAL checkpointed away), then ONE bit is flipped, in the main file (a
page of samples / batches / gaps / meta / the schema / anywhere) or in .seq / .id / .held. The buffer
is reopened and everything delivered; my oracle (oracle_t14) then checks every committed sample by
its token: stored once, unaltered, or owned up to by a gap of its epoch.

Run: .venv/bin/python -m tests.attack_t14.probe_flips [trials] [seed]
"""

from __future__ import annotations

import collections
import random
import shutil
import sqlite3
import sys
import tempfile
import traceback
from pathlib import Path

from buffer.store import Buffer
from core.sample import Sample, TimeSource
from receiver.ingest import Ingestor
from receiver.store import SQLiteStore
from tests.attack_t14.oracle_t14 import Truth, judge
from core.wire import batch_topic, parse_batch_id

DEV = "van-t14"
NOW_MS = 1_796_000_000_000  # the receiver's "received" time: after every sample's time


def _deliver(buf: Buffer, ing: Ingestor, log: list[str], dev: str = DEV) -> None:
    """The agent's loop in small: seal, publish, acknowledge or reject (edge/agent.py's rule)."""
    for _ in range(60):
        sbs = buf.pending(100)
        if not sbs:
            sb = buf.seal(2000, NOW_MS)
            if sb is None:
                return
            sbs = [sb]
        for sb in sbs:
            ack = ing.handle(batch_topic("datalab/v1", dev), sb.payload, NOW_MS).ack
            log.append(f"{sb.batch_id}:{ack.status}")
            if ack.committed:
                buf.acknowledge(sb.batch_id)
            else:
                buf.reject(sb.batch_id, parse_batch_id(sb.batch_id)[3], ack.reason)
    raise AssertionError(f"delivery does not end: {log[-5:]}")




def make_image(d: Path, rng: random.Random) -> list[Truth]:
    buf = Buffer(d / "b.db", DEV, reserve_bytes=0)
    truth: list[Truth] = []
    tok = 0
    for g in range(3):
        ss = []
        for i in range(10):
            tok += 1
            ss.append(Sample("pm", 1_795_000_000_000 + tok * 1000, 50_000 + tok * 1000, TimeSource.GPS,
                             {"v": round(rng.uniform(0, 100), 3), "tok": tok}, ("warming_up",) if tok % 7 == 0 else (),
                             None, "boot-a"))
        seqs = buf.commit(ss)
        for s, q in zip(ss, seqs):
            truth.append(Truth(buf.epoch, q, s.sensor, s.t_utc_ms, s.t_mono_ms, str(s.time_src), s.boot_id,
                               dict(s.values), tuple(s.flags)))
        if g == 0:
            sb = buf.seal(10, 1)
            st = SQLiteStore(d / "store.sqlite")
            ack = Ingestor(st).handle(batch_topic("datalab/v1", DEV), sb.payload, NOW_MS).ack
            assert ack.committed, ack
            buf.acknowledge(sb.batch_id)
            st.close()
        if g == 1:
            buf.seal(10, 2)
    buf.record_lost(3, "probe: 3 held samples lost")
    buf.close()
    return truth


def regions(db: Path) -> dict[str, list[int]]:
    c = sqlite3.connect(db)
    out = collections.defaultdict(list)
    try:
        for name, page in c.execute("SELECT name, pageno FROM dbstat"):
            out[name].append(page)
    finally:
        c.close()
    return out


def used_bytes(db: Path) -> dict[int, list[int]]:
    """Per page (1-based), the offsets a flip can matter at: the b-tree header, the cell pointers,
    and the cell content area (the rest of a page is free space, zeros)."""
    raw = db.read_bytes()
    out = {}
    for p in range(1, len(raw) // 4096 + 1):
        page = raw[(p - 1) * 4096:p * 4096]
        h = 100 if p == 1 else 0
        kind = page[h]
        hdr = 12 if kind in (2, 5) else 8
        ncell = int.from_bytes(page[h + 3:h + 5], "big")
        start = int.from_bytes(page[h + 5:h + 7], "big") or 65536
        offs = list(range(0, h + hdr + 2 * ncell)) + list(range(min(start, 4096), 4096))
        out[p] = offs
    return out


def cells(db: Path, page_no: int) -> list[tuple[int, int, int]]:
    """(cell offset in file, rowid, offset of the rowid varint in file) of a table leaf page."""
    raw = db.read_bytes()
    base = (page_no - 1) * 4096
    page = raw[base:base + 4096]
    ncell = int.from_bytes(page[3:5], "big")
    out = []
    for i in range(ncell):
        off = int.from_bytes(page[8 + 2 * i:10 + 2 * i], "big")
        j = off
        while page[j] & 0x80:  # payload size varint
            j += 1
        j += 1
        rid_at = j
        rid = 0
        while True:
            rid = (rid << 7) | (page[j] & 0x7F)
            if not page[j] & 0x80:
                break
            j += 1
        out.append((base + off, rid, base + rid_at))
    return out


def rowid_cases(image: Path, root: Path, truth: list[Truth]) -> None:
    """Every single-bit flip of every unsealed row's rowid (its seq: the key the checksum covers)."""
    reg = regions(image / "b.db")
    page = reg["samples"][0]
    bad = 0
    total = 0
    for _, rid, at in cells(image / "b.db", page):
        for bit in range(7):
            total += 1
            ok, why = trial(image, root / "work", truth, "b.db", at, bit)
            if not ok:
                bad += 1
                print(f"NOT OK rowid {rid} -> {rid ^ (1 << bit)}: {why}")
    print(f"rowid flips: {total}, not ok {bad}")


def header_cases(image: Path, root: Path, truth: list[Truth], reg: dict[str, list[int]]) -> None:
    """Every single-bit flip of every page's b-tree header (type, freeblock, cell count, content start)."""
    names = {p: n for n, ps in reg.items() for p in ps}
    bad = 0
    total = 0
    for p in sorted(names):
        h = (p - 1) * 4096 + (100 if p == 1 else 0)
        for byte in range(8):
            for bit in range(8):
                total += 1
                ok, why = trial(image, root / "work", truth, "b.db", h + byte, bit)
                if not ok:
                    bad += 1
                    print(f"NOT OK page {p} ({names[p]}) header byte {byte} bit {bit}: {why[:300]}")
    print(f"header flips: {total}, not ok {bad}")


def cell_cases(image: Path, root: Path, truth: list[Truth], reg: dict[str, list[int]], rowids: list[int]) -> None:
    """Every single-bit flip of every byte of the named unsealed rows' cells (header, rowid, record)."""
    page = reg["samples"][0]
    cs = sorted(cells(image / "b.db", page))
    bad = 0
    total = 0
    kinds: dict[str, int] = collections.Counter()
    for i, (off, rid, _) in enumerate(cs):
        if rid not in rowids:
            continue
        # the cell ends where the next one (higher offset) starts, or at the page's end
        nxt = min([o for o, _, _ in cs if o > off] + [((off // 4096) + 1) * 4096])
        for byte in range(off, nxt):
            for bit in range(8):
                total += 1
                ok, why = trial(image, root / "work", truth, "b.db", byte, bit)
                if not ok:
                    bad += 1
                    kinds[why.split(" stored=")[0][:40] + ("altered" if "altered=[(" in why else "") +
                          ("missing" if "missing=[]" not in why else "")] += 1
                    print(f"NOT OK row {rid} cell byte {byte - off} bit {bit}: {why[:400]}")
    print(f"cell flips: {total}, not ok {bad}, kinds {dict(kinds)}")


def flip(path: Path, byte: int, bit: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[byte] ^= 1 << bit
    path.write_bytes(bytes(raw))


def trial(image: Path, work: Path, truth: list[Truth], target: str, byte: int, bit: int) -> tuple[bool, str]:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(image, work)
    flip(work / target, byte, bit)
    try:
        buf = Buffer(work / "b.db", DEV, reserve_bytes=0)
    except Exception as exc:  # the van could not start: a crash loop
        return False, f"OPEN RAISED {type(exc).__name__}: {exc}"
    st = SQLiteStore(work / "store.sqlite")
    try:
        log: list[str] = []
        try:
            _deliver(buf, Ingestor(st), log)
        except Exception as exc:
            return False, f"DELIVERY RAISED {type(exc).__name__}: {exc} {traceback.format_exc()[-400:]}"
        refused = [x for x in log if x.rsplit(":", 1)[-1] not in ("stored", "duplicate")]
        # A second start must not change the picture (a loss owned up twice, a re-send).
        buf.close()
        buf = Buffer(work / "b.db", DEV, reserve_bytes=0)
        log2: list[str] = []
        _deliver(buf, Ingestor(st), log2)
    finally:
        st.close()
        try:
            buf.close()
        except Exception:
            pass
    v = judge(work / "store.sqlite", DEV, truth)
    extra = f" refused={refused[:2]}" if refused else ""
    extra += f" second-start-sent={log2[:3]}" if [x for x in log2 if not x.endswith(':duplicate')] else ""
    return v.ok and not refused, v.brief() + extra


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="t14flip-"))
    image = root / "image"
    image.mkdir()
    truth = make_image(image, rng)
    reg = regions(image / "b.db")
    size = (image / "b.db").stat().st_size
    used = used_bytes(image / "b.db")
    if "--rowid" in sys.argv:
        return rowid_cases(image, root, truth)
    if "--cells" in sys.argv:
        return cell_cases(image, root, truth, reg, [int(x) for x in sys.argv[sys.argv.index("--cells") + 1].split(",")])
    if "--headers" in sys.argv:
        return header_cases(image, root, truth, reg)
    print(f"image: {size} bytes, pages by table: { {k: v for k, v in reg.items()} }")
    targets: list[tuple[str, str, int]] = []  # (label, file, byte)
    for _ in range(n):
        r = rng.random()
        if r < 0.55:
            name = rng.choice(["samples", "batches", "gaps", "meta", "sqlite_autoindex_meta_1", "counters",
                               "sqlite_schema", "sqlite_master", "sqlite_sequence", "epochs"])
            pages = reg.get(name)
            if not pages:
                continue
            p = rng.choice(pages)
            targets.append((name, "b.db", (p - 1) * 4096 + rng.choice(used[p])))
        elif r < 0.65:
            targets.append(("anywhere", "b.db", rng.randrange(size)))
        else:
            side = rng.choice([".seq", ".id", ".held"])
            f = image / f"b.db{side}"
            body = f.read_bytes()
            end = body.find(b"\0")
            span = len(body) if end <= 0 else end + 8
            targets.append((side, f"b.db{side}", rng.randrange(min(span, len(body)))))
    tally: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    bad = []
    for label, f, byte in targets:
        bit = rng.randrange(8)
        ok, why = trial(image, root / "work", truth, f, byte, bit)
        tally[label][0] += 1
        if not ok:
            tally[label][1] += 1
            bad.append((label, f, byte, bit, why))
    for label, (tot, nb) in sorted(tally.items()):
        print(f"{label:28s} trials={tot:4d} not_ok={nb}")
    for b in bad:
        print("NOT OK", b)
    print(f"total {len(targets)} not_ok {len(bad)}; image kept at {image}")


if __name__ == "__main__":
    main()
