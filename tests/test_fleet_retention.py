"""Node liveness, heartbeat cost and retention (issue 15 items 3 and 4), on a real Redis.

A "node" that is down is a registration whose heartbeat stopped, which is what an operator
meets when a node died; ``prewarm`` runs as a user runs it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from prewarm.fleet import jobs, keys
from prewarm.fleet.nodes import Heartbeat, heartbeat
from prewarm.fleet.recovery import WorkerInstance
from tests.images import simple_image
from tests.pipeline_helpers import clean_env, prewarm, push
from tests.services import Registry
from tests.test_jobs import _plan

SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20)}


class _Counting(redis.Connection):
    """A real connection that counts round trips and the bytes it sends."""

    sends = 0
    sent = 0

    def send_packed_command(self, command, check_health=True):  # type: ignore[no-untyped-def]
        type(self).sends += 1
        type(self).sent += sum(len(c) for c in command) if isinstance(command, list) else len(command)
        return super().send_packed_command(command, check_health)


@pytest.fixture()
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def _counting(redis_url: str) -> redis.Redis:
    return redis.Redis(connection_pool=redis.ConnectionPool.from_url(redis_url, connection_class=_Counting))


def _register(r: redis.Redis, name: str, tmp: Path, age: float = 0.0, labels: dict[str, str] | None = None) -> None:
    heartbeat(r, name, labels=labels or {}, root=tmp, layers=frozenset())
    if age:
        r.hset(keys.node(name), "heartbeat", time.time() - age)


def _digests(n: int) -> frozenset[str]:
    return frozenset(f"sha256:{i:064x}" for i in range(n))


def test_a_heartbeat_costs_the_same_whatever_the_node_holds(redis_url: str, tmp_path: Path) -> None:
    r = _counting(redis_url)
    cost = {}
    for held in (10, 20_000):
        # Given a worker's heartbeat on a node holding `held` layers from past jobs
        layers = _digests(held)
        beat = Heartbeat(r, f"node{held}", {"pool": "gpu"}, tmp_path, lambda layers=layers: layers,
                         instance=WorkerInstance(r, f"node{held}"))
        beat.instance.register()  # type: ignore[union-attr]
        beat.beat()  # the first beat sends the layer set
        assert len(json.loads(r.hget(keys.node(f"node{held}"), "layers"))) == held
        # When it beats again with nothing changed
        _Counting.sends = _Counting.sent = 0
        beat.beat()
        cost[held] = (_Counting.sends, _Counting.sent)
    # Then a beat is the same round trips and (but for the name's length) the same bytes
    assert cost[10][0] == cost[20_000][0] == 2, cost
    assert abs(cost[10][1] - cost[20_000][1]) < 16, cost


def test_the_layer_set_is_sent_when_it_changes_or_redis_lost_it(r: redis.Redis, tmp_path: Path) -> None:
    held = {"sha256:" + "a" * 64}
    beat = Heartbeat(r, "n1", {}, tmp_path, lambda: frozenset(held))
    beat.beat()
    # When the node gains a layer, the next beat records it
    held.add("sha256:" + "b" * 64)
    beat.beat()
    assert set(json.loads(r.hget(keys.node("n1"), "layers"))) == held
    # When Redis lost the record (a restart without persistence), the next beat writes it whole
    r.delete(keys.node("n1"))
    beat.beat()
    assert set(json.loads(r.hget(keys.node("n1"), "layers"))) == held


def test_a_workers_checks_at_each_beat_cost_the_same_round_trips_for_few_and_many_jobs(redis_url: str) -> None:
    r = _counting(redis_url)
    trips = {}
    for n in (2, 60):
        redis.Redis.from_url(redis_url).flushall()
        for i in range(n):
            jobs.create_job(r, _plan(), ["a"], window=2, image=f"i{i}", keep={} if i % 2 else None)
        _Counting.sends = 0
        assert len(jobs.unstarted_jobs(r, "a")) == n
        assert len(jobs.standing_jobs_for(r, {})) == n // 2
        assert jobs.stalled_jobs(r, "a", 0) == []
        trips[n] = _Counting.sends
    assert trips[2] == trips[60] == 6, trips


def test_all_nodes_skips_a_down_node_and_says_so_and_nodes_shows_it_down(
        tmp_path: Path, registry: Registry, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    ref = push(simple_image(tmp_path / "oci"), registry, "retention/allnodes")
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                    **SPANS)
    # Given one node that beats and one whose heartbeat stopped two minutes ago
    _register(r, "alive", tmp_path)
    _register(r, "gone", tmp_path, age=120)
    # When a job is scheduled on every node
    proc = prewarm("schedule", ref, "--all-nodes", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    # Then the down node is skipped, and the launch says so, naming it
    assert "skipping" in proc.stderr and "gone" in proc.stderr, proc.stderr
    assert {m.decode() for m in r.smembers(keys.job_nodes(job))} == {"alive"}
    # And `prewarm nodes` shows it down
    listed = {n["name"]: n for n in json.loads(prewarm("nodes", "--json", env=env, check=True).stdout)}
    assert listed["gone"]["up"] is False and listed["alive"]["up"] is True
    table = prewarm("nodes", env=env, check=True).stdout
    assert any(line.split()[:2] == ["gone", "down"] for line in table.splitlines()), table


def test_a_cancelled_job_expires_like_a_finished_one(r: redis.Redis) -> None:
    job = jobs.create_job(r, _plan(), ["a"], window=2, image="x")
    jobs.record_span(r, job, "a", 0, 0, 10)
    jobs.cancel_job(r, job)
    # A task that was in flight at the cancel ends afterwards and writes new keys
    jobs.record_span(r, job, "a", 1, 0, 10)
    jobs.record_layer(r, job, "a", 1, jobs.LAYER_FAILED, "boom")
    job_keys = r.keys(f"prewarm:job:{job}*")
    assert len(job_keys) >= 6
    assert all(0 < r.ttl(k) <= jobs.JOB_RETENTION for k in job_keys), {k: r.ttl(k) for k in job_keys}


def test_prune_removes_old_jobs_that_are_over_and_silent_nodes_only(
        r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url)
    plan = _plan()
    # Given, eight days ago: a finished job, an abandoned one, a standing schedule; and a job of today
    done = jobs.create_job(r, plan, ["a"], window=2, image="done")
    for i in range(len(plan.layers)):
        jobs.record_layer(r, done, "a", i, jobs.LAYER_READY)
    abandoned = jobs.create_job(r, plan, ["gone"], window=2, image="abandoned")
    standing = jobs.create_job(r, plan, ["a"], window=2, image="standing", keep={})
    old = time.time() - 8 * 86400
    for job in (done, abandoned, standing):
        r.zadd(keys.JOBS, {job: old})
        r.hset(keys.job(job), "created", old)
        for node in ("a", "gone"):
            if r.exists(keys.job_node(job, node)):
                r.hset(keys.job_node(job, node), "updated", old)
    today = jobs.create_job(r, plan, ["a"], window=2, image="today")
    # And a node silent for eight days beside one that beats
    _register(r, "a", tmp_path)
    _register(r, "gone", tmp_path, age=8 * 86400)
    # When pruned with the default age, first as a dry run
    dry = prewarm("prune", "--dry-run", env=env, check=True).stdout
    assert "would remove 2 job(s), 1 node(s)" in dry and r.exists(keys.job(done)), dry
    out = prewarm("prune", env=env, check=True).stdout
    # Then the old finished and abandoned jobs are gone with every key, and the silent node
    assert "removed 2 job(s), 1 node(s)" in out, out
    for job in (done, abandoned):
        assert r.keys(f"prewarm:job:{job}*") == [] and r.zscore(keys.JOBS, job) is None
        assert not r.sismember(keys.ACTIVE_JOBS, job)
    assert not r.exists(keys.node("gone")) and not r.sismember(keys.NODES, "gone")
    # And the standing schedule, today's job and the live node stay
    assert r.exists(keys.job(standing)) and r.exists(keys.job(today)) and r.exists(keys.node("a"))
    # And a job younger than the age stays even once it is over, and goes with a shorter one
    jobs.cancel_job(r, today)
    assert "removed 0 job(s)" in prewarm("prune", "--older-than", "1h", env=env, check=True).stdout
    assert f"job {today}" in prewarm("prune", "--older-than", "0", env=env, check=True).stdout


def test_prune_refuses_a_duration_it_cannot_read(redis_url: str, tmp_path: Path) -> None:
    proc = prewarm("prune", "--older-than", "soon", env=clean_env(tmp_path, PREWARM_BROKER_URL=redis_url))
    assert proc.returncode == 2 and "soon" in proc.stderr and "7d" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
