"""Logging for an unattended device: structured lines for the journal, never a secret.

Under systemd, stderr goes to the journal. Each record becomes one JSON line
(level, logger, message, device id, exception) prefixed with the syslog
priority ``<N>``, which journald strips and turns into the entry's PRIORITY
(``SyslogLevelPrefix=`` is on by default), so ``journalctl -p warning`` works.
At a terminal the usual human format is kept.

Secrets (``uplink.password`` and any sensor option named like a password, token
or secret) are replaced by ``***`` in every record that passes the handler: in
the message, its arguments and the exception text. The filter sits on the
handler, so records of every library (paho, gpiozero, ...) are covered too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from edge.config import AgentConfig

REDACTED = "***"
# Option names whose values are secrets wherever they appear in a configuration.
SECRET_KEY_RE = re.compile(r"(password|passwd|token|secret|api_key|apikey)", re.IGNORECASE)
# Shorter values would redact ordinary words and numbers all over the journal.
MIN_SECRET_LEN = 4

# syslog priorities for the journal's "<N>" prefix.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def secrets_of(cfg: AgentConfig) -> list[str]:
    """Every secret value in a configuration: the uplink password and secret-named options."""
    found: list[str] = []
    if cfg.uplink.password:
        found.append(cfg.uplink.password)

    def walk(obj: Any, key: str = "") -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, str(k))
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, key)
        elif isinstance(obj, str) and key and SECRET_KEY_RE.search(key):
            found.append(obj)

    for sc in cfg.sensors:
        walk(sc.options)
    return found


class Redactor:
    """Replaces known secret strings; the set can change on a configuration reload."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: tuple[str, ...] = ()
        self.update(secrets)

    def update(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        uniq = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LEN}
        self._secrets = tuple(sorted(uniq, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, REDACTED)
        return text


class RedactingFilter(logging.Filter):
    """Bakes the message and exception text into the record, with secrets replaced.

    The message is formatted here (``getMessage``) and ``args`` cleared, so no
    formatter further down can bring a secret back from an argument.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = f"{record.msg!r} {record.args!r}"
        record.msg = self.redactor(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor(record.exc_text)
        # The traceback now lives in exc_text only (already redacted).
        record.exc_info = None
        if record.stack_info:
            record.stack_info = self.redactor(record.stack_info)
        return True


class JournalJsonFormatter(logging.Formatter):
    """One JSON object per line, prefixed ``<priority>`` for journald."""

    def __init__(self, device: str = "", *, priority_prefix: bool = True) -> None:
        super().__init__()
        self.device = device
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "device": self.device,
            "thread": record.threadName,
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        line = json.dumps(entry, ensure_ascii=False, default=str)
        if not self.priority_prefix:
            return line
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{prio}>{line}"


_HANDLER_NAME = "datalab-edge"


def setup_logging(
    cfg: AgentConfig | None = None,
    *,
    verbose: bool = False,
    json_lines: bool | None = None,
    stream: TextIO | None = None,
) -> Redactor:
    """Install the one root handler (replacing an earlier one of ours); returns its redactor.

    ``json_lines`` defaults to on when stderr is the journal (systemd sets
    ``JOURNAL_STREAM``) and off at a terminal.
    """
    if json_lines is None:
        json_lines = bool(os.environ.get("JOURNAL_STREAM")) or os.environ.get("DATALAB_LOG_JSON") == "1"
    redactor = Redactor(secrets_of(cfg) if cfg is not None else ())
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RedactingFilter(redactor))
    if json_lines:
        handler.setFormatter(JournalJsonFormatter(cfg.device.id if cfg else ""))
    else:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        fmt.converter = time.gmtime  # the device's local time zone means nothing centrally
        handler.setFormatter(fmt)
    root = logging.getLogger()
    for h in list(root.handlers):
        # Replace ours and basicConfig's defaults; keep test harness handlers (pytest's caplog).
        if h.get_name() == _HANDLER_NAME or type(h) is logging.StreamHandler:
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # paho and gpiozero are chatty at DEBUG; their warnings still come through.
    for noisy in ("paho", "gpiozero"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)
    return redactor


def update_secrets(redactor: Redactor, cfg: AgentConfig) -> None:
    """After a reload: redact the new secrets, and keep redacting the old ones (still in memory)."""
    redactor.update([*redactor._secrets, *secrets_of(cfg)])
