"""Fleet waits that end (issue 19 item 5, issue 15 item 3): unknown nodes, down nodes, --timeout, --keep by name.

Real Redis and registry; a "node" here is a registration in Redis whose worker is gone,
which is what an operator meets when a node died or a name was mistyped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis

from prewarm.fleet import jobs, keys
from prewarm.fleet.nodes import heartbeat
from tests.images import simple_image
from tests.pipeline_helpers import clean_env, prewarm, push
from tests.services import Registry

SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20)}


def _env(tmp: Path, redis_url: str, registry: Registry) -> dict[str, str]:
    return clean_env(tmp / "store", PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                     **SPANS)


def _register(r: redis.Redis, name: str, tmp: Path, age: float = 0.0) -> None:
    heartbeat(r, name, labels={}, root=tmp, layers=frozenset())
    if age:
        r.hset(keys.node(name), "heartbeat", time.time() - age)


def test_an_unknown_node_name_is_refused_up_front(tmp_path: Path, registry: Registry, redis_url: str) -> None:
    ref = push(simple_image(tmp_path / "oci"), registry, "waits/unknown")
    _register(redis.Redis.from_url(redis_url), "known", tmp_path)
    proc = prewarm("schedule", ref, "--node", "nosuchnode", "--wait", env=_env(tmp_path, redis_url, registry),
                   timeout=60)
    assert proc.returncode == 2, proc
    assert "nosuchnode" in proc.stderr and "prewarm nodes" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not redis.Redis.from_url(redis_url).zcard(keys.JOBS)


def test_timeout_ends_the_wait_with_a_per_node_report(tmp_path: Path, registry: Registry, redis_url: str) -> None:
    ref = push(simple_image(tmp_path / "oci"), registry, "waits/timeout")
    _register(redis.Redis.from_url(redis_url), "idle", tmp_path)  # up, but no worker takes its tasks
    start = time.monotonic()
    proc = prewarm("schedule", ref, "--node", "idle", "--wait", "--quiet", "--timeout", "3",
                   env=_env(tmp_path, redis_url, registry), timeout=60)
    assert proc.returncode == 11, proc
    assert time.monotonic() - start < 30
    assert "did not finish within 3s" in proc.stderr and "idle: pending" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_node_that_is_down_is_named_at_launch_and_failed_after_the_limit(
        tmp_path: Path, registry: Registry, redis_url: str) -> None:
    ref = push(simple_image(tmp_path / "oci"), registry, "waits/down")
    _register(redis.Redis.from_url(redis_url), "dead", tmp_path, age=120)
    proc = prewarm("schedule", ref, "--node", "dead", "--wait", "--json", "--node-down-timeout", "60",
                   env=_env(tmp_path, redis_url, registry), timeout=120)
    # Then the launch says the node is down, and the wait ends with its layers failed, naming why
    assert "down" in proc.stderr and "dead" in proc.stderr, proc.stderr
    summary = json.loads(proc.stdout)
    assert proc.returncode == 8 and summary["state"] == "failed", (proc.stdout, proc.stderr)
    errors = summary["nodes"]["dead"]["errors"]
    assert errors and all("no heartbeat" in e for e in errors.values()), errors


def test_keep_with_named_nodes_warms_only_those(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    from tests.test_jobs import _plan

    job = jobs.create_job(r, _plan(), ["a"], window=2, image="x", keep={jobs.NODE_NAME_LABEL: ["a", "b"]})
    everyone = jobs.create_job(r, _plan(), ["a"], window=2, image="y", keep={})
    assert jobs.standing_jobs_for(r, {jobs.NODE_NAME_LABEL: "b"}) == sorted([job, everyone])
    assert jobs.standing_jobs_for(r, {jobs.NODE_NAME_LABEL: "c", "pool": "gpu"}) == [everyone]


def test_the_progress_line_says_when_nothing_moves() -> None:
    import io

    from prewarm.fleet import progress
    from prewarm.fleet.jobs import JobStatus, NodeStatus
    from tests.test_jobs import _plan

    node = NodeStatus("n1", "pending", 0, 1000, 0, 4, {}, {}, 0.0, 0.0)
    status = JobStatus("j", "img", "pending", 0.0, _plan(), {"n1": node})
    out = io.StringIO()
    view = progress.ProgressView(stream=out, interval_plain=0)
    view.render(status)
    assert "no progress" not in out.getvalue()
    for tracker in view._rates.values():  # as if the first status came STALL_NOTICE seconds ago
        tracker.moved = (tracker.moved or 0) - progress.STALL_NOTICE - 1
    view.render(status)
    assert "no progress for" in out.getvalue().splitlines()[-1], out.getvalue()
