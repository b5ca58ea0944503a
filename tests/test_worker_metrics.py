"""A real worker's /metrics and /healthz: scraped during jobs, with Redis up and then stopped."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from prewarm.node.metrics import Health
from tests.images import odd_image
from tests.pipeline_helpers import REPO_ROOT, clean_env, prewarm, push, start_worker, wait_job
from tests.services import Registry, free_port, run_redis, wait_until

SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20),
         "PREWARM_SPANS_PER_TASK": "2"}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on the worker's /metrics, by (name, sorted labels)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def job_gauges(samples: dict, job: str) -> tuple[float, float] | None:
    key_done, key_total = ("prewarm_job_bytes_done", (("job", job),)), ("prewarm_job_bytes_total", (("job", job),))
    if key_total not in samples:
        return None
    return samples[key_done], samples[key_total]


def healthz(port: int) -> int:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code
    except requests.ConnectionError:
        return 0


def test_a_workers_metrics_move_during_a_job_and_healthz_follows_redis(tmp_path: Path, registry: Registry) -> None:
    image = odd_image(tmp_path / "oci")
    ref = push(image, registry, "metrics/odd")
    port = free_port()
    with run_redis(tmp_path / "redis") as redis_server:
        env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_server.url,
                        PREWARM_INSECURE_REGISTRIES=registry.host, PREWARM_NODE_NAME="m1",
                        PREWARM_METRICS_PORT=str(port), **SPANS)
        # Given a registry budget slow enough that a job takes several seconds
        prewarm("budget", registry.host, "--rate", "8MB", "--burst", "1MB", env=env, check=True)
        # And a worker serving metrics, one task at a time
        worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@m1")
        try:
            wait_until(lambda: healthz(port) == 200, timeout=60, what="/healthz to answer 200")
            before = scrape(port)
            assert value(before, "prewarm_store_bytes") == 0
            # When the image is scheduled twice on the node, the second job right behind the first
            # (the second by a scheduler that waits and serves its own metrics)
            first = prewarm("schedule", ref, "--node", "m1", env=env, check=True).stdout.strip()
            sched_port = free_port()
            scheduler = subprocess.Popen([sys.executable, "-m", "prewarm", "schedule", ref, "--node", "m1", "--wait",
                                          "--quiet", "--json", "--metrics-port", str(sched_port)],
                                         env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            # Then, while the first job runs, bytes fetched and its job gauges move on the worker
            # And the scheduler's port shows its job's progress
            seen: list[tuple[float, float]] = []
            scheduler_saw: set[float] = set()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and (len({g[0] for g in seen}) < 2 or not scheduler_saw):
                during = scrape(port)
                gauges = job_gauges(during, first)
                if gauges is not None and 0 < gauges[0] < gauges[1]:
                    seen.append(gauges)
                with contextlib.suppress(requests.ConnectionError):
                    for (name, _), v in scrape(sched_port).items():
                        if name == "prewarm_job_bytes_total":
                            scheduler_saw.add(v)
                time.sleep(0.2)
            assert len({g[0] for g in seen}) >= 2, (seen, (tmp_path / "w.log").read_text()[-3000:])
            total = image_bytes(env, first)
            assert seen[-1][1] == total
            assert scheduler_saw == {total}
            assert value(during, "prewarm_bytes_fetched_total", registry=registry.host, kind="span") > 0
            # And once both jobs end, the store's bytes, fetched spans and present spans are counted
            assert wait_job(first, env, timeout=240)["state"] == "succeeded"
            out, err = scheduler.communicate(timeout=240)
            assert scheduler.returncode == 0, err
            assert json.loads(out)["state"] == "succeeded"
            after = scrape(port)
            assert value(after, "prewarm_spans_total", result="fetched") > 0
            assert value(after, "prewarm_spans_total", result="present") > 0, \
                "the second job's span tasks found the first job's spans landed"
            assert value(after, "prewarm_layers_total", result="ready") > 0
            unpacked = sum(json.loads(p.read_text())["uncompressed_size"]
                           for p in (tmp_path / "store").rglob("ready") if p.is_file())
            assert unpacked > 0 and value(after, "prewarm_store_bytes") == unpacked
            # When Redis stops
            redis_server.stop()
            # Then /healthz answers 503 and says why
            wait_until(lambda: healthz(port) == 503, timeout=30, what="/healthz to answer 503")
            why = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).text
            assert "Redis" in why or "heartbeat" in why, why
            # And /metrics still answers (without the job gauges, which live in Redis)
            assert value(scrape(port), "prewarm_store_bytes") == unpacked
            # When Redis comes back, the worker is healthy again
            redis_server.start()
            wait_until(lambda: healthz(port) == 200, timeout=90, what="/healthz to answer 200 again")
        finally:
            worker.stop()


def image_bytes(env: dict[str, str], job: str) -> int:
    return int(json.loads(prewarm("status", job, "--json", env=env, check=True).stdout)["bytes_total"])


# === Health, with a clock of our own =========================================


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_health_needs_a_fresh_consumer_heartbeat_and_an_answering_redis() -> None:
    clock = _Clock()
    redis_up = [True]

    def ping() -> bool:
        if not redis_up[0]:
            raise ConnectionError("Connection refused")
        return True

    health = Health(ping, stale_after=10, clock=clock)
    # Given no heartbeat yet: not healthy (the consumer has not started)
    assert health.check()[0] is False
    # When the consumer beats, it is healthy
    health.beat(sender=None)
    assert health.check() == (True, "ok")
    # When it stops beating for longer than the limit, it is not
    clock.now += 11
    ok, why = health.check()
    assert not ok and "heartbeat" in why
    # When it beats but Redis does not answer, it is not either
    health.beat()
    redis_up[0] = False
    ok, why = health.check()
    assert not ok and "Redis" in why


@pytest.mark.parametrize("path", ["/metrics", "/"])
def test_the_scheduler_side_serves_its_job_gauges(path: str) -> None:
    """observe_job sets the gauges the scheduler's port shows (non-multiprocess registry)."""
    from prewarm.node import metrics

    class _Status:
        job_id = f"job-{path.strip('/') or 'root'}"
        bytes_done = 123
        bytes_total = 456

    metrics.observe_job(_Status())  # type: ignore[arg-type]
    server = metrics.serve(0, multiprocess=False, addr="127.0.0.1")
    try:
        port = server.server_address[1]
        text = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10).text
        assert f'prewarm_job_bytes_done{{job="{_Status.job_id}"}} 123.0' in text
        assert f'prewarm_job_bytes_total{{job="{_Status.job_id}"}} 456.0' in text
        # And without a health check, /healthz is not pretended
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_a_taken_metrics_port_is_a_config_error() -> None:
    from prewarm.errors import ConfigError
    from prewarm.node import metrics

    # Given a port already served
    first = metrics.serve(0, multiprocess=False, addr="127.0.0.1")
    try:
        # When another server is asked for it, Then the error names the port and the setting
        with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{first.server_address[1]}.*PREWARM_METRICS_PORT"):
            metrics.serve(first.server_address[1], multiprocess=False, addr="127.0.0.1")
    finally:
        first.shutdown()
        first.server_close()
