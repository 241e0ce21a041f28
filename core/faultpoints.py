"""Named crash points for fault tests: die here, like a power cut would.

``DATALAB_CRASH_AT="seal:3"`` makes the process SIGKILL itself the 3rd time it
reaches ``crash_point("seal")`` (several: ``"seal:3,ack:1"``). Unset, a crash
point costs one dictionary lookup. The delivery tests use these to kill the
agent and the receiver at exactly the moments the contract must survive:
between a publish and its ack, after a commit before the ack, while deleting.
"""

from __future__ import annotations

import os
import signal

_PLAN: dict[str, int] = {}
_SEEN: dict[str, int] = {}


def _load() -> None:
    spec = os.environ.get("DATALAB_CRASH_AT", "")
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        _PLAN[name] = int(count or 1)


_load()


def crash_point(name: str) -> None:
    if not _PLAN or name not in _PLAN:
        return
    _SEEN[name] = _SEEN.get(name, 0) + 1
    if _SEEN[name] >= _PLAN[name]:
        os.kill(os.getpid(), signal.SIGKILL)
