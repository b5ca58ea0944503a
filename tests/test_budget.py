"""The registry budget's Lua scripts on a real Redis."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from prewarm.errors import ConfigError
from prewarm.fleet import keys
from prewarm.fleet.budget import RegistryBudget, get_budget, parse_size, set_budget
from tests.services import RedisServer


@pytest.fixture()
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def test_sizes_parse() -> None:
    assert parse_size("100MB") == 100_000_000
    assert parse_size("1.5GiB/s") == int(1.5 * (1 << 30))
    assert parse_size("4096") == 4096
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("fast")


def test_no_budget_means_no_waiting(r: redis.Redis) -> None:
    # Given no budget for the registry, and a sleep that records being called
    slept: list[float] = []
    budget = RegistryBudget(r, sleep=slept.append)
    # When many large requests go through
    for _ in range(50):
        with budget.request("reg:5000", 10 << 20):
            pass
    # Then nobody ever waited and no lease is left behind
    assert slept == []
    assert get_budget(r, "reg:5000") is None
    assert r.zcard(keys.BUDGET_INFLIGHT.format(registry="reg:5000")) == 0


def test_byte_rate_is_shared_and_held(r: redis.Redis) -> None:
    # Given 4 MB/s with a 1 MB burst, and four threads asking for 0.5 MB each, 24 times in all
    set_budget(r, "reg:1", rate=4e6, burst=1e6, concurrency=0)
    budget = RegistryBudget(r)
    granted: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(6):
            with budget.request("reg:1", 500_000), lock:
                granted.append(time.monotonic())

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    # Then 12 MB at 4 MB/s after a 1 MB burst takes about (12 - 1) / 4 = 2.75 s, not less
    assert len(granted) == 24
    assert elapsed >= 2.4


def test_concurrency_limit_is_never_exceeded(r: redis.Redis) -> None:
    set_budget(r, "reg:2", rate=0, burst=None, concurrency=2)
    budget = RegistryBudget(r)
    inflight, peak = 0, 0
    lock = threading.Lock()

    def client() -> None:
        nonlocal inflight, peak
        for _ in range(5):
            with budget.request("reg:2", 1):
                with lock:
                    inflight += 1
                    peak = max(peak, inflight)
                time.sleep(0.01)
                with lock:
                    inflight -= 1

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 2


def _script_and_block_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval", "blpop"))


def test_waiters_for_a_slot_block_in_redis_instead_of_polling(r: redis.Redis) -> None:
    # Given one concurrency slot and eight workers that each make three 0.2 s requests
    set_budget(r, "reg:4", rate=0, burst=None, concurrency=1)
    budget = RegistryBudget(r)
    served = []

    def client() -> None:
        for _ in range(3):
            with budget.request("reg:4", 1):
                served.append(1)
                time.sleep(0.2)

    before = _script_and_block_calls(r)
    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    calls = _script_and_block_calls(r) - before
    # Then all 24 were served one at a time...
    assert len(served) == 24 and elapsed >= 24 * 0.2 * 0.95
    # ...and the 7 waiting workers cost Redis calls per hand-over, not per 20 ms of waiting
    # (polling made ~7 x 4.8 s / 0.02 s = ~1,700 lease calls here)
    assert calls <= 24 * 6, calls


def test_a_429_makes_everyone_wait(r: redis.Redis) -> None:
    budget = RegistryBudget(r)
    budget.backoff("reg:3", 0.5)
    budget.backoff("reg:3", 0.1)  # a shorter back-off never shortens the longer one
    start = time.monotonic()
    with budget.request("reg:3", 1):
        pass
    assert time.monotonic() - start >= 0.4


def test_a_lease_is_returned_across_a_redis_restart(redis_server: RedisServer, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    set_budget(r, "reg:9", rate=0, burst=None, concurrency=1)
    inflight = keys.BUDGET_INFLIGHT.format(registry="reg:9")
    # Given a request holding the registry's only concurrency slot
    request = RegistryBudget(r).request("reg:9", 1000)
    request.__enter__()
    assert r.zcard(inflight) == 1
    # When Redis goes down before the request ends (its data persisted) and comes back later
    ending = threading.Thread(target=request.__exit__, args=(None, None, None))
    redis_server.stop()
    try:
        ending.start()
        time.sleep(1.0)
        waited = ending.is_alive()
    finally:
        redis_server.start()
    assert waited, "the lease must be returned once Redis is back, not left to expire"
    ending.join(30)
    # Then the lease was returned: the slot is free at once, not after LEASE_SECONDS
    assert not ending.is_alive()
    assert r.zcard(inflight) == 0


def test_byte_requests_are_served_in_the_order_they_ask(r: redis.Redis) -> None:
    # Given 1 MB/s with a 0.5 MB burst, nearly used up
    set_budget(r, "reg:fifo", rate=1e6, burst=5e5, concurrency=0)
    first = RegistryBudget(r, sleep=lambda s: None)
    first.take("reg:fifo", 450_000)
    # When a large request asks first (it cannot go yet) and small ones ask after it
    large: list[float] = []
    RegistryBudget(r, sleep=large.append).take("reg:fifo", 2_000_000)
    small: list[float] = []
    for _ in range(3):
        RegistryBudget(r, sleep=small.append).take("reg:fifo", 10_000)
    # Then the large one booked its turn at once (one wait, no polling), and each small one
    # waits behind it instead of taking the tokens that refill in the meantime
    assert len(large) == 1 and 0.3 < large[0] < 0.6
    assert len(small) == 3
    assert all(wait > large[0] + 1.5 for wait in small)
    assert small == sorted(small)
