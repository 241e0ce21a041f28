"""Issue #14 re-attack (t14), finding 5: some room comes back, but less than a whole commit slice.

A real 5 MiB tmpfs under the buffer, default buffer settings. The van is out of coverage (no
broker: no acknowledgement frees pages, so only the file system's room counts). A filler takes the
card while samples keep coming and are held in memory; then only 256 KiB of it is given back. Old
code re-committed what it held 1,000 samples at a time and needed about twice a slice's bytes plus
the reserve: nothing was committed again, the van stayed ``disk_full``. Now a refused slice is
halved down to one sample, so whatever real room returned is used at once.
"""

from __future__ import annotations

import shutil
import socket

from tests.test_card_faults import card, drive, fill, make_agent  # noqa: F401  (card: fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_commits_resume_into_partial_room(card):  # noqa: F811
    agent, _link = make_agent(card, _free_port(), sensors=4, batch=100, max_age_s=10.0)
    buf = agent.buffer
    drive(agent, 30, pause_s=0)  # committing normally
    fill(card / "filler")
    drive(agent, 600, pause_s=0)  # full: commits refused, samples held in memory
    held = len(agent._pending)
    refused = agent.stats.buffer_full
    assert refused > 0 and held > 1000, (refused, held)  # more than one old-sized slice waits
    with open(card / "filler", "r+b") as f:
        f.truncate(max(0, f.seek(0, 2) - 256 * 1024))
    last = buf.last_seq()
    free = shutil.disk_usage(card).free
    drive(agent, 10, pause_s=0)
    committed = buf.last_seq() - last
    print(f"[partial room] held={held} refused={refused} free_after_trim={free} "
          f"committed_within_10s={committed} health={agent.status()['health']}")
    assert committed > 0, f"no sample committed into {free} bytes of room"
    # The held backlog went in (room for it existed), not only the newest samples.
    assert committed >= held and len(agent._pending) < held
    buf.close()
