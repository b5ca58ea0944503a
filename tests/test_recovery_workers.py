"""Whole workers killed mid-span (issue 15 item 3): their tasks come back by the heartbeat, not the 900 s timeout.

Real ``prewarm worker`` processes on a real Redis, with the shipped defaults (visibility
timeout 900 s, NODE_TTL, HEARTBEAT_INTERVAL); nothing is shortened.  Span downloads go
through a FaultProxy that slows them, so the kill lands while tasks are in flight.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from prewarm.fleet import keys
from prewarm.fleet.nodes import HEARTBEAT_INTERVAL, NODE_TTL
from prewarm.imagebuild import BuiltImage
from tests.faultproxy import Fault, FaultProxy
from tests.images import odd_image
from tests.pipeline_helpers import Worker, clean_env, prewarm, push, start_worker, wait_job
from tests.services import Registry
from tests.test_fleet_faults import assert_layers_ready, image_manifest
from workers.app import DEFAULT_VISIBILITY_TIMEOUT

SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20)}
REPO = "fleet/recovery"


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> BuiltImage:
    """The odd image pushed with its SOCI index, so the jobs fetch spans only."""
    image = odd_image(tmp_path_factory.mktemp("odd-recovery-oci"))
    ref = push(image, registry, REPO)
    env = clean_env(tmp_path_factory.mktemp("indexer"), PREWARM_INSECURE_REGISTRIES=registry.host, **SPANS)
    prewarm("index", ref, "--push", env=env, check=True)
    return image


def node_env(tmp: Path, node: str, redis_url: str, proxy: FaultProxy, registry: Registry) -> dict[str, str]:
    # No PREWARM_VISIBILITY_TIMEOUT: the shipped 900 s
    return clean_env(tmp / f"store-{node}", PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME=node,
                     PREWARM_INSECURE_REGISTRIES=f"{proxy.host},{registry.host}", **SPANS)


def instance_of(r: redis.Redis, worker: Worker) -> str:
    """The worker instance id the ``prewarm worker`` process registered (its pid is in the record)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for raw in r.zrange(keys.WORKERS, 0, -1):
            if r.hget(keys.worker(raw.decode()), "pid") == str(worker.proc.pid).encode():
                return raw.decode()
        time.sleep(0.1)
    raise AssertionError(f"worker pid {worker.proc.pid} registered no instance: {worker.log.read_text()[-2000:]}")


def unacked_held(r: redis.Redis, instance: str) -> set[bytes]:
    """The messages the instance holds that kombu still has as unacknowledged."""
    return {t for t in r.smembers(keys.worker_held(instance)) if r.hexists(keys.KOMBU_UNACKED, t)}


def wait_until(what: str, predicate, timeout: float) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not within {timeout:.0f}s")
        time.sleep(0.2)
    return time.monotonic()


def test_a_sigkilled_nodes_tasks_are_back_within_a_minute_and_the_job_completes(
        tmp_path: Path, registry: Registry, redis_url: str, odd: BuiltImage) -> None:
    r = redis.Redis.from_url(redis_url)
    with FaultProxy(registry.host) as proxy:
        envs = {n: node_env(tmp_path, n, redis_url, proxy, registry) for n in ("n1", "n2")}
        ref = f"{proxy.host}/{REPO}:{odd.tag}"
        # Given every span download takes 3 s, and two nodes with a worker each
        proxy.add(Fault("slow", path="/blobs/", method="GET", stall=3.0))
        workers = {n: start_worker(envs[n], tmp_path / f"{n}.log", "-c", "2") for n in envs}
        try:
            victim = instance_of(r, workers["n2"])
            job = prewarm("schedule", ref, "--node", "n1", "--node", "n2", env=envs["n1"], check=True).stdout.strip()
            # When n2's worker, every process of it, is SIGKILLed while it holds span tasks
            wait_until("n2 holding tasks", lambda: unacked_held(r, victim), 60)
            time.sleep(1.0)
            lost = unacked_held(r, victim)
            workers["n2"].kill()
            killed = time.monotonic()
            assert lost
            # Then the live node puts them back in n2's queue within about a minute, the 900 s timeout unused
            restored = wait_until("n2's tasks restored",
                                  lambda: not any(r.hexists(keys.KOMBU_UNACKED, t) for t in lost), 90)
            recovery = restored - killed
            assert recovery < NODE_TTL + 3 * HEARTBEAT_INTERVAL + 5, recovery
            assert r.llen(keys.node_queue("n2")) >= len(lost)
            assert "back in their queue" in workers["n1"].log.read_text()
            # And once n2's worker is started again, the job completes well before the visibility timeout
            proxy.clear()
            workers["n2"] = start_worker(envs["n2"], tmp_path / "n2-again.log", "-c", "2")
            final = wait_job(job, envs["n1"], timeout=180)
            total = time.monotonic() - killed
        finally:
            for w in workers.values():
                w.stop()
    print(f"\nrecovery after SIGKILL with shipped defaults: tasks back in {recovery:.1f}s "
          f"(NODE_TTL {NODE_TTL:.0f}s, heartbeat {HEARTBEAT_INTERVAL:.0f}s); job done {total:.1f}s after the kill")
    assert final["state"] == "succeeded", final
    assert total < DEFAULT_VISIBILITY_TIMEOUT / 4, total
    for env in envs.values():
        assert_layers_ready(odd, env)


def test_a_long_healthy_task_is_never_restored_while_a_dead_worker_of_its_node_is(
        tmp_path: Path, registry: Registry, redis_url: str, odd: BuiltImage) -> None:
    r = redis.Redis.from_url(redis_url)
    big = max(image_manifest(odd)["layers"], key=lambda layer: layer["size"])["digest"]
    slow_for = NODE_TTL + 4 * HEARTBEAT_INTERVAL  # outlasts the moment the dead worker's tasks come back
    with FaultProxy(registry.host) as proxy:
        env = node_env(tmp_path, "n1", redis_url, proxy, registry)
        ref = f"{proxy.host}/{REPO}:{odd.tag}"
        # Given the first two span downloads of the big layer trickle for 50 s, and node n1 runs two
        # workers of one process each, so each takes one of them
        slow = proxy.add(Fault("slow", path=big, method="GET", first=2, stall=slow_for))
        keeper = start_worker(env, tmp_path / "keeper.log", "-c", "1", "--hostname", "keeper@n1")
        victim = start_worker(env, tmp_path / "victim.log", "-c", "1", "--hostname", "victim@n1")
        workers = [keeper, victim]
        try:
            kept, dead = instance_of(r, keeper), instance_of(r, victim)
            job = prewarm("schedule", ref, "--node", "n1", env=env, check=True).stdout.strip()
            wait_until("both slow downloads started", lambda: slow.applied == 2, 60)
            started = time.monotonic()
            wait_until("both workers holding tasks", lambda: unacked_held(r, kept) and unacked_held(r, dead), 30)
            long_task, lost = unacked_held(r, kept), unacked_held(r, dead)
            long_ids, lost_ids = task_ids(r, long_task), task_ids(r, lost)
            # When one worker of the node is SIGKILLed mid-download, the other still in its long one
            victim.kill()
            restored = wait_until("the dead worker's tasks restored",
                                  lambda: not any(r.hexists(keys.KOMBU_UNACKED, t) for t in lost), 90)
            # Then the dead worker's tasks came back while the long task still ran, and it was not touched
            assert restored - started < slow_for - 2, (restored - started, slow_for)
            while time.monotonic() - started < slow_for - 2:
                assert all(r.hexists(keys.KOMBU_UNACKED, t) for t in long_task), "a live task was restored"
                time.sleep(0.5)
            final = wait_job(job, env, timeout=180)
        finally:
            for w in workers:
                w.stop()
    assert final["state"] == "succeeded", final
    assert_layers_ready(odd, env)
    # And the long task was received once, the dead worker's tasks a second time, by the keeper
    log = keeper.log.read_text()
    assert all(log.count(f"[{i}] received") == 1 for i in long_ids), long_ids
    assert all(log.count(f"[{i}] received") == 1 for i in lost_ids), lost_ids
    assert "back in their queue" in log


def task_ids(r: redis.Redis, tags: set[bytes]) -> list[str]:
    """Celery task ids of unacknowledged messages (kombu's entry: [message, exchange, routing key])."""
    import json

    return [json.loads(r.hget(keys.KOMBU_UNACKED, t))[0]["headers"]["id"] for t in tags]
