"""The pipeline with a real broker: separate worker processes, one killed mid-job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.images import odd_image
from tests.pipeline_helpers import (
    assert_matches_umoci,
    clean_env,
    prewarm,
    push,
    start_worker,
    wait_job,
)
from tests.services import Registry

SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20)}


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory, registry: Registry):  # type: ignore[no-untyped-def]
    image = odd_image(tmp_path_factory.mktemp("odd-fleet-oci"))
    return image, push(image, registry, "fleet/odd")


def test_a_worker_killed_mid_job_does_not_stop_the_job(tmp_path: Path, registry: Registry, redis_url: str,
                                                      odd) -> None:
    image, ref = odd
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_VISIBILITY_TIMEOUT="4",
                    PREWARM_INSECURE_REGISTRIES=registry.host, PREWARM_NODE_NAME="n1", **SPANS)
    # Given a registry budget slow enough that the job takes a few seconds
    prewarm("budget", registry.host, "--rate", "15MB", "--burst", "2MB", env=env, check=True)
    # And two worker processes serving the same node
    doomed = start_worker(env, tmp_path / "w1.log", "-c", "2", "--hostname", "w1@n1")
    survivor = start_worker(env, tmp_path / "w2.log", "-c", "2", "--hostname", "w2@n1")
    try:
        # When the image is scheduled on that node
        job = prewarm("schedule", ref, "--node", "n1", env=env, check=True).stdout.strip()
        # And one worker is killed with SIGKILL once spans have started landing
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = json.loads(prewarm("status", job, "--json", env=env, check=True).stdout)
            if status["bytes_done"] > 0:
                break
            time.sleep(0.2)
        assert 0 < status["bytes_done"] < status["bytes_total"], "the kill must land mid-job"
        doomed.kill()
        # Then the job still completes, and completely
        final = wait_job(job, env, timeout=240)
        assert final["state"] == "succeeded", (final, survivor.log.read_text()[-3000:])
    finally:
        doomed.stop()
        survivor.stop()
    # And the node's tree is exactly umoci's
    assert_matches_umoci(image, ref, env, tmp_path)
    # And the node registered itself with a heartbeat
    nodes = json.loads(prewarm("nodes", "--json", env=env, check=True).stdout)
    assert [n["name"] for n in nodes] == ["n1"]


def _task_events(pubsub) -> list[str]:  # type: ignore[no-untyped-def]
    """Types of the Celery task events published so far (kombu fanout over Redis PUBLISH)."""
    import base64

    out = []
    while (msg := pubsub.get_message(timeout=0.05)) is not None:
        if msg["type"] != "pmessage":
            continue
        envelope = json.loads(msg["data"])
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        for event in decoded if isinstance(decoded, list) else [decoded]:  # workers send them in batches
            if str(event.get("type", "")).startswith("task-"):
                out.append(event["type"])
    return out


@pytest.mark.parametrize("flag", ["--task-events", "--no-task-events"])
def test_task_events_follow_the_workers_flag(tmp_path: Path, registry: Registry, redis_url: str, odd,
                                             flag: str) -> None:
    import redis

    _, ref = odd
    node = "ev-on" if flag == "--task-events" else "ev-off"
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                    PREWARM_NODE_NAME=node, **SPANS)
    # Given a listener on Celery's event channel and a worker started with the flag
    pubsub = redis.Redis.from_url(redis_url).pubsub()
    pubsub.psubscribe("*celeryev*")
    worker = start_worker(env, tmp_path / "w.log", "-c", "2", "--hostname", f"w@{node}", flag)
    try:
        # When it warms an image
        job = prewarm("schedule", ref, "--node", node, env=env, check=True).stdout.strip()
        final = wait_job(job, env, timeout=240)
        assert final["state"] == "succeeded", final
        events = _task_events(pubsub)
    finally:
        worker.stop()
        pubsub.close()
    # Then task events were sent with --task-events (what Flower shows) and none without
    if flag == "--task-events":
        assert "task-succeeded" in events and "task-received" in events, events
    else:
        assert events == []
