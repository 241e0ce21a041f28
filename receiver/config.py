"""Receiver configuration: TOML over documented defaults (see receiver/receiver.example.toml)."""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from receiver.flag_policy import DEFAULT_EXCLUDE, DEFAULT_EXCLUDE_PM, FlagPolicy
from receiver.pm_humidity import DEFAULT_KAPPA, check_kappa


DERIVE_MODES = ("inline", "background", "separate")


@dataclass(slots=True)
class ReceiverConfig:
    # Path of the SQLite store, or postgresql://user@host/db (no password in the URL:
    # libpq reads PGPASSWORD or ~/.pgpass; the store setting is never logged).
    store: str = "datalab.sqlite"
    host: str = "localhost"
    port: int = 1883
    topic_prefix: str = "datalab/v1"
    client_id: str = "datalab-receiver-1"
    username: str = ""
    password: str = ""  # secret: never logged
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # Share the subscription among workers with this group name ("" = plain subscription).
    share_group: str = ""
    max_gap_s: float = 10.0  # longest GPS gap to interpolate a position across
    # Where fixes, positions, calibrations and quality flags are derived (docs/architecture.md):
    #   inline     in the ingest transaction, before the ack (small fleets; the default)
    #   background in a thread of this worker, after the ack (the ack waits for raw storage only)
    #   separate   elsewhere: run `datalab-receiver derive --follow` (large fleets)
    derive: str = "inline"
    # Outages (docs/architecture.md, "Outages"): a failed store attempt is retried, the
    # messages held un-acked, after store_retry_min_s doubling up to store_retry_max_s (the
    # cap bounds how long ingest waits after the store is back). The broker is dialled again
    # after broker_retry_min_s doubling up to broker_retry_max_s (first retry at once).
    store_retry_min_s: float = 0.2
    store_retry_max_s: float = 2.0
    broker_retry_min_s: float = 0.1
    broker_retry_max_s: float = 2.0
    # PostgreSQL waits (receiver/pg_timeouts.py): a connection attempt, one statement of
    # ingest and derivation, a lock wait (`datalab-receiver stats` has --timeout-s). A store
    # that answers nothing within them is an outage (health, log), never a hang.
    store_connect_timeout_s: float = 5.0
    store_statement_timeout_s: float = 15.0
    store_lock_timeout_s: float = 5.0
    # PostgreSQL liveness probe (receiver/liveness.py): SELECT 1 every store_probe_s (0: off)
    # on a connection of its own, bounded by store_probe_timeout_s: a frozen server shows in
    # health within ~10 s also when no upload arrives.
    store_probe_s: float = 3.0
    store_probe_timeout_s: float = 2.0
    # JSON file kept up to date with the store's and broker's state ("" = none); read by
    # `datalab-receiver stats --health-file` and supervisors.
    health_file: str = ""
    # Memory budget (docs/architecture.md, "Memory"): what one ingest transaction may hold
    # decoded, in values (a sample counts as its values plus one), and in uploads. An
    # upload over the budget is stored alone.
    group_values: int = 400_000
    group_uploads: int = 64
    # ... and in bytes: the sum of the group's inflated bodies (what its strings, keys and gap
    # reasons take decoded, ~1-2x), which values alone do not see.
    group_bytes: int = 32 * 2**20
    # Flag policy (docs/datalab.md "Flag policy", receiver/flag_policy.py): flags that keep a
    # value out of the street maps and their exports, for every quantity and for PM only.
    exclude_flags: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    exclude_flags_pm: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE_PM))
    # PM hygroscopic growth (receiver/pm_humidity.py, docs/fidelity.md): kappa per PM quantity
    # (pm10: its coarse part), keys given replace the defaults (Huang et al. 2024's urban mid-range);
    # 0 leaves that quantity's growth in. Above 95 % RH nothing is corrected and PM is flagged humid.
    pm_kappa: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KAPPA))
    # Retention (docs/privacy.md, receiver/retention.py): days a van's raw positions (GPS samples,
    # fixes, placed positions, dead letters) are kept once the maps are built; published maps stay.
    positions_keep_days: int = 90

    def flag_policy(self) -> FlagPolicy:
        return FlagPolicy.of(self.exclude_flags, self.exclude_flags_pm)


# What provisioning makes (receiver/provision.py generate_share_group: "ingest-" + 32 hex
# digits), or another long random token: 16+ hex digits with a digit among them, or 22+
# URL-safe characters mixing upper case, lower case and digits.
_RANDOM_HEX = re.compile(r"[0-9a-fA-F]{16,}")
_RANDOM_B64 = re.compile(r"[A-Za-z0-9_-]{22,}")


def weak_share_group(group: str) -> str | None:
    """Why a share group name could be guessed by a van, or None when it looks random.

    A van that knows the group joins it and takes (and loses) a share of every van's batches
    (issue 13: 20 of 40 with ``ingest``); Mosquitto 2.0 cannot refuse the subscription.
    """
    if not group:
        return None  # a plain subscription: nothing to join
    if any(any(c.isdigit() for c in m.group()) for m in _RANDOM_HEX.finditer(group)):
        return None
    for m in _RANDOM_B64.finditer(group):
        t = m.group()
        if any(c.isupper() for c in t) and any(c.islower() for c in t) and any(c.isdigit() for c in t):
            return None
    return (f"share group of {len(group)} characters without a random part: a van that guesses it takes "
            "batches from the receivers; `datalab-receiver provision add-receiver` writes a random one")


def load_receiver_config(path: str | Path | None, **overrides: Any) -> ReceiverConfig:
    cfg = ReceiverConfig()
    data: dict[str, Any] = {}
    known = {f.name: f for f in fields(ReceiverConfig)}
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError("<file>", f"cannot read {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("<file>", f"{path} is not valid TOML: {exc}") from exc
        # Everything lives in [receiver]: a key above it or a misspelt table would otherwise
        # be ignored without a word, and the receiver run on defaults the operator did not choose.
        for key, value in doc.items():
            if key == "receiver":
                continue
            if isinstance(value, dict):
                raise ConfigError(key, f"unknown table [{key}]{_did_you_mean(key, ['receiver'])}")
            if key in known:
                raise ConfigError(key, "a key at the top level is not read: put it under [receiver]")
            raise ConfigError(key, f"unknown key at the top level{_did_you_mean(key, list(known))}"
                              " (keys belong under [receiver])")
        data = doc.get("receiver", {})
        if not isinstance(data, dict):
            raise ConfigError("receiver", "expected a table [receiver]")
    data.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"receiver.{key}", f"unknown key{_did_you_mean(key, list(known))}")
        default = getattr(cfg, key)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"receiver.{key}", f"expected {type(default).__name__}, got {value!r}")
        setattr(cfg, key, value)
    if not 1 <= cfg.port <= 65535:
        raise ConfigError("receiver.port", "must be a TCP port, 1-65535")
    if cfg.derive not in DERIVE_MODES:
        raise ConfigError("receiver.derive", f"must be one of {', '.join(DERIVE_MODES)}, got {cfg.derive!r}")
    if cfg.max_gap_s <= 0:
        raise ConfigError("receiver.max_gap_s", "must be above 0")
    for key in ("store_retry_min_s", "broker_retry_min_s"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"receiver.{key}", "must be above 0")
    for key in ("store_connect_timeout_s", "store_statement_timeout_s", "store_lock_timeout_s",
                "store_probe_timeout_s"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"receiver.{key}", "must be above 0")
    if cfg.store_probe_s < 0:
        raise ConfigError("receiver.store_probe_s", "must be 0 (off) or above")
    for key in ("store_retry", "broker_retry"):
        if getattr(cfg, f"{key}_max_s") < getattr(cfg, f"{key}_min_s"):
            raise ConfigError(f"receiver.{key}_max_s", f"must be at least {key}_min_s")
    if cfg.group_bytes < 1:
        raise ConfigError("receiver.group_bytes", "must be at least 1")
    for key in ("exclude_flags", "exclude_flags_pm"):
        names = getattr(cfg, key)
        if not all(isinstance(n, str) for n in names):
            raise ConfigError(f"receiver.{key}", "expected a list of flag names")
        try:
            FlagPolicy.of(names, ())
        except ValueError as exc:
            raise ConfigError(f"receiver.{key}", str(exc)) from exc
    try:
        cfg.pm_kappa = {**DEFAULT_KAPPA, **check_kappa(cfg.pm_kappa)}
    except ValueError as exc:
        raise ConfigError("receiver.pm_kappa", str(exc)) from exc
    if cfg.positions_keep_days < 1:
        raise ConfigError("receiver.positions_keep_days", "must be at least 1 (days)")
    if cfg.group_values < 1 or cfg.group_uploads < 1:
        raise ConfigError("receiver.group_values" if cfg.group_values < 1 else "receiver.group_uploads",
                          "must be at least 1")
    return cfg


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def pg_timeouts(cfg: ReceiverConfig, *, statement_s: float | None = None) -> Any:
    """The PostgreSQL bounds ``cfg`` sets (``statement_s``: another statement timeout);
    None for a SQLite store (whose waits are its busy_timeout)."""
    from receiver.store_factory import is_postgres_url

    if not is_postgres_url(cfg.store):
        return None
    from receiver.pg_timeouts import PgTimeouts  # psycopg only when PostgreSQL is used

    statement = cfg.store_statement_timeout_s if statement_s is None else statement_s
    return PgTimeouts(cfg.store_connect_timeout_s, statement, min(cfg.store_lock_timeout_s, statement))
