"""The span pipeline end to end: real registry, Redis, Celery worker processes, overlay.

Every test pushes real images (tests.images) with the project's own client and runs the
``prewarm`` command as a user would; the acceptance check is that the pre-warmed layers,
overlay-mounted newest first, equal the rootfs ``umoci unpack`` makes of the same image.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prewarm.index.ztoc import parse_ztoc
from tests.images import odd_image, simple_image
from tests.pipeline_helpers import assert_matches_umoci, clean_env, prewarm, push
from tests.services import Registry

# Small spans and a low zTOC threshold so that even test-sized layers go through many spans.
SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20)}


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory, registry: Registry):  # type: ignore[no-untyped-def]
    image = odd_image(tmp_path_factory.mktemp("odd-oci"))
    return image, push(image, registry, "pipeline/odd")


def test_embedded_schedule_prewarms_every_odd_layer_like_umoci(tmp_path: Path, registry: Registry, odd) -> None:
    # Given the odd image (pigz members, FNAME/FEXTRA, plain tar, zstd, whiteouts, devices...)
    image, ref = odd
    env = clean_env(tmp_path / "store", **SPANS)
    # When it is scheduled with no broker configured (embedded Redis and workers), zTOCs built
    proc = prewarm("schedule", ref, "--wait", "--index", "build", "--insecure-registry", registry.host,
                   "--json", env=env)
    # Then the job succeeded and says so
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["state"] == "succeeded"
    assert summary["bytes_done"] == summary["bytes_total"] == sum(layer.size for layer in image.layers)
    # And the layers, overlay-mounted, are exactly umoci's rootfs
    assert_matches_umoci(image, ref, env, tmp_path)
    # And `prewarm images` lists it as ready
    listed = json.loads(prewarm("images", "--json", env=env, check=True).stdout)
    assert [(i["name"], i["state"], i["layers"]) for i in listed] == [(ref, "ready", len(image.layers))]


def test_a_second_schedule_fetches_no_layer_byte(tmp_path: Path, registry: Registry) -> None:
    # Given a pre-warmed image
    image = simple_image(tmp_path / "oci")
    ref = push(image, registry, "pipeline/again")
    env = clean_env(tmp_path / "store")
    prewarm("schedule", ref, "--wait", "--insecure-registry", registry.host, env=env, check=True)
    layer_bytes = lambda: sum(registry.bytes_served(f"/blobs/{l.digest}") for l in image.layers)
    served = layer_bytes()
    assert served >= sum(layer.size for layer in image.layers)
    # When it is scheduled again
    proc = prewarm("schedule", ref, "--wait", "--insecure-registry", registry.host, env=env, check=True)
    # Then no layer byte left the registry and the user is told nothing was fetched
    assert layer_bytes() == served
    assert "nothing fetched" in proc.stdout


def test_an_unknown_image_is_a_clear_error_and_the_store_is_untouched(tmp_path: Path, registry: Registry) -> None:
    env = clean_env(tmp_path / "store")
    proc = prewarm("schedule", f"{registry.host}/pipeline/nope:missing", "--wait",
                   "--insecure-registry", registry.host, env=env)
    assert proc.returncode == 1
    assert "not found" in proc.stderr.lower()
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store" / "layers").exists()


def test_a_malformed_reference_is_a_clear_error(tmp_path: Path) -> None:
    proc = prewarm("schedule", "UPPER/Case::bad", env=clean_env(tmp_path / "store"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "UPPER/Case::bad" in proc.stderr


def test_a_disk_too_small_is_refused_before_any_download(tmp_path: Path, registry: Registry, odd) -> None:
    import subprocess

    # Given a store on a 4 MiB tmpfs and an image of about 50 MB
    image, ref = odd
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(store)], check=True)
    try:
        served = sum(registry.bytes_served(f"/blobs/{l.digest}") for l in image.layers)
        # When it is scheduled
        proc = prewarm("schedule", ref, "--wait", "--insecure-registry", registry.host, env=clean_env(store))
        # Then a clear space error, no traceback, no layer byte fetched, nothing in the store
        assert proc.returncode == 7, proc.stderr
        assert "space" in proc.stderr.lower() and str(store) in proc.stderr
        assert "Traceback" not in proc.stderr
        after = sum(registry.bytes_served(f"/blobs/{l.digest}") for l in image.layers)
        assert after - served <= 4 * len(image.layers)  # only the 4-byte gzip trailers for the estimate
        assert not (store / "layers").exists() or not any((store / "layers").rglob("ready"))
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_a_task_lands_several_adjacent_spans_from_one_request(tmp_path: Path, registry: Registry, odd) -> None:
    # Given the odd image, 3 spans per task (so most layers end with a shorter task)
    image, ref = odd
    env = clean_env(tmp_path / "store", PREWARM_SPANS_PER_TASK="3", **SPANS)
    before = {layer.digest: len(registry.requests_logged("GET", f"/blobs/{layer.digest}"))
              for layer in image.layers}
    # When it is scheduled with zTOCs built on the way
    proc = prewarm("schedule", ref, "--wait", "--index", "build", "--insecure-registry", registry.host,
                   "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    (node,) = summary["nodes"].values()
    # Then there is one task per 3 spans of each indexed layer, plus one per whole layer
    ztocs = [parse_ztoc(p.read_bytes()) for p in (tmp_path / "store" / "ztoc" / "sha256").iterdir()]
    indexed = {z.compressed_archive_size for z in ztocs}
    spans = [z.num_spans for z in ztocs]
    assert max(spans) > 3 and any(n % 3 for n in spans)
    whole = [layer for layer in image.layers if layer.size not in indexed]
    assert node["tasks_finished"] == node["tasks_total"] == sum(-(-n // 3) for n in spans) + len(whole)
    # And each indexed layer's spans came in that many Range requests (after the one GET
    # that built its zTOC and the tail read of the space check)
    for layer in image.layers:
        z = next((z for z in ztocs if z.compressed_archive_size == layer.size), None)
        if z is not None:
            gets = len(registry.requests_logged("GET", f"/blobs/{layer.digest}")) - before[layer.digest]
            assert gets == -(-z.num_spans // 3) + 2, layer.digest
    # And the result is still exactly umoci's rootfs
    assert summary["state"] == "succeeded"
    assert_matches_umoci(image, ref, env, tmp_path)
