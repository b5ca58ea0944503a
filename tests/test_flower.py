"""Flower shows the span tasks with readable names and arguments (a real Flower process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.images import simple_image
from tests.pipeline_helpers import clean_env, prewarm, push, start_worker, wait_job
from tests.services import Registry, free_port

SPANS = {"PREWARM_SPAN_SIZE": str(64 * 1024), "PREWARM_MIN_LAYER_SIZE": "1"}


def test_flower_lists_span_tasks_by_name_with_their_arguments(tmp_path: Path, registry: Registry,
                                                              redis_url: str) -> None:
    image = simple_image(tmp_path / "oci")
    ref = push(image, registry, "flower/simple")
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME="f1",
                    PREWARM_INSECURE_REGISTRIES=registry.host, **SPANS)
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "--broker", redis_url, "flower", f"--port={port}",
         "--address=127.0.0.1"],
        env={**env, "FLOWER_UNAUTHENTICATED_API": "true"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    worker = start_worker(env, tmp_path / "worker.log", "-c", "2")
    try:
        # Given Flower is up
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/api/workers", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        # When a job with span tasks runs (zTOCs built and pushed as a SOCI index: a fleet)
        job = prewarm("schedule", ref, "--node", "f1", "--index", "build", env=env, check=True).stdout.strip()
        assert wait_job(job, env)["state"] == "succeeded"
        # Then Flower lists prewarm.warm_span tasks whose arguments name job, image, layer and span
        tasks: dict = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            tasks = requests.get(f"http://127.0.0.1:{port}/api/tasks", timeout=5).json()
            if any(t.get("name") == "prewarm.warm_span" and t.get("state") == "SUCCESS" for t in tasks.values()):
                break
            time.sleep(0.5)
        spans = [t for t in tasks.values() if t.get("name") == "prewarm.warm_span"]
        assert spans, tasks
        kwargs = spans[0]["kwargs"]
        assert job in kwargs and "'span':" in kwargs and image.layers[0].digest[:20] in "".join(
            t["kwargs"] for t in spans)
        assert ref.split(":")[0] in kwargs  # the image by name, not an opaque id
    finally:
        worker.stop()
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(20)
