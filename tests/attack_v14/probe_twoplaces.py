"""v14 probe: salvage of a buffer damaged in TWO places, aimed at meta.acked_through.

Reuses the t14 image (tests/attack_t14/probe_flips.make_image: 30 samples, 1-10 sealed+stored+acked,
11-20 sealed NOT delivered, 21-30 unsealed, a recorded loss of 3) and its trial/oracle (oracle_t14,
which matches every committed sample by its own token in the store: stored once, unaltered, or owned
up to by a gap). The oracle is the previous tester's, not the project's.

Cases:
  --acked   meta.acked_through's digits changed to a value AHEAD of reality ("10" -> "30", "11", "20",
            "90", one bit each where possible), together with a second damage that makes the file fail
            quick_check / lose its batches table (a batches page header cell count -> 0, or a random
            bit of the batches page).
  N SEED    N random pairs of single-bit flips in used bytes of any two pages.

Run: .venv/bin/python -m tests.attack_v14.probe_twoplaces --acked
     .venv/bin/python -m tests.attack_v14.probe_twoplaces 150 7
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from pathlib import Path

from tests.attack_t14.probe_flips import make_image, regions, trial, used_bytes


def _acked_at(db: Path) -> tuple[int, bytes]:
    raw = db.read_bytes()
    i = raw.find(b"acked_through")
    assert i >= 0, "no acked_through in the image"
    j = i + len(b"acked_through")
    k = j
    while raw[k:k + 1].isdigit():
        k += 1
    return j, raw[j:k]


def _set(path: Path, at: int, new: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[at:at + len(new)] = new
    path.write_bytes(bytes(raw))


def acked_cases(root: Path, image: Path, truth) -> None:
    db = image / "b.db"
    at, val = _acked_at(db)
    reg = regions(db)
    print(f"acked_through on disk = {val!r} at byte {at}; batches pages {reg.get('batches')}")
    values = [b"30", b"11", b"20", b"90", b"19"] if len(val) == 2 else [b"3", b"9"]
    bad = total = 0
    for v in values:
        for second in ["cellcount0"] + [f"rand{i}" for i in range(6)]:
            img = root / "img2"
            shutil.rmtree(img, ignore_errors=True)
            shutil.copytree(image, img)
            _set(img / "b.db", at, v[:len(val)])
            p = reg["batches"][0]
            if second == "cellcount0":
                # cell count (bytes 3-4 of the page header) -> 0: flip every set bit through trial's
                # one flip plus direct writes before it
                base = (p - 1) * 4096
                raw = bytearray((img / "b.db").read_bytes())
                n = int.from_bytes(raw[base + 3:base + 5], "big")
                # leave one set bit for trial to flip
                low = n & -n
                raw[base + 3:base + 5] = low.to_bytes(2, "big")
                (img / "b.db").write_bytes(bytes(raw))
                byte, bit = base + 3 + (0 if low >= 256 else 1), (low.bit_length() - 1) % 8
            else:
                rng = random.Random(hash((v, second)) & 0xffff)
                byte = (p - 1) * 4096 + rng.choice(used_bytes(img / "b.db")[p])
                bit = rng.randrange(8)
            ok, why = trial(img, root / "work", truth, "b.db", byte, bit)
            total += 1
            if not ok:
                bad += 1
                print(f"NOT OK acked={v!r} second={second} byte={byte} bit={bit}: {why[:300]}")
    print(f"acked-ahead cases {total}, not ok {bad}")


def pair_cases(root: Path, image: Path, truth, n: int, seed: int) -> None:
    rng = random.Random(seed)
    db = image / "b.db"
    used = used_bytes(db)
    pages = sorted(used)
    bad = 0
    for i in range(n):
        img = root / "img2"
        shutil.rmtree(img, ignore_errors=True)
        shutil.copytree(image, img)
        p1 = rng.choice(pages)
        b1 = (p1 - 1) * 4096 + rng.choice(used[p1])
        raw = bytearray((img / "b.db").read_bytes())
        bit1 = rng.randrange(8)
        raw[b1] ^= 1 << bit1
        (img / "b.db").write_bytes(bytes(raw))
        p2 = rng.choice(pages)
        b2 = (p2 - 1) * 4096 + rng.choice(used[p2])
        bit2 = rng.randrange(8)
        ok, why = trial(img, root / "work", truth, "b.db", b2, bit2)
        if not ok:
            bad += 1
            print(f"NOT OK pair ({p1}:{b1}.{bit1}) ({p2}:{b2}.{bit2}): {why[:300]}")
    print(f"pairs {n}, not ok {bad}")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="v14two-"))
    image = root / "image"
    image.mkdir()
    truth = make_image(image, random.Random(1))
    print("pages:", dict(regions(image / "b.db")))
    if "--acked" in sys.argv:
        acked_cases(root, image, truth)
    else:
        pair_cases(root, image, truth, int(sys.argv[1]) if len(sys.argv) > 1 else 100,
                   int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    print(f"work kept at {root}")


if __name__ == "__main__":
    main()
