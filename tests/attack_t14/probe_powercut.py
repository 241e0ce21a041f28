"""t14 probe: power cuts (the project's FUSE power-cut file system) DURING the recovery of a damaged
buffer: quarantine (files renamed into quarantine/), salvage into a fresh database, delivery. The
project's power-cut test cuts a healthy van; this cuts the code path that moves files around.

Each episode: a buffer image (probe_flips.make_image: 30 committed samples, 1-10 stored, 11-20
sealed, 21-30 unsealed, a loss of 3) with a damage that makes the next open quarantine it, copied
onto the power-cut card and synced. Then up to CUTS times: a child process opens the buffer and
delivers to the store (the store lives on the ordinary disk: the receiver is not cut here); the
child is SIGKILLed at a random moment after it printed "opening", and the card loses what was
not synced (all of it, or each page with probability 1/2). Finally a child runs to the end, and my
oracle (oracle_t14, by token) judges: each committed sample stored once, unaltered, or gapped.

Run: ATTACK_T14=1 .venv/bin/python -m tests.attack_t14.probe_powercut [episodes] [cuts] [seed]
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulator.powercut import PowerCutMount
from tests.attack_t14.oracle_t14 import judge
from tests.attack_t14.probe_flips import DEV, flip, make_image

CHILD = """
import sys
from pathlib import Path
from buffer.store import Buffer
from receiver.ingest import Ingestor
from receiver.store import SQLiteStore
from tests.attack_t14.probe_flips import DEV, _deliver
print("opening", flush=True)
buf = Buffer(Path(sys.argv[1]), DEV, reserve_bytes=0)
st = SQLiteStore(Path(sys.argv[2]))
log = []
_deliver(buf, Ingestor(st), log)
buf.close(); st.close()
print("done", log, flush=True)
"""


def damage(img: Path, kind: str) -> None:
    if kind == "meta":  # meta's page overwritten: quarantine, salvage under the .id's epoch
        raw = bytearray((img / "b.db").read_bytes())
        raw[4096:8192] = b"\xa5" * 4096
        (img / "b.db").write_bytes(bytes(raw))
    elif kind == "rowid":  # a row's key out of order: quick_check fails
        from tests.attack_t14.probe_flips import cells, regions
        page = regions(img / "b.db")["samples"][0]
        at = next(a for _, rid, a in cells(img / "b.db", page) if rid == 28)
        flip(img / "b.db", at, 0)
    elif kind == "none":
        pass


def sync_tree(d: Path) -> None:
    for p in ([d] if d.name == "card" else [d, *d.rglob("*")]):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def main() -> None:
    episodes = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    cuts = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 14
    kinds = sys.argv[4].split(",") if len(sys.argv) > 4 else ["meta", "rowid", "none"]
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="t14cut-"))
    card = PowerCutMount(root / "card", seed=seed)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    bad = 0
    total_cuts = 0
    try:
        for ep in range(episodes):
            kind = kinds[ep % len(kinds)]
            img = root / f"img{ep}"
            img.mkdir()
            truth = make_image(img, random.Random(ep))
            damage(img, kind)
            store = root / f"store{ep}.sqlite"
            shutil.move(img / "store.sqlite", store)
            van = card.path / f"van{ep}"
            shutil.copytree(img, van)
            sync_tree(van)
            sync_tree(card.path)  # the van folder's own entry (a first run of this probe forgot it: all lost)
            outcomes = []
            for c in range(cuts):
                errf = open(root / f"child{ep}-{c}.err", "w")
                p = subprocess.Popen([sys.executable, "-c", CHILD, str(van / "b.db"), str(store)], env=env,
                                     stdout=subprocess.PIPE, stderr=errf, text=True)
                assert p.stdout.readline().startswith("opening")
                time.sleep(rng.uniform(0.0, 0.6))
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                    outcomes.append("cut")
                else:
                    outcomes.append(f"finished rc={p.returncode}")
                p.wait()
                keep = rng.choice([0.0, 0.5])
                if not os.environ.get("T14_KILL_ONLY"):  # a kill alone: the page cache is kept
                    lost = card.cut(keep)
                    outcomes[-1] += f"(lost {lost[0]} B, {lost[1]} entries)"
                total_cuts += 1
                if os.environ.get("T14_DUMP"):
                    print(f"   after cut {c}: {sorted(str(x.relative_to(van)) for x in van.rglob('*'))}")
            p = subprocess.run([sys.executable, "-c", CHILD, str(van / "b.db"), str(store)], env=env,
                               capture_output=True, text=True, timeout=120)
            v = judge(store, DEV, truth)
            ok = p.returncode == 0 and v.ok
            if not ok:
                qs = sorted(x.name for x in (van / "quarantine").glob("*")) if (van / "quarantine").exists() else []
                print(f"   left on the card: {sorted(x.name for x in van.iterdir())} quarantine: "
                      f"{[(q, sorted(y.name for y in (van / 'quarantine' / q).iterdir())) for q in qs]}")
            bad += not ok
            print(f"episode {ep} damage={kind} {outcomes} final_rc={p.returncode} "
                  f"{'ok' if ok else 'NOT OK'} {v.brief()} {p.stderr[-300:] if p.returncode else ''}", flush=True)
    finally:
        card.close()
    print(f"logs in {root}")
    print(f"episodes {episodes}, cuts {total_cuts}, not ok {bad}; card stats lost bytes {card.bytes_lost}")


if __name__ == "__main__":
    main()
