"""A worker's memory per task is bounded whatever a zTOC says (issue 13 item 8).

Real worker, Redis and registry; the image's SOCI index is pushed with spans larger than
the worker's ceiling (PREWARM_MAX_SPAN), as a hostile zTOC, or a gzip stream of one giant
deflate block, would make them.  The worker refuses those spans before fetching them:
the job ends with the reason, once, instead of a worker OOM-killed and redelivered in a loop.
"""

from __future__ import annotations

from pathlib import Path

from tests.faultproxy import FaultProxy
from tests.images import odd_image
from tests.pipeline_helpers import clean_env, prewarm, push, start_worker, wait_job
from tests.services import Registry

SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20)}


def test_spans_over_the_ceiling_fail_the_layer_once_without_a_fetch(tmp_path: Path, registry: Registry,
                                                                      redis_url: str) -> None:
    image = odd_image(tmp_path / "oci")
    ref = push(image, registry, "bounds/spans")
    indexer = clean_env(tmp_path / "indexer", PREWARM_INSECURE_REGISTRIES=registry.host, **SPANS)
    prewarm("index", ref, "--push", env=indexer, check=True)
    with FaultProxy(registry.host) as proxy:
        env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME="b1",
                        PREWARM_INSECURE_REGISTRIES=f"{proxy.host},{registry.host}",
                        PREWARM_MAX_SPAN=str(64 * 1024), **SPANS)
        worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@b1")
        try:
            job = prewarm("schedule", f"{proxy.host}/bounds/spans:{image.tag}", "--node", "b1", env=env,
                          check=True).stdout.strip()
            final = wait_job(job, env, timeout=120)
        finally:
            worker.stop()
        ranged = [s for s in list(proxy.requests) if s.method == "GET" and s.headers.get("Range")]
    # Then the span layers failed with the reason, and not one span was fetched
    assert final["state"] == "failed", final
    errors = final["nodes"]["b1"]["errors"]
    assert errors and all("ceiling" in e and "PREWARM_MAX_SPAN" in e for e in errors.values()), errors
    assert ranged == [], [s.headers.get("Range") for s in ranged]
    # And each failing layer failed once: no task was redelivered in a loop
    log = worker.log.read_text()
    assert log.count("over the") <= len(errors) * 8 + 8, log[-3000:]
    assert "Traceback" not in log


def test_a_decompression_bomb_fails_its_layer_and_leaves_nothing(tmp_path: Path, registry: Registry,
                                                                   redis_url: str) -> None:
    """Issue 21 item 5: a whole layer may unpack to PREWARM_MAX_EXPANSION times its size at most."""
    from prewarm.imagebuild import Layer, TarEntry, build_image
    from prewarm.store.content import ContentStore

    # Given a small gzip layer holding 24 MiB of zeros (~24 KB compressed), no zTOC
    bomb = build_image(tmp_path / "oci", [Layer([TarEntry("zeros", data=bytes(24 << 20))], "gzip", level=9)],
                       tag="bomb")
    ref = push(bomb, registry, "bounds/bomb")
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME="b2",
                    PREWARM_INSECURE_REGISTRIES=registry.host, PREWARM_MAX_EXPANSION="10", **SPANS)
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@b2")
    try:
        job = prewarm("schedule", ref, "--node", "b2", "--index", "none", env=env, check=True).stdout.strip()
        final = wait_job(job, env, timeout=120)
    finally:
        worker.stop()
    # Then the layer failed naming the cap, and no partial file is left in the store
    assert final["state"] == "failed", final
    errors = final["nodes"]["b2"]["errors"]
    assert errors and all("PREWARM_MAX_EXPANSION" in e for e in errors.values()), errors
    store = ContentStore(Path(env["PREWARM_ROOT"]))
    assert not any(store.is_ready(d) for d in store.list_layers())
    assert not [p for p in (store.root / "layers").rglob("zeros")], "partial files were left"


def test_transient_errors_are_retried_as_configured_then_the_layer_fails_with_the_reason(
        tmp_path: Path, registry: Registry, redis_url: str) -> None:
    """Issue 21 item 7: retries carry an explicit max_retries (Celery's default of 3 was used), and the
    last failure records its reason."""
    from tests.faultproxy import Fault
    from tests.images import simple_image

    image = simple_image(tmp_path / "oci")
    push(image, registry, "bounds/retries")
    layers = "|".join(layer.digest for layer in image.layers)
    with FaultProxy(registry.host) as proxy:
        # Given every request for a layer blob answered 503, from before the job starts
        fault = proxy.add(Fault("status", path=f"/blobs/({layers})", method="GET", status=503))
        env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME="b3",
                        PREWARM_INSECURE_REGISTRIES=f"{proxy.host},{registry.host}",
                        PREWARM_TRANSIENT_RETRIES="5", PREWARM_RETRY_MAX_DELAY="1", **SPANS)
        ref = f"{proxy.host}/bounds/retries:simple"
        worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@b3")
        try:
            job = prewarm("schedule", ref, "--node", "b3", "--index", "none", env=env, check=True).stdout.strip()
            final = wait_job(job, env, timeout=240)
        finally:
            worker.stop()
    # Then each layer failed with the registry's reason, after 1 + 5 tries of its task
    assert final["state"] == "failed", final
    errors = final["nodes"]["b3"]["errors"]
    assert len(errors) == 2 and all("503" in e or "unavailable" in e.lower() for e in errors.values()), errors
    log = worker.log.read_text()
    retries = log.count("Retry in")
    assert retries == 2 * 5, (retries, log[-3000:])
    assert fault.applied >= 2 * 6
