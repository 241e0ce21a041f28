"""Issue #14 re-attack (t14), findings 1, 2 and 4: single bit flips the salvage and the seal-time
set-aside must survive without losing a committed sample silently.

Reuses the tester's image and oracle (tests/attack_t14/probe_flips.py, oracle_t14.py): 30 samples
committed, 1-10 delivered through the real receiver, 11-20 sealed but never acknowledged, 21-30
unsealed, 31-33 a recorded loss. Each trial flips ONE bit in a copy, reopens the buffer (quarantine,
salvage), delivers everything into a real SQLiteStore and a second start, then checks every committed
sample: stored once and unaltered, or owned up to by a gap record of its epoch.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.attack_t14.probe_flips import cells, make_image, regions, trial


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    d = tmp_path_factory.mktemp("t14image")
    truth = make_image(d, random.Random(3))
    return d, truth


def _header_at(db: Path, table: str) -> int:
    page = regions(db)[table][0]
    return (page - 1) * 4096 + (100 if page == 1 else 0)


@pytest.mark.parametrize("bit", range(16))
def test_flipped_epochs_cell_count_salvages_and_keeps_running(image, tmp_path: Path, bit: int) -> None:
    """Finding 1: the epochs page's cell count flipped; SQLite hands back NULL / garbage for
    next_carrier. Old code: TypeError in salvage at every open (crash loop)."""
    d, truth = image
    at = _header_at(d / "b.db", "epochs") + 3 + bit // 8  # the 2-byte cell count
    ok, why = trial(d, tmp_path / "work", truth, "b.db", at, bit % 8)
    print(f"epochs header byte {3 + bit // 8} bit {bit % 8}: {why}")
    assert ok, why


def test_batches_cell_count_zero_owns_up_to_unacked_batch(image, tmp_path: Path) -> None:
    """Finding 2: the batches page says 0 cells. Old code took the never-acknowledged sealed batch
    11-20 as delivered: 10 samples missing with no gap record."""
    d, truth = image
    at = _header_at(d / "b.db", "batches") + 4
    ok, why = trial(d, tmp_path / "work", truth, "b.db", at, 0)
    print(f"batches header byte 4 bit 0: {why}")
    assert ok, why
    assert "gapped=0 " not in why  # 11-20 are owned up to, not silently taken as delivered


@pytest.mark.parametrize("which", ["first", "last"])
def test_flipped_rowid_of_unsealed_row_gaps_the_true_number(image, tmp_path: Path, which: str) -> None:
    """Finding 4: every single-bit flip of the seq (rowid) of the first and the last unsealed row.
    Old code put the gap on the damaged number (an already delivered one, or past the end) and
    lost 21 / 30 with no gap."""
    d, truth = image
    page = regions(d / "b.db")["samples"][0]
    rows = sorted(cells(d / "b.db", page), key=lambda c: c[1])
    _, rid, at = rows[0] if which == "first" else rows[-1]
    bad = []
    for bit in range(7):
        ok, why = trial(d, tmp_path / "work", truth, "b.db", at, bit)
        print(f"rowid {rid} -> {rid ^ (1 << bit)}: {why}")
        if not ok:
            bad.append((rid ^ (1 << bit), why))
    assert not bad, bad
