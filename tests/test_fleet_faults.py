"""Faults a fleet survives (issue 6 item 5), each against real Redis, registry and worker processes.

Workers talk to the registry through a FaultProxy (tests/faultproxy.py), which relays to the
real docker-registry, injects the fault and records every request, so a test can count the
Range GETs per (blob, range) and the bytes relayed.  The image's SOCI index is built and
pushed once beforehand (``prewarm index --push`` straight at the registry), so what the
proxy relays during a job is the workers' span traffic plus small manifests and zTOCs.
"""

from __future__ import annotations

import collections
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from prewarm.fleet.jobs import job_status, list_jobs
from prewarm.imagebuild import BuiltImage
from prewarm.index.ztoc_build import build_ztoc
from prewarm.store.content import ContentStore
from tests.faultproxy import Fault, FaultProxy
from tests.images import odd_image
from tests.pipeline_helpers import (
    REPO_ROOT,
    Worker,
    assert_matches_umoci,
    clean_env,
    prewarm,
    push,
    register_node,
    start_worker,
    wait_job,
)
from tests.services import RedisServer, Registry

SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20)}
REPO = "fleet/faults"


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> BuiltImage:
    """The odd image pushed with its SOCI index, so the jobs below fetch spans only."""
    image = odd_image(tmp_path_factory.mktemp("odd-faults-oci"))
    ref = push(image, registry, REPO)
    env = clean_env(tmp_path_factory.mktemp("indexer"), PREWARM_INSECURE_REGISTRIES=registry.host, **SPANS)
    prewarm("index", ref, "--push", env=env, check=True)
    return image


def image_manifest(image: BuiltImage) -> dict:
    return json.loads(_blob(image, json.loads((image.layout / "index.json").read_text())["manifests"][0]))


def image_layer_bytes(image: BuiltImage) -> int:
    return sum(layer["size"] for layer in image_manifest(image)["layers"])


def _blob(image: BuiltImage, desc: dict) -> bytes:
    algo, hexd = desc["digest"].split(":")
    return (image.layout / "blobs" / algo / hexd).read_bytes()


def node_env(tmp: Path, node: str, redis_url: str, proxy: FaultProxy, registry: Registry) -> dict[str, str]:
    return clean_env(tmp / f"store-{node}", PREWARM_BROKER_URL=redis_url, PREWARM_VISIBILITY_TIMEOUT="4",
                     PREWARM_INSECURE_REGISTRIES=f"{proxy.host},{registry.host}", PREWARM_NODE_NAME=node, **SPANS)


def status_of(job: str, env: dict[str, str]) -> dict:
    return json.loads(prewarm("status", job, "--json", env=env, check=True).stdout)


def wait_mid_job(job: str, env: dict[str, str], timeout: float = 60) -> dict:
    """Wait until some spans have landed but not all: the moment to inject a crash."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = status_of(job, env)
        if status["bytes_done"] > 0:
            assert status["bytes_done"] < status["bytes_total"], "the fault must land mid-job"
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job} made no progress in {timeout}s")


def range_gets(proxy: FaultProxy) -> collections.Counter[tuple[str, str]]:
    """Range GETs of blobs the proxy received, per (path, range)."""
    return collections.Counter((s.path, s.headers.get("Range", "")) for s in list(proxy.requests)
                               if s.method == "GET" and "/blobs/" in s.path and s.headers.get("Range"))


def span_fetches(proxy: FaultProxy, image: BuiltImage) -> collections.Counter[tuple[str, int]]:
    """How often each span of each indexed layer was fetched, per (layer digest, span index).

    A task fetches a group of adjacent spans in one Range, and a redelivered task only the
    spans still missing, so Range strings differ between tries: count a span as fetched by
    every Range that holds its compressed middle.  The zTOCs are built here from the layer
    blobs with the job's span size, as ``prewarm index --push`` built them.
    """
    spans: dict[str, list[tuple[int, int]]] = {}
    for layer in image_manifest(image)["layers"]:
        if layer["size"] < int(SPANS["PREWARM_MIN_LAYER_SIZE"]):
            continue
        ztoc = build_ztoc([_blob(image, layer)], span_size=int(SPANS["PREWARM_SPAN_SIZE"]),
                          build_tool_identifier="test")
        spans[layer["digest"]] = [(s.compressed_start + s.compressed_end) // 2
                                  for s in (ztoc.span(i) for i in range(ztoc.num_spans))]  # type: ignore[misc]
    counts: collections.Counter[tuple[str, int]] = collections.Counter()
    for (path, rng), n in range_gets(proxy).items():
        digest = path.rsplit("/", 1)[-1]
        first, _, last = rng.removeprefix("bytes=").partition("-")
        for i, middle in enumerate(spans.get(digest, [])):
            if int(first) <= middle <= int(last):
                counts[(digest, i)] += n
    return counts


def assert_layers_ready(image: BuiltImage, env: dict[str, str]) -> None:
    """Every layer of the image is committed in the node's own store (not just counted done in Redis)."""
    store = ContentStore(Path(env["PREWARM_ROOT"]))
    missing = [layer["digest"] for layer in image_manifest(image)["layers"] if not store.is_ready(layer["digest"])]
    assert not missing, f"layers not ready in the node's store: {missing}"


def stop_all(workers: list[Worker]) -> None:
    for w in workers:
        w.stop()


def test_workers_sigkilled_mid_span_no_span_fetched_more_than_twice(tmp_path: Path, registry: Registry,
                                                                     redis_url: str, odd: BuiltImage) -> None:
    with FaultProxy(registry.host) as proxy:
        env = node_env(tmp_path, "n1", redis_url, proxy, registry)
        ref = f"{proxy.host}/{REPO}:{odd.tag}"
        # Given a budget slow enough that the job takes a few seconds, and two workers on the node
        prewarm("budget", proxy.host, "--rate", "10MB", "--burst", "1MB", env=env, check=True)
        workers = [start_worker(env, tmp_path / f"w{i}.log", "-c", "2", "--hostname", f"w{i}@n1") for i in range(3)]
        try:
            job = prewarm("schedule", ref, "--node", "n1", env=env, check=True).stdout.strip()
            # When two of the three workers are SIGKILLed while spans are in flight
            wait_mid_job(job, env)
            workers[0].kill()
            time.sleep(0.5)
            workers[1].kill()
            final = wait_job(job, env, timeout=120)
        finally:
            stop_all(workers)
        # Then the job completes, and truly
        assert final["state"] == "succeeded", (final, workers[2].log.read_text()[-3000:])
        assert final["bytes_total"] == image_layer_bytes(odd)
        assert_layers_ready(odd, env)
        # And no span was fetched more than twice (once before the kill, once after redelivery)
        counts = span_fetches(proxy, odd)
        assert counts, "the job fetched spans through the proxy"
        assert max(counts.values()) <= 2, [k for k, v in counts.items() if v > 2]
    assert_matches_umoci(odd, ref, env, tmp_path)


def test_redis_restarted_mid_job_resumes_and_the_waiting_scheduler_survives(
        tmp_path: Path, registry: Registry, redis_server: RedisServer, redis_url: str, odd: BuiltImage) -> None:
    with FaultProxy(registry.host) as proxy:
        env = node_env(tmp_path, "n1", redis_url, proxy, registry)
        ref = f"{proxy.host}/{REPO}:{odd.tag}"
        prewarm("budget", proxy.host, "--rate", "10MB", "--burst", "1MB", env=env, check=True)
        worker = start_worker(env, tmp_path / "w.log", "-c", "2", "--hostname", "w@n1")
        waiting = subprocess.Popen([sys.executable, "-m", "prewarm", "schedule", ref, "--node", "n1", "--wait",
                                    "--json", "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=REPO_ROOT)
        try:
            deadline = time.monotonic() + 60
            job = None
            while job is None and time.monotonic() < deadline:
                listed = list_jobs(redis.Redis.from_url(redis_url))
                job = listed[0] if listed else None
                time.sleep(0.1)
            assert job, "the scheduler recorded its job"
            # When Redis is restarted mid-job (the test Redis persists with appendonly)
            wait_mid_job(job, env)
            redis_server.restart()
            # Then the scheduler's --wait survives and reports success, and the job completes
            out, err = waiting.communicate(timeout=180)
            assert waiting.returncode == 0, (out, err, worker.log.read_text()[-3000:])
            final = status_of(job, env)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
            worker.stop()
        assert final["state"] == "succeeded", final
        assert final["bytes_total"] == image_layer_bytes(odd)
        assert_layers_ready(odd, env)
    assert_matches_umoci(odd, ref, env, tmp_path)


def test_redis_sigkilled_mid_job_loses_at_most_its_last_second_and_the_job_recovers(
        tmp_path: Path, registry: Registry, redis_server: RedisServer, redis_url: str, odd: BuiltImage) -> None:
    """Redis dies without saving (SIGKILL; the test Redis persists with appendonly, fsync everysec).

    What can be lost: the writes of its last second (task messages, span accounting, the
    release of a window).  What must come back: the job record from the AOF, and the work,
    through the node's stall detection resending its window; a span whose accounting was
    lost is found landed in the store and costs no fetch.
    """
    with FaultProxy(registry.host) as proxy:
        env = node_env(tmp_path, "n1", redis_url, proxy, registry)
        ref = f"{proxy.host}/{REPO}:{odd.tag}"
        prewarm("budget", proxy.host, "--rate", "10MB", "--burst", "1MB", env=env, check=True)
        worker = start_worker(env, tmp_path / "w.log", "-c", "2", "--hostname", "w@n1")
        try:
            job = prewarm("schedule", ref, "--node", "n1", env=env, check=True).stdout.strip()
            # When Redis is SIGKILLed mid-job and started again on the same data
            wait_mid_job(job, env)
            time.sleep(1.5)  # past one AOF fsync, so the job record is on disk
            r = redis.Redis.from_url(redis_url)
            before = job_status(r, job)
            redis_server.kill()
            redis_server.start()
            # Then the job record survived, with at most the accounting of its last second lost
            # (the budget holds the node to 10 MB/s)
            after = job_status(redis.Redis.from_url(redis_url), job)
            assert after.bytes_total == before.bytes_total == image_layer_bytes(odd), (before, after)
            assert after.bytes_done >= before.bytes_done - 10_000_000, (before.bytes_done, after.bytes_done)
            # And the job completes from what the store holds
            final = wait_job(job, env, timeout=180)
        finally:
            worker.stop()
        assert final["state"] == "succeeded", (final, worker.log.read_text()[-3000:])
        assert_layers_ready(odd, env)
        # And no span was fetched more than twice
        counts = span_fetches(proxy, odd)
        assert counts and max(counts.values()) <= 2, [k for k, v in counts.items() if v > 2]
    assert_matches_umoci(odd, ref, env, tmp_path)


def test_a_fifth_of_registry_requests_failing_costs_at_most_thirty_percent_more_egress(
        tmp_path: Path, registry: Registry, redis_url: str, odd: BuiltImage) -> None:
    with FaultProxy(registry.host, seed=6) as proxy:
        env = node_env(tmp_path, "n1", redis_url, proxy, registry)
        ref = f"{proxy.host}/{REPO}:{odd.tag}"
        # Given 20% of blob requests failing: half 503s, half connection resets
        proxy.add(Fault("status", path="/blobs/", fraction=0.10, status=503))
        proxy.add(Fault("reset", path="/blobs/", fraction=0.11))
        worker = start_worker(env, tmp_path / "w.log", "-c", "2", "--hostname", "w@n1")
        try:
            job = prewarm("schedule", ref, "--node", "n1", env=env, check=True).stdout.strip()
            final = wait_job(job, env, timeout=150)
        finally:
            worker.stop()
        faults = sum(f.applied for f in proxy.faults)
        blob_requests = sum(f.matched for f in proxy.faults[:1])
        relayed = proxy.bytes_relayed
    # Then the job completes, and truly
    assert final["state"] == "succeeded", (final, worker.log.read_text()[-3000:])
    assert final["bytes_total"] == image_layer_bytes(odd)
    assert_layers_ready(odd, env)
    assert faults >= blob_requests * 0.1, (faults, blob_requests)
    # And the registry egress stays within 1.3x of the image (failed requests cost nothing or little)
    assert relayed <= 1.3 * image_layer_bytes(odd), (relayed, image_layer_bytes(odd))
    assert_matches_umoci(odd, ref, env, tmp_path)


def test_a_span_corrupted_in_transit_is_refetched_never_committed(tmp_path: Path, registry: Registry,
                                                                  redis_url: str, odd: BuiltImage) -> None:
    with FaultProxy(registry.host) as proxy:
        env = node_env(tmp_path, "n1", redis_url, proxy, registry)
        ref = f"{proxy.host}/{REPO}:{odd.tag}"
        register_node(env)
        job = prewarm("schedule", ref, "--node", "n1", env=env, check=True).stdout.strip()
        # Given the first three span responses to the node corrupted in transit (one byte flipped)
        layers = "|".join(layer["digest"] for layer in image_manifest(odd)["layers"] if layer["size"] >= 1 << 20)
        corrupt = proxy.add(Fault("corrupt", path=f"/blobs/({layers})", method="GET", first=3))
        worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@n1")
        try:
            final = wait_job(job, env, timeout=120)
        finally:
            worker.stop()
    assert corrupt.applied == 3
    # Then each was detected by the span digest and fetched again; the job completes
    log = worker.log.read_text()
    assert log.count("corrupted in transit") >= 3, log[-3000:]
    assert final["state"] == "succeeded", (final, log[-3000:])
    # And nothing corrupted was committed: the tree equals umoci's
    assert_matches_umoci(odd, ref, env, tmp_path)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (root), unmounted afterwards."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_fails_that_node_clearly_and_leaves_the_others_complete(
        tmp_path: Path, registry: Registry, redis_url: str, odd: BuiltImage) -> None:
    with FaultProxy(registry.host) as proxy, small_tmpfs(tmp_path / "small", "6m") as small:
        ok_env = node_env(tmp_path, "roomy", redis_url, proxy, registry)
        full_env = {**node_env(tmp_path, "full", redis_url, proxy, registry), "PREWARM_ROOT": str(small / "store")}
        ref = f"{proxy.host}/{REPO}:{odd.tag}"
        workers = [start_worker(e, tmp_path / f"{e['PREWARM_NODE_NAME']}.log", "-c", "2", "--hostname",
                                f"w@{e['PREWARM_NODE_NAME']}") for e in (ok_env, full_env)]
        try:
            # When the image is scheduled on both nodes and waited for
            out = prewarm("schedule", ref, "--node", "roomy", "--node", "full", "--wait", "--quiet",
                          env=ok_env, timeout=150)
            job = list_jobs(redis.Redis.from_url(redis_url))[0]
            final = status_of(job, ok_env)
            text = prewarm("status", job, env=ok_env, check=True).stdout
        finally:
            stop_all(workers)
        # Then the job is failed, not success, and the scheduler says which layers failed
        assert out.returncode != 0, (out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        assert final["state"] == "failed", final
        assert final["nodes"]["full"]["state"] == "failed"
        errors = final["nodes"]["full"]["errors"]
        assert errors, final["nodes"]["full"]
        # (the worker's space check before a layer, or ENOSPC while writing: both name the store)
        assert all(("disk full" in reason or "not enough space" in reason) and str(small / "store") in reason
                   for reason in errors.values()), errors
        assert str(small / "store") in text, text
        assert any(digest in out.stderr + out.stdout for digest in errors), (out.stdout, out.stderr)
        # And the full node's store is consistent: no failed layer is marked ready there
        store = ContentStore(small / "store")
        assert not any(store.is_ready(digest) for digest in errors)
        # And the other node is unaffected and complete
        assert final["nodes"]["roomy"]["state"] == "succeeded", final["nodes"]["roomy"]
    assert_matches_umoci(odd, ref, ok_env, tmp_path)


def test_a_whole_layer_corrupted_in_transit_is_fetched_again(tmp_path: Path, registry: Registry,
                                                             redis_url: str, odd: BuiltImage) -> None:
    with FaultProxy(registry.host) as proxy:
        env = node_env(tmp_path, "n1", redis_url, proxy, registry)
        ref = f"{proxy.host}/{REPO}:{odd.tag}"
        # Given every layer fetched whole (no zTOC) and, once scheduled, the first two layer
        # downloads corrupted in transit (one byte flipped mid-body)
        register_node(env)
        job = prewarm("schedule", ref, "--node", "n1", "--index", "none", env=env, check=True).stdout.strip()
        layers = "|".join(layer["digest"] for layer in image_manifest(odd)["layers"])
        corrupt = proxy.add(Fault("corrupt", path=f"/blobs/({layers})", method="GET", first=2))
        worker = start_worker(env, tmp_path / "w.log", "-c", "2", "--hostname", "w@n1")
        try:
            final = wait_job(job, env, timeout=120)
        finally:
            worker.stop()
    # Then both were caught by the layer digest and fetched again, and the job succeeded
    assert corrupt.applied == 2
    log = worker.log.read_text()
    assert log.count("whole layer of") >= 2, log[-3000:]
    assert final["state"] == "succeeded", (final, log[-3000:])
    # And nothing corrupted was committed: the tree equals umoci's
    assert_matches_umoci(odd, ref, env, tmp_path)
