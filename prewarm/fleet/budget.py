"""The fleet's registry budget, held in Redis so every worker of every node shares it.

Per registry host an operator may set (``prewarm budget HOST ...``):

* a byte rate: a token bucket refilled at ``rate`` bytes/s up to ``burst`` bytes.  A
  request takes its bytes from the bucket; a large one may drive it negative, which
  makes the next requests wait, so the long-run rate is the budget whatever the span size.
  Requests are served in the order they ask (each books its turn, see
  :meth:`RegistryBudget.take`), so no node starves behind others' smaller requests;
* a concurrency limit: leases in a sorted set, scored by expiry, so a worker killed while
  holding one does not leak it beyond the lease time.  A request that finds every slot
  taken blocks on a wake-up list (``BLPOP``) that each returned lease pushes to, instead
  of polling: at 1,000 nodes of ten processes, polling every 20 ms was ~500,000 script
  calls a second; blocked waiters cost nothing until a slot frees (or
  :data:`WAKE_TIMEOUT` passes, which bounds the wait for a lease that expired instead);
* a fleet-wide back-off: when the registry answers 429, the worker that got it sets a key
  that expires after ``Retry-After``, and every worker waits it out before its next request.

All three are Lua scripts: atomic, one round trip, with Redis's own clock (``TIME``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import Iterator
from typing import cast

import redis

from prewarm.errors import ConfigError
from prewarm.fleet import keys

#: How long a concurrency lease lasts if its holder never returns it (seconds).
LEASE_SECONDS = 120.0
#: Longest a request blocks on the wake-up list before it tries for a lease again: the
#: bound on waiting for a slot whose holder died (its lease expires, nobody pushes).
#: Below the Redis clients' read timeout, so a blocked read is never taken for a dead server.
WAKE_TIMEOUT = 2.0
#: Longest wait a byte request books ahead (seconds); a request further back in line asks
#: again later, so a crowd of waiters cannot book the registry far beyond their leases.
RESERVE_HORIZON = 30.0

_TAKE = """
local cfg = redis.call('HMGET', KEYS[1], 'rate', 'burst')
local rate = tonumber(cfg[1])
if not rate or rate <= 0 then return '0' end
local burst = tonumber(cfg[2]) or rate
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or burst)
local ts = tonumber(redis.call('HGET', KEYS[1], 'ts') or now)
tokens = math.min(burst, tokens + (now - ts) * rate)
local want = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
local need = math.min(want, burst)
local wait = 0
if tokens < need then wait = (need - tokens) / rate end
if wait <= horizon then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - want), 'ts', tostring(now))
  return 'R' .. tostring(wait)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
return tostring(wait - horizon)
"""

_LEASE = """
local limit = tonumber(redis.call('HGET', KEYS[1], 'concurrency') or '0')
if limit <= 0 then return 1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) < limit then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
"""


_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local limit = tonumber(redis.call('HGET', KEYS[3], 'concurrency') or '0')
if limit > 0 then
  redis.call('LPUSH', KEYS[2], '1')
  redis.call('LTRIM', KEYS[2], 0, limit - 1)
  redis.call('PEXPIRE', KEYS[2], 60000)
end
return 1
"""


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    rate: float  # bytes per second, 0 = unlimited
    burst: float
    concurrency: int  # 0 = unlimited


def parse_size(text: str) -> int:
    """``100MB``, ``1.5GiB``, ``4096`` -> bytes."""
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
             "g": 10**9, "gb": 10**9, "gib": 1 << 30}
    raw = text.strip().lower().removesuffix("/s")
    num = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(num):].strip()
    try:
        value = float(num)
    except ValueError:
        raise ConfigError(f"{text!r} is not a size (e.g. 100MB, 1GiB, 4096)") from None
    if unit not in units or value < 0:
        raise ConfigError(f"{text!r} is not a size (e.g. 100MB, 1GiB, 4096)")
    return int(value * units[unit])


def set_budget(r: redis.Redis, registry: str, *, rate: float, burst: float | None, concurrency: int) -> None:
    burst = burst if burst else max(rate, 8 << 20)
    r.hset(keys.BUDGET.format(registry=registry),
           mapping={"rate": rate, "burst": burst, "concurrency": concurrency})
    r.hdel(keys.BUDGET.format(registry=registry), "tokens", "ts")


def clear_budget(r: redis.Redis, registry: str) -> None:
    r.delete(keys.BUDGET.format(registry=registry), keys.BUDGET_INFLIGHT.format(registry=registry),
             keys.BUDGET_BACKOFF.format(registry=registry), keys.BUDGET_WAKE.format(registry=registry))


def get_budget(r: redis.Redis, registry: str) -> BudgetConfig | None:
    h = r.hgetall(keys.BUDGET.format(registry=registry))
    if not h:
        return None
    h = {k.decode(): v.decode() for k, v in h.items()}
    return BudgetConfig(float(h.get("rate", 0)), float(h.get("burst", 0)), int(float(h.get("concurrency", 0))))


class RegistryBudget:
    """Client side of the budget, used by workers around every registry request."""

    def __init__(self, r: redis.Redis, *, sleep=time.sleep, wake_timeout: float = WAKE_TIMEOUT) -> None:  # type: ignore[no-untyped-def]
        self.r = r
        self._take = r.register_script(_TAKE)
        self._lease = r.register_script(_LEASE)
        self._return = r.register_script(_RELEASE)
        self._sleep = sleep
        self._wake_timeout = wake_timeout

    def backoff(self, registry: str, seconds: float) -> None:
        """The registry said 429: make the whole fleet wait ``seconds`` before asking it again."""
        ms = max(1, int(seconds * 1000))
        key = keys.BUDGET_BACKOFF.format(registry=registry)
        # Only ever extend a back-off, never shorten one another worker set.
        current = cast(int, self.r.pttl(key))
        if current < ms:
            self.r.set(key, "1", px=ms)

    def _wait_backoff(self, registry: str) -> None:
        while True:
            ttl = cast(int, self.r.pttl(keys.BUDGET_BACKOFF.format(registry=registry)))
            if ttl <= 0:
                return
            self._sleep(ttl / 1000)

    def take(self, registry: str, nbytes: int) -> None:
        """Wait until ``nbytes`` of the byte budget are available, and take them.

        The bytes are reserved first come, first served: a request whose turn comes
        within :data:`RESERVE_HORIZON` books its bytes at once (driving the bucket into
        debt) and sleeps until its turn, so every later request waits behind it.  Why:
        when requests instead polled for tokens, whoever asked right after a refill won,
        and a node asking for a large group could starve for many seconds while the
        others' smaller requests went by (the fleet bench saw one node wait 16 s for one
        2 MiB group, and the whole job wait for that node).
        """
        if nbytes <= 0:
            return
        k_cfg = keys.BUDGET.format(registry=registry)
        while True:
            answer = self._take(keys=[k_cfg], args=[nbytes, RESERVE_HORIZON])
            answer = answer.decode() if isinstance(answer, bytes) else str(answer)
            if answer.startswith("R"):
                wait = float(answer[1:])
                if wait > 0:
                    self._sleep(wait)
                return
            wait = float(answer)
            if wait <= 0:
                return
            self._sleep(min(wait, 1.0))

    @contextlib.contextmanager
    def request(self, registry: str, nbytes: int) -> Iterator[None]:
        """Hold a concurrency lease and ``nbytes`` of byte budget for one request."""
        k_cfg = keys.BUDGET.format(registry=registry)
        # One round trip when the registry has no budget and no back-off (the embedded
        # case, and most registries): a span costs one Redis call here, not five.
        pipe = self.r.pipeline(transaction=False)
        pipe.pttl(keys.BUDGET_BACKOFF.format(registry=registry))
        pipe.hmget(k_cfg, ["rate", "concurrency"])
        ttl, (rate, concurrency) = pipe.execute()
        if int(ttl) <= 0 and not _positive(rate) and not _positive(concurrency):
            yield
            return
        self._wait_backoff(registry)
        lease = uuid.uuid4().hex
        k_inflight = keys.BUDGET_INFLIGHT.format(registry=registry)
        k_wake = keys.BUDGET_WAKE.format(registry=registry)
        while not int(self._lease(keys=[k_cfg, k_inflight], args=[lease, LEASE_SECONDS])):
            # Every slot is taken: sleep in Redis until a holder returns one.
            self.r.blpop([k_wake], timeout=self._wake_timeout)
        try:
            self.take(registry, nbytes)
            # A 429 seen by another worker while this one waited for its lease or bytes.
            self._wait_backoff(registry)
            yield
        finally:
            self._release(k_cfg, k_inflight, k_wake, lease)

    def _release(self, k_cfg: str, k_inflight: str, k_wake: str, lease: str) -> None:
        """Return a lease, waiting out a Redis restart to do so.

        Why: a lease left behind holds one of the fleet's concurrency slots until it
        expires (LEASE_SECONDS); after a Redis restart every in-flight request's lease
        would be left so, and the whole fleet would wait minutes for slots nobody holds.
        """
        deadline = time.monotonic() + LEASE_SECONDS
        while True:
            try:
                self._return(keys=[k_inflight, k_wake, k_cfg], args=[lease])
                return
            except redis.exceptions.ConnectionError:  # BusyLoadingError too: Redis restarting
                if time.monotonic() > deadline:
                    raise
                self._sleep(0.2)


def _positive(value: bytes | None) -> bool:
    try:
        return value is not None and float(value) > 0
    except ValueError:
        return True  # unreadable: take the full path, which reads it as the scripts do
