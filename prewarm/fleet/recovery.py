"""A dead worker's tasks go back to their queue within about a minute of its last heartbeat.

Why not the visibility timeout: kombu's Redis transport keeps every message a worker took
and has not acknowledged in its ``unacked`` hash, and hands it out again once it is older
than the visibility timeout.  That timeout must outlast the slowest healthy task (a whole
multi-gigabyte layer), so it is 900 s, and a SIGKILLed worker's spans waited a quarter of an
hour.  A heartbeat tells the two cases apart at once: a healthy worker beats however long its
task runs, a dead one does not.

Terms:

* A *worker instance* is one ``prewarm worker`` process, the Celery consumer that takes its
  node's messages, under a random id made when it starts.  A node may run several, and a
  worker started again (a crash, a new pod) is a new instance under the same node name, so
  the restarted worker's own tasks are never mistaken for the dead one's.
* Its *held set* (:data:`keys.WORKER_HELD`) holds the delivery tags of the messages it took.
  A tag is added when Celery receives the message (``workers.app.track_deliveries``), after
  kombu recorded it in ``unacked`` and before the task runs; each beat drops the tags kombu
  no longer has in ``unacked`` (acknowledged).  Tasks waiting for their ETA (a retry's
  countdown) are held too, and stay held while their worker lives.
* An instance is *alive* while its last beat is younger than
  :data:`~prewarm.fleet.nodes.NODE_TTL`.  Beats are scored with Redis's own clock (``TIME``),
  so no two hosts' clocks are ever compared.

Lifecycle, each step one script or pipeline:

    register()   before Celery takes a message: the instance's record and first beat
    hold(tag)    per message taken, in the worker's main process
    beat()       every HEARTBEAT_INTERVAL: refresh the score, drop acknowledged tags, and
                 say whether any instance is dead (O(log n) in the number of instances)
    recover()    only then: the live worker that takes RECOVERY_LOCK moves each dead
                 instance's messages still in ``unacked`` back to the head of their queue,
                 marked redelivered as kombu's own restore marks them, and forgets it

Guarantees:

* A live instance's messages are never restored, however long its tasks run.
* A dead instance's messages are back in their queue within NODE_TTL + HEARTBEAT_INTERVAL of
  its last beat (about 35 s with the shipped defaults) while any worker of the fleet lives;
  otherwise at the first beats of the next one to start.  They go to the dead worker's own
  node queue, since the store they fill is that node's.
* A message is restored at most once: leaving ``unacked`` and entering the queue is one
  script that first checks the message is still the one read (compare and swap), so an
  acknowledgement or kombu's own restore in between makes it a no-op.
* A worker cut off from Redis for longer than NODE_TTL is judged dead though it runs on: its
  tasks may then run twice, which is safe (a task is idempotent by layer digest and span).
* Left to the visibility timeout: a message kombu recorded in ``unacked`` whose worker died
  in the moment before adding it to its held set, and messages sent through a named
  exchange (prewarm sends every task to a queue by name).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import uuid
from bisect import bisect

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel
from kombu.utils.json import dumps, loads

from prewarm.fleet import keys
from prewarm.fleet.nodes import NODE_TTL

log = logging.getLogger(__name__)

#: Seconds the recovery lock lasts if the worker holding it dies mid-way; the next one
#: starts over, which is safe since a restored message is no longer in ``unacked``.
RECOVERY_LOCK_TIMEOUT = 60.0
#: Dead instances handled per recovery (more wait for the next beat).
RECOVERY_BATCH = 100

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: workers, held, unacked; ARGV: instance, ttl
_BEAT = _NOW + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('HEXISTS', KEYS[3], tag) == 0 then redis.call('SREM', KEYS[2], tag) end
end
return #redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 1)
"""

# KEYS: workers; ARGV: ttl, limit -> [instance, seconds since its last beat, ...]
_DEAD = _NOW + """
local out = {}
local found = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]),
                         'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #found, 2 do
  out[#out + 1] = found[i]
  out[#out + 1] = tostring(now - tonumber(found[i + 1]))
end
return out
"""

# KEYS: workers, held, worker record; ARGV: instance, ttl.  Not if it beat again meanwhile.
_FORGET = _NOW + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) >= now - tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""

# KEYS: unacked, unacked_index, queue; ARGV: tag, the entry as read, the message to queue
_RESTORE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[3])
return 1
"""


@dataclasses.dataclass(frozen=True)
class Recovered:
    """One dead worker instance whose messages went back to their queues."""

    instance: str
    node: str
    #: seconds between its last beat and the recovery
    silent: float
    restored: int


class WorkerInstance:
    """This ``prewarm worker`` process as the fleet sees it: its id, held messages and beats."""

    def __init__(self, r: redis.Redis, node: str, instance: str | None = None) -> None:
        self.r, self.node = r, node
        self.id = instance or uuid.uuid4().hex
        self._beat = r.register_script(_BEAT)  # EVALSHA: the script's text is not sent every beat

    def register(self) -> None:
        """Record the instance and beat once; called before Celery takes any message.

        Its records carry no expiry (a beat refreshes nothing but its score): a dead
        instance's are deleted by :func:`recover`, or by :func:`prune` if no worker of the
        fleet ever runs again.
        """
        self.r.hset(keys.worker(self.id), mapping={"node": self.node, "host": socket.gethostname(),
                                                   "pid": os.getpid(), "started": time.time()})
        self.beat()

    def hold(self, tag: str) -> None:
        """The worker took the message ``tag`` (kombu's delivery tag); called before it runs."""
        self.r.sadd(keys.worker_held(self.id), tag)

    def beat(self) -> bool:
        """Refresh the instance's beat; True if some instance of the fleet is dead."""
        return bool(self._beat(keys=[keys.WORKERS, keys.worker_held(self.id), keys.KOMBU_UNACKED],
                               args=[self.id, NODE_TTL]))


def recover(r: redis.Redis, ttl: float = NODE_TTL) -> list[Recovered]:
    """Put the messages of every dead worker instance back in their queues, once for the fleet.

    Returns what was recovered; nothing when another worker holds the lock, which then
    does it.
    """
    lock = r.lock(keys.RECOVERY_LOCK, timeout=RECOVERY_LOCK_TIMEOUT, blocking=False)
    if not lock.acquire(blocking=False):
        return []
    out = []
    try:
        found = r.eval(_DEAD, 1, keys.WORKERS, ttl, RECOVERY_BATCH)
        for raw_id, raw_silent in zip(found[::2], found[1::2]):
            instance = _s(raw_id)
            node = _s(r.hget(keys.worker(instance), "node")) or "?"
            restored = sum(restore(r, _s(tag)) for tag in r.smembers(keys.worker_held(instance)))
            if r.eval(_FORGET, 3, keys.WORKERS, keys.worker_held(instance), keys.worker(instance), instance, ttl):
                done = Recovered(instance, node, float(_s(raw_silent)), restored)
                out.append(done)
                if restored:
                    log.warning("worker %s of node %s stopped beating %.0f s ago: %d task(s) it held are back "
                                "in their queue", instance, node, done.silent, restored)
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:  # it expired meanwhile: another worker may hold it now
            pass
    return out


def prune(r: redis.Redis, older_than: float, *, dry_run: bool = False) -> list[str]:
    """Forget worker instances silent for ``older_than`` seconds, restoring their messages first.

    :func:`recover` does this at the next beat of any live worker; ``prewarm prune`` calls
    it for a fleet none of whose workers runs any more.  Returns the instances removed.
    """
    found = r.eval(_DEAD, 1, keys.WORKERS, max(older_than, NODE_TTL), 1_000_000)
    gone = [_s(i) for i in found[::2]]
    if not dry_run:
        for instance in gone:
            for tag in r.smembers(keys.worker_held(instance)):
                restore(r, _s(tag))
            r.eval(_FORGET, 3, keys.WORKERS, keys.worker_held(instance), keys.worker(instance), instance,
                   max(older_than, NODE_TTL))
    return gone


def restore(r: redis.Redis, tag: str) -> bool:
    """Move the unacknowledged message ``tag`` back to the head of its queue; False if it is gone.

    The same move as kombu's ``QoS.restore_by_tag`` (which marks it redelivered and pushes
    it where the consumer pops next), made atomic by a compare and swap instead of WATCH.
    """
    raw = r.hget(keys.KOMBU_UNACKED, tag)
    if raw is None:
        return False
    try:
        payload, exchange, routing_key = loads(_s(raw))
    except (ValueError, TypeError):
        log.warning("unacknowledged message %s is not kombu's [message, exchange, routing key]; "
                    "left to the visibility timeout", tag)
        return False
    if exchange or not routing_key:
        log.warning("unacknowledged message %s went through exchange %r; left to the visibility timeout",
                    tag, exchange)
        return False
    if isinstance(payload.get("headers"), dict):
        payload["headers"]["redelivered"] = True
    info = payload.get("properties", {}).get("delivery_info")
    if isinstance(info, dict):
        info["redelivered"] = True
    queue = _queue_for_priority(routing_key, payload)
    return bool(r.eval(_RESTORE, 3, keys.KOMBU_UNACKED, keys.KOMBU_UNACKED_INDEX, queue, tag, raw, dumps(payload)))


def _queue_for_priority(queue: str, payload: dict) -> str:  # type: ignore[type-arg]
    """The Redis list kombu keeps ``queue``'s messages of this priority in (``Channel._q_for_pri``)."""
    try:
        pri = max(0, min(int(payload["properties"]["priority"]), PRIORITY_STEPS[-1]))
    except (KeyError, TypeError, ValueError):
        pri = 0
    step = PRIORITY_STEPS[bisect(PRIORITY_STEPS, pri) - 1]
    return f"{queue}{Channel.sep}{step}" if step else queue


def _s(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")
