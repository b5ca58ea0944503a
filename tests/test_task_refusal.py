"""A node checks every task before it writes anything (issue 21 item 7, issue 13 item 6).

A real worker on a real Redis; task messages pushed into the node's queue the way anyone
with write access to Redis could: for a job that does not exist, for another node, with
a negative or too large layer index.  Each is refused, counted, and leaves Redis exactly
as it was: no job key created, no layer of the real job marked.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis

from prewarm.fleet import dispatch, keys
from tests.images import simple_image
from tests.pipeline_helpers import clean_env, prewarm, push, start_worker, wait_job
from tests.services import Registry

SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20)}


def _prewarm_keys(r: redis.Redis) -> dict[bytes, object]:
    """Every prewarm key with its content (Celery's own bookkeeping left out, and so are the worker
    processes' records of the messages they took, prewarm.fleet.recovery's, which every delivery
    writes, refused or not, and which name no job)."""
    out: dict[bytes, object] = {}
    for key in r.scan_iter(match="prewarm:*"):
        if key.startswith((b"prewarm:worker:", b"prewarm:workers")):
            continue
        kind = r.type(key).decode()
        out[key] = (r.hgetall(key) if kind == "hash" else r.smembers(key) if kind == "set"
                    else r.zrange(key, 0, -1) if kind == "zset" else r.get(key) if kind == "string" else kind)
    return out


def test_forged_tasks_are_refused_before_any_write(tmp_path: Path, registry: Registry, redis_url: str) -> None:
    image = simple_image(tmp_path / "oci")
    ref = push(image, registry, "tasks/refused")
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_VISIBILITY_TIMEOUT="30",
                    PREWARM_INSECURE_REGISTRIES=registry.host, PREWARM_NODE_NAME="t1", **SPANS)
    r = redis.Redis.from_url(redis_url)
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@t1")
    try:
        # Given a real job that ran on node t1
        job = prewarm("schedule", ref, "--node", "t1", env=env, check=True).stdout.strip()
        final = wait_job(job, env)
        assert final["state"] == "succeeded", final
        plan = json.loads(r.get(keys.job_plan(job)))
        layer = plan["layers"][0]["digest"]
        before = _prewarm_keys(r)
        # When forged messages land in t1's queue
        sender = dispatch.sender(redis_url)
        common = {"image": plan["reference"], "layer": layer}
        forged = [
            {"job": "no-such-job", "node": "t1", "layer_index": 0},          # unknown job
            {"job": job, "node": "elsewhere", "layer_index": 0},             # another node's task
            {"job": job, "node": "t1", "layer_index": -1},                   # negative index
            {"job": job, "node": "t1", "layer_index": 99},                   # past the plan
            {"job": job, "node": "t1", "layer_index": 0, "image": "evil.example:443/x:1"},  # another registry
            {"job": job, "node": "t1", "layer_index": 0, "layer": "sha256:" + "0" * 64},    # another layer
        ]
        for kw in forged:
            sender.send_task(dispatch.TASK_WARM_LAYER, kwargs={**common, **kw}, queue=keys.node_queue("t1"))
        deadline = time.monotonic() + 60
        while worker.log.read_text().count("refused prewarm.warm_layer") < len(forged):
            assert time.monotonic() < deadline, worker.log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(0.5)
        after = _prewarm_keys(r)
        status = json.loads(prewarm("status", job, "--json", env=env, check=True).stdout)
    finally:
        worker.stop()
    # Then each was refused with its reason, and Redis holds exactly what it held before
    log = worker.log.read_text()
    for reason in ("does not exist", "not this node", "non-negative", "past the job", "is not the job's",
                   "is not layer 0"):
        assert reason in log, log[-3000:]
    assert after == before
    assert not any(k.startswith(b"prewarm:job:no-such-job") for k in after)
    assert status["state"] == "succeeded" and set(status["nodes"]) == {"t1"}
    assert "Traceback" not in log


def test_a_worker_refuses_a_node_name_another_live_host_holds(tmp_path: Path, redis_url: str) -> None:
    # Given a live worker for node "dup" on one store (standing in for one host)
    first = clean_env(tmp_path / "a", PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME="dup")
    second = clean_env(tmp_path / "b", PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME="dup")
    same = clean_env(tmp_path / "a", PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME="dup")
    worker = start_worker(first, tmp_path / "a.log", "-c", "1", "--hostname", "w1@dup")
    try:
        r = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 60
        while not r.hget(keys.node("dup"), "identity"):
            assert time.monotonic() < deadline, worker.log.read_text()[-2000:]
            time.sleep(0.2)
        # When a worker of another store starts under the same name
        other = start_worker(second, tmp_path / "b.log", "-c", "1", "--hostname", "w2@dup")
        code = other.proc.wait(60)
        # Then it refuses at once, saying why and what to do, with no traceback
        text = other.log.read_text()
        assert code != 0 and "in use by a live worker" in text and "PREWARM_NODE_NAME" in text, text
        assert "Traceback" not in text
        # And a second worker of the same node (same host and store) is welcome
        again = start_worker(same, tmp_path / "c.log", "-c", "1", "--hostname", "w3@dup")
        time.sleep(3)
        assert again.proc.poll() is None, again.log.read_text()[-2000:]
        again.stop()
    finally:
        worker.stop()
