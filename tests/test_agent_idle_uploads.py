"""The agent does not look for batches to upload while everything sealed is in flight (issue #18).

Each tick used to ask the buffer twice (newest and oldest unsent batches): two SQLite queries
a second for a batch sealed once a minute. Now it asks again only after a seal, an ack, a
failed publish, a new connection or the end of a resync hold; what is sent must not change.
"""

from __future__ import annotations

from tests.test_agent import make


def _count_queries(agent) -> list[str]:
    calls: list[str] = []
    for name in ("newest", "pending"):
        real = getattr(agent.buffer, name)

        def counted(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        setattr(agent.buffer, name, counted)
    return calls


def test_idle_ticks_do_not_query_and_new_batches_still_go_at_once(tmp_path):
    agent, clock, link, timer = make(tmp_path, batch={"max_samples": 10})
    calls = _count_queries(agent)
    agent.run(duration_s=12)  # one batch of 10 sealed and sent; two samples wait
    assert len(link.published) == 1
    calls.clear()
    agent.run(duration_s=5)  # nothing new sealed: the batch is in flight, nothing else to send
    assert calls == []
    for _ in range(20):  # the tick that seals the second batch sends it
        agent.tick()
        if agent.stats.sealed_batches == 2:
            break
        clock.sleep(1.0)
    assert agent.stats.sealed_batches == 2 and len(link.published) == 2
    assert calls.count("pending") == 1
    # An ack frees room; nothing new to send, so one look and then quiet again.
    link.ack(link.published[0][0])
    calls.clear()
    agent.run(duration_s=3)
    assert calls.count("pending") == 1 and agent.stats.acked_batches == 1


def test_a_failed_publish_is_retried_on_the_next_tick(tmp_path):
    agent, clock, link, timer = make(tmp_path, batch={"max_samples": 10})
    link.connected = False
    agent.run(duration_s=12)
    assert link.published == []
    link.connected = True
    agent.run(duration_s=1)
    assert len(link.published) == 1  # not left behind until the next seal
