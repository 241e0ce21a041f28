"""The buffer file's layout: its page size and tables (see buffer.store for the life of a row)."""

from __future__ import annotations

PAGE_SIZE = 4096

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sensor TEXT NOT NULL,
    t_utc_ms INTEGER,  -- NULL: time unknown
    t_mono_ms INTEGER NOT NULL,
    time_src TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    vals TEXT NOT NULL,
    flags TEXT NOT NULL,
    crc INTEGER  -- buffer.rowcheck.row_crc of the row; NULL in files made before checksums
);
-- Unsealed rows that could not be sealed (checksum mismatch, unreadable JSON): set
-- aside with the bytes as read, never deleted by the buffer; a gap record owns up.
CREATE TABLE IF NOT EXISTS bad_rows (
    seq INTEGER,
    reason TEXT NOT NULL,
    raw BLOB NOT NULL,
    set_aside_utc_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    payload BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    sealed_utc_ms INTEGER NOT NULL,
    oldest_utc_ms INTEGER  -- earliest sample time inside, for the heartbeat's backlog age
);
CREATE TABLE IF NOT EXISTS gaps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    sent_in INTEGER  -- first_seq of the batch that carries it, NULL until sealed
);
-- Sealed batches of earlier epochs (salvaged from a quarantined file), published
-- as they are under their old id. n_samples = 0: a gap carrier of that epoch.
CREATE TABLE IF NOT EXISTS salvaged (
    epoch TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    device TEXT NOT NULL,
    n_samples INTEGER NOT NULL,
    payload BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    sealed_utc_ms INTEGER NOT NULL,
    oldest_utc_ms INTEGER,
    PRIMARY KEY (epoch, first_seq)
);
-- Per dead epoch: the next sequence number to name a gap carrier after (past the
-- epoch's last sample, so a carrier id never equals a real batch id).
CREATE TABLE IF NOT EXISTS epochs (
    epoch TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    next_carrier INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
