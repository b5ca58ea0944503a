"""A dead worker's messages come back by its heartbeat (issue 15 item 3): the mechanism, on a real Redis.

The messages are real Celery task messages, taken by a real kombu consumer in a process
that then dies holding them, so ``unacked`` holds exactly what a SIGKILLed worker leaves.
Whole workers killed mid-job are in tests/test_recovery_workers.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

from prewarm.fleet import dispatch, keys
from prewarm.fleet.nodes import NODE_TTL
from prewarm.fleet.recovery import WorkerInstance, prune, recover, restore

QUEUE = keys.node_queue("n1")

_TAKE = """
import sys, kombu
with kombu.Connection(sys.argv[1]) as conn:
    ch = conn.channel()
    for _ in range(int(sys.argv[3])):
        m = ch.basic_get(sys.argv[2], no_ack=False)
        if sys.argv[4] == "ack":
            m.ack()
        print(m.delivery_tag, flush=True)
    if sys.argv[4] != "ack":
        import os
        os._exit(0)  # dies holding the messages: no ack, no restore at shutdown
"""


@pytest.fixture()
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def _send(redis_url: str, count: int) -> None:
    app = dispatch.sender(redis_url)
    for span in range(count):
        app.send_task(dispatch.TASK_WARM_SPAN, kwargs={"job": "j", "node": "n1", "span": span}, queue=QUEUE)


def _take(redis_url: str, count: int, then: str = "die") -> list[str]:
    """Tags of ``count`` messages a consumer process took from the queue, then died holding (or acked)."""
    out = subprocess.run([sys.executable, "-c", _TAKE, redis_url, QUEUE, str(count), then],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return out.split()


def _span(raw: bytes) -> int:
    import base64

    message = json.loads(raw)
    return json.loads(base64.b64decode(message["body"]))[1]["span"]


def _age(r: redis.Redis, instance: WorkerInstance, seconds: float) -> None:
    """Make the instance's last beat ``seconds`` old, by Redis's clock (as if it stopped beating then)."""
    sec, usec = r.time()
    r.zadd(keys.WORKERS, {instance.id: sec + usec / 1e6 - seconds})


def test_a_dead_workers_messages_go_back_to_the_head_of_their_queue_once(r: redis.Redis, redis_url: str) -> None:
    # Given three task messages, two of them taken by a worker that then died holding them
    _send(redis_url, 3)
    dead = WorkerInstance(r, "n1")
    dead.register()
    tags = _take(redis_url, 2)
    for tag in tags:
        dead.hold(tag)
    assert r.llen(QUEUE) == 1 and r.hlen(keys.KOMBU_UNACKED) == 2
    # When its last beat is older than the TTL and a live worker beats
    _age(r, dead, NODE_TTL + 1)
    live = WorkerInstance(r, "n2")
    assert live.register() is None and live.beat() is True
    done = recover(r)
    # Then both messages are back at the head of n1's queue, marked redelivered, and unacked is empty
    assert [(d.instance, d.node, d.restored) for d in done] == [(dead.id, "n1", 2)]
    assert done[0].silent >= NODE_TTL
    assert r.llen(QUEUE) == 3 and r.hlen(keys.KOMBU_UNACKED) == 0 and r.zcard(keys.KOMBU_UNACKED_INDEX) == 0
    heads = [r.rpop(QUEUE), r.rpop(QUEUE)]  # kombu's consumer pops from the right
    assert sorted(_span(m) for m in heads) == [0, 1]
    assert all(json.loads(m)["headers"]["redelivered"] is True for m in heads)
    # And the dead instance is forgotten: nothing is restored twice, nobody is dead any more
    assert not r.exists(keys.worker_held(dead.id), keys.worker(dead.id))
    assert recover(r) == [] and live.beat() is False


def test_a_live_workers_messages_are_never_restored_however_old(r: redis.Redis, redis_url: str) -> None:
    # Given a worker holding a message it took long ago (a long span), still beating
    _send(redis_url, 1)
    busy = WorkerInstance(r, "n1")
    busy.register()
    (tag,) = _take(redis_url, 1)
    busy.hold(tag)
    r.zadd(keys.KOMBU_UNACKED_INDEX, {tag: 0})  # taken in 1970, as far as the index says
    # When another worker recovers, and the busy one beats again
    assert recover(r) == []
    assert busy.beat() is False
    # Then the message stays the busy worker's
    assert r.hexists(keys.KOMBU_UNACKED, tag) and r.llen(QUEUE) == 0
    assert r.smembers(keys.worker_held(busy.id)) == {tag.encode()}


def test_a_restarted_worker_of_the_same_node_keeps_its_own_messages(r: redis.Redis, redis_url: str) -> None:
    # Given node n1's first worker died holding one message, and its new worker holds another
    _send(redis_url, 2)
    old, new = WorkerInstance(r, "n1"), WorkerInstance(r, "n1")
    old.register()
    (old_tag,) = _take(redis_url, 1)
    old.hold(old_tag)
    new.register()
    (new_tag,) = _take(redis_url, 1)
    new.hold(new_tag)
    _age(r, old, NODE_TTL + 5)
    # When the new worker's beat finds the old one dead and recovers
    assert new.beat() is True
    assert [d.restored for d in recover(r)] == [1]
    # Then only the old worker's message went back; the new one's is still held
    assert r.llen(QUEUE) == 1 and _span(r.lindex(QUEUE, 0)) == 0
    assert r.hexists(keys.KOMBU_UNACKED, new_tag) and not r.hexists(keys.KOMBU_UNACKED, old_tag)


def test_acknowledged_messages_leave_the_held_set_at_the_next_beat(r: redis.Redis, redis_url: str) -> None:
    # Given a worker that took two messages and acknowledged them
    _send(redis_url, 2)
    w = WorkerInstance(r, "n1")
    w.register()
    for tag in _take(redis_url, 2, then="ack"):
        w.hold(tag)
    assert r.scard(keys.worker_held(w.id)) == 2
    # When it beats
    w.beat()
    # Then its held set is empty (it grows with the messages in hand, not with the past)
    assert r.scard(keys.worker_held(w.id)) == 0


def test_a_message_acknowledged_between_the_read_and_the_move_is_not_restored(
        r: redis.Redis, redis_url: str) -> None:
    from prewarm.fleet.recovery import _RESTORE

    _send(redis_url, 1)
    (tag,) = _take(redis_url, 1)
    read = r.hget(keys.KOMBU_UNACKED, tag)
    # When the message is acknowledged after the recovering worker read it
    r.hdel(keys.KOMBU_UNACKED, tag)
    # Then the move (compare and swap on the entry as read) does nothing
    assert r.eval(_RESTORE, 3, keys.KOMBU_UNACKED, keys.KOMBU_UNACKED_INDEX, QUEUE, tag, read, b"x") == 0
    assert r.llen(QUEUE) == 0
    # And a message already gone is not restored either
    assert restore(r, tag) is False and r.llen(QUEUE) == 0


def test_one_worker_recovers_while_another_holds_the_lock(r: redis.Redis, redis_url: str) -> None:
    _send(redis_url, 1)
    dead = WorkerInstance(r, "n1")
    dead.register()
    (tag,) = _take(redis_url, 1)
    dead.hold(tag)
    _age(r, dead, NODE_TTL + 1)
    # When another worker holds the recovery lock, this one restores nothing
    lock = r.lock(keys.RECOVERY_LOCK, timeout=10)
    assert lock.acquire(blocking=False)
    assert recover(r) == []
    assert r.hexists(keys.KOMBU_UNACKED, tag)
    # And once it is released, the next recovery does it
    lock.release()
    assert [d.restored for d in recover(r)] == [1]


def test_prune_forgets_long_dead_workers_and_puts_their_messages_back(r: redis.Redis, redis_url: str) -> None:
    # Given a worker dead for a day holding a message (no worker of the fleet ran since), and a live one
    _send(redis_url, 1)
    dead, live = WorkerInstance(r, "n1"), WorkerInstance(r, "n2")
    dead.register()
    live.register()
    (tag,) = _take(redis_url, 1)
    dead.hold(tag)
    _age(r, dead, 86400)
    # When records older than an hour are pruned, first as a dry run
    assert prune(r, 3600, dry_run=True) == [dead.id] and r.hexists(keys.KOMBU_UNACKED, tag)
    assert prune(r, 3600) == [dead.id]
    # Then its message is back in its queue and its records are gone; the live worker stays
    assert r.llen(QUEUE) == 1 and not r.hexists(keys.KOMBU_UNACKED, tag)
    assert not r.exists(keys.worker(dead.id), keys.worker_held(dead.id))
    assert r.zscore(keys.WORKERS, live.id) is not None and r.exists(keys.worker(live.id))
