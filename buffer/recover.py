"""Corruption: quarantine the files, start afresh, salvage what verifies (see buffer.recovery)."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any, Callable

from buffer import recovery
from buffer.handle import FileHandle
from buffer.highwater import HighWater
from buffer.identity import IdentityFile
from buffer.seams import SalvageWriter, Tally
from core.sample import Sample
from core.wire import Batch, encode_batch

log = logging.getLogger("buffer.store")  # the name the one-class store logged under

SALVAGE_BATCH_SAMPLES = 1000


class Recovery:
    """Quarantines a damaged file, has it reopened afresh, and salvages what verifies into it."""

    def __init__(self, handle: FileHandle, carriers: SalvageWriter, tally: Tally, *, quarantine_dir: Path,
                 identity: IdentityFile, highwater: HighWater, reopen: Callable[[], None],
                 peek_epoch: Callable[[], str | None]) -> None:
        self._h = handle
        self._carriers = carriers
        self._tally = tally
        self.quarantine_dir = quarantine_dir
        self._identity = identity
        self._highwater = highwater
        # Opening is the facade's (buffer.opening): a fresh file with a new epoch, and the
        # epoch a damaged file names (its side files when meta's failed its check).
        self._reopen = reopen
        self._peek_epoch = peek_epoch

    def quarantine(self, reason: str, epoch: str | None) -> Path:
        log.error("buffer %s is corrupt (%s): quarantining it", self._h.path, reason)
        qdir = recovery.quarantine(self._h.path, self.quarantine_dir, epoch, reason)
        self._identity.copy_to(qdir, epoch)  # names the epoch if the file cannot
        self._highwater.move_to(qdir)  # a third witness; the new epoch starts without it
        return qdir

    def recover(self, reason: str) -> None:
        """Corruption found during use: move the files aside, start afresh, salvage."""
        old_epoch = getattr(self._h, "epoch", None) or self._peek_epoch()
        # A read-only connection kept open while the writer closes stops the
        # writer from checkpointing the (damaged) WAL into the main file.
        keeper: sqlite3.Connection | None = None
        try:
            keeper = sqlite3.connect(self._h.path.as_uri() + "?mode=ro", uri=True)
            keeper.execute("BEGIN")
            keeper.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError:
            pass
        try:
            if hasattr(self._h, "db"):
                self._h.db.close()
        except sqlite3.DatabaseError:
            pass
        self.quarantine(reason, old_epoch)
        if keeper is not None:
            keeper.close()
        self._reopen()  # forgets a damaged epoch: the new file's is its own
        self.salvage_pending()

    def salvage_pending(self) -> None:
        """Salvage every quarantined file whose salvage is not recorded as done."""
        for qdir in recovery.unsalvaged(self.quarantine_dir):
            mark = f"salvaged:{qdir.name}"
            if self._h.db.execute("SELECT 1 FROM meta WHERE key=?", (mark,)).fetchone():
                recovery.mark_salvaged(qdir, {"into_epoch": self._h.epoch})
                continue
            ident = IdentityFile(qdir / self._identity.path.name).read()
            seq = HighWater(qdir / self._highwater.path.name).read()
            if ident is None:
                # No identity file: the .seq copy still names the epoch (the third witness).
                ident = (seq[0], self._h.device_id) if seq else None
            elif seq is not None and seq[0] != ident[0]:
                # The witnesses disagree: a stale .id (a re-birth whose rewrite a full card
                # refused, an old-format file) would send the samples under an earlier epoch
                # whose numbers the receiver already holds, acked "stored" and dropped there.
                # Neither is believed: what meta cannot name goes under an epoch of its own.
                log.error("buffer: %s names epoch %s, %s names %s: salvaging %s under a fresh epoch",
                          self._identity.path.name, ident[0], self._highwater.path.name, seq[0], qdir)
                ident = None
            found = recovery.salvage(qdir / self._h.path.name, ident)
            try:
                summary = self._apply_salvage(found, mark)
            except sqlite3.DatabaseError as exc:
                if not recovery.is_disk_full(exc):
                    raise
                self._h.rollback_quietly()
                log.error("no room to salvage %s yet; will retry at next start", qdir)
                continue
            recovery.mark_salvaged(qdir, summary)
            log.warning("salvaged %s: %s", qdir, summary)

    def _apply_salvage(self, s: recovery.Salvage, mark: str) -> dict[str, Any]:
        """Write one salvage into this database, in one transaction (all or nothing).

        Unsealed samples are sealed into batches *of their old epoch* rather
        than committed again as new samples: their identity (epoch, seq) stays
        the one they were given when their commit returned, so the old epoch's
        sequence space is accounted for in one place (salvaged batches +
        gap records), and running the salvage twice (a crash before the
        quarantine is marked done) produces the same ids with the same bytes,
        which the receiver deduplicates. Re-committing would give them new
        numbers each time: duplicates in the store.
        """
        # The configured id, never the file's: a side file or meta of another van must not relabel
        # this van's samples (the receiver refuses them: the device is not the topic's).
        device = self._h.device_id
        n_samples = 0
        with self._h.tx():
            for b in s.batches:
                self._carriers.insert_salvaged(b.epoch, b.device, b.first_seq, b.last_seq, b.n_samples,
                                      b.payload, b.sealed_utc_ms, b.oldest_utc_ms)
            for e, nxt in s.carrier_next.items():
                self._h.db.execute(
                    "INSERT INTO epochs VALUES (?, ?, ?) ON CONFLICT(epoch)"
                    " DO UPDATE SET next_carrier = max(next_carrier, excluded.next_carrier)",
                    (e, device, nxt),
                )
            if s.epoch is not None:
                n_samples = self._seal_salvaged_samples(s.epoch, device, s.samples)
                if s.carrier_base is not None:
                    self._carriers.ensure_epoch(s.epoch, device, s.carrier_base)
                self._carriers.add_carrier(s.epoch, device, s.gaps)
            for e, gaps in s.other_gaps.items():
                self._carriers.add_carrier(e, device, gaps)
            summary = {
                "into_epoch": self._h.epoch,
                "from_epoch": s.epoch,
                "batches": len(s.batches),
                "samples": n_samples,
                "gaps": [[g.first_seq, g.last_seq, g.reason] for g in s.gaps],
                "notes": s.notes,
            }
            self._h.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (mark, json.dumps(summary)))
            self._tally.bump("quarantined")
            self._tally.bump("salvaged_batches", len(s.batches))
            self._tally.bump("salvaged_samples", n_samples)
        return summary

    def _seal_salvaged_samples(self, epoch: str, device: str, samples: list[Sample]) -> int:
        """Seal runs of consecutive unsealed samples into batches of their old epoch."""
        # One row per number: a damaged b-tree can hand the same row out twice (read forwards
        # and backwards, or "Rowid out of order"), and a second run starting at a number
        # already used would be dropped by INSERT OR IGNORE without a trace. The checksum
        # covers seq, so two rows that verify with one number are the same sample.
        samples = sorted({x.seq: x for x in reversed(samples)}.values(), key=lambda x: x.seq or 0)
        runs: list[list[Sample]] = []
        for smp in samples:
            if runs and smp.seq == (runs[-1][-1].seq or 0) + 1 and len(runs[-1]) < SALVAGE_BATCH_SAMPLES:
                runs[-1].append(smp)
            else:
                runs.append([smp])
        for run in runs:
            first, last = run[0].seq, run[-1].seq
            assert first is not None and last is not None
            payload = encode_batch(Batch(device, epoch, first, last, run, []))
            oldest = min((x.t_utc_ms for x in run if x.t_utc_ms is not None), default=None)
            self._carriers.insert_salvaged(epoch, device, first, last, len(run), payload, 0, oldest)
        return len(samples)
