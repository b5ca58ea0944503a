"""gc against running jobs and the shim, with a real concurrent gc (issue 13 item 5).

The job runs on a real worker, Redis and registry, slowed by a fleet budget so that some
of its layers are ready while others are still landing; ``prewarm gc`` runs on the
node's store in the middle.  The shim and the record check are driven as libraries
against a real store, with the gc side holding the same lock a real gc takes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from prewarm.errors import SnapshotExists, StoreError
from prewarm.fleet.plan import plan_image
from prewarm.imagebuild import BuiltImage
from prewarm.runtime import gc
from prewarm.runtime.images import record_prewarmed_image
from prewarm.runtime.snapshot.overlay import OverlaySnapshotter
from prewarm.runtime.snapshot.snapshotter import LABEL_SNAPSHOT_REF
from prewarm.store.content import ContentStore
from prewarm.store.layout import Layout
from tests.containerd import install_prewarmed, make_layer
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


def _layers(image: BuiltImage) -> list[str]:
    index = json.loads((image.layout / "index.json").read_text())
    algo, hexd = index["manifests"][0]["digest"].split(":")
    manifest = json.loads((image.layout / "blobs" / algo / hexd).read_bytes())
    return [layer["digest"] for layer in manifest["layers"]]


def test_gc_during_a_job_keeps_its_layers_and_the_job_report_matches_the_store(
        tmp_path: Path, registry: Registry, redis_url: str) -> None:
    image = odd_image(tmp_path / "oci")
    ref = push(image, registry, "gc/races")
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                    PREWARM_NODE_NAME="g1", PREWARM_VISIBILITY_TIMEOUT="30", **SPANS)
    store = ContentStore(Path(env["PREWARM_ROOT"]))
    layers = _layers(image)
    # Given a job slowed by the fleet budget, so some layers are ready while others land
    prewarm("budget", registry.host, "--rate", "2MB", "--burst", "256KB", env=env, check=True)
    worker = start_worker(env, tmp_path / "w.log", "-c", "2", "--hostname", "w@g1")
    removed: list[str] = []
    try:
        job = prewarm("schedule", ref, "--node", "g1", "--index", "build", env=env, check=True).stdout.strip()
        deadline = time.monotonic() + 120
        while not any(store.is_ready(d) for d in layers):
            assert time.monotonic() < deadline, "no layer became ready"
            time.sleep(0.05)
        assert not all(store.is_ready(d) for d in layers), "gc must run mid-job"
        # When prewarm gc runs on the node's store, twice, while the job goes on
        for _ in range(2):
            out = prewarm("gc", env=env, check=True).stdout
            removed += [line.split()[-1] for line in out.splitlines() if line.startswith("removed ")]
        final = wait_job(job, env, timeout=240)
    finally:
        worker.stop()
        prewarm("budget", registry.host, "--clear", env=env)
    # Then gc removed none of the job's layers, the job succeeded, and the store backs it
    assert not set(removed) & set(layers), removed
    assert final["state"] == "succeeded", (final, worker.log.read_text()[-3000:])
    assert all(store.is_ready(d) for d in layers)
    assert_matches_umoci(image, ref, env, tmp_path)
    # And once the image is recorded its pin is gone: gc keeps the layers for the record alone
    assert not list(Layout(store.root).pins_dir().glob("*.json"))
    assert "nothing to remove" in prewarm("gc", env=env, check=True).stdout


def test_a_fresh_pin_keeps_a_ready_layer_and_a_stale_one_does_not(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layer = make_layer({"etc/a": b"a\n"})
    install_prewarmed(tmp_path, [layer])
    for chain in layout.chains_dir().rglob("*.json"):
        chain.unlink()
    gc.pin(layout, "job1", [layer.digest])
    assert gc.collect(layout) == []
    pin = layout.pins_dir() / "job1.json"
    old = time.time() - gc.PIN_TTL - 60
    os.utime(pin, (old, old))
    assert gc.collect(layout) == [layer.digest]


def test_gc_decides_again_under_the_lock(tmp_path: Path) -> None:
    """A job that pins its layer after gc listed what is used still keeps it."""
    layout = Layout(tmp_path)
    layer = make_layer({"etc/a": b"a\n"})
    install_prewarmed(tmp_path, [layer])
    store = ContentStore(tmp_path)
    # Given a writer holding the layer's lock while gc starts
    with store.layer_lock(layer.digest):
        result: list[list[str]] = []
        t = threading.Thread(target=lambda: result.append(gc.collect(layout)))
        t.start()
        t.join(10)
    # Then gc skipped the locked layer rather than waiting or removing it
    assert result == [[]] and store.is_ready(layer.digest)


def test_the_shim_never_hands_containerd_a_layer_gc_is_removing(tmp_path: Path) -> None:
    layer = make_layer({"etc/a": b"a\n"})
    (chain,) = install_prewarmed(tmp_path, [layer])
    store = ContentStore(tmp_path)
    sn = OverlaySnapshotter(tmp_path)
    outcome: list[object] = []

    def prepare() -> None:
        try:
            outcome.append(sn.prepare("default", "extract", "", {LABEL_SNAPSHOT_REF: chain}))
        except SnapshotExists as err:
            outcome.append(err)

    try:
        # Given gc holding the layer's lock, about to remove it
        with store.layer_lock(layer.digest):
            t = threading.Thread(target=prepare)
            t.start()
            time.sleep(0.5)
            # Then the shim waits for it rather than committing a snapshot on the layer
            assert not outcome and t.is_alive()
            store.remove_layer_locked(layer.digest)
        t.join(10)
        # And, the layer gone, containerd gets an ordinary snapshot to apply into
        assert outcome and isinstance(outcome[0], list), outcome
        assert sn.stat("default", "extract").kind.name == "ACTIVE"
    finally:
        sn.close()


def test_a_job_never_reports_an_image_whose_layer_gc_removed(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    a, b = make_layer({"a": b"1"}), make_layer({"b": b"2"})
    install_prewarmed(tmp_path, [a, b])
    plan = plan_image(reference="reg.invalid/x:1", manifest_digest=a.digest, config_digest=b.digest,
                      layers=[(a.digest, len(a.blob), "application/vnd.oci.image.layer.v1.tar+gzip"),
                              (b.digest, len(b.blob), "application/vnd.oci.image.layer.v1.tar+gzip")],
                      diff_ids=[a.diff_id, b.diff_id], span_layers={})
    ContentStore(tmp_path).remove_layer(b.digest)
    with pytest.raises(StoreError, match="removed|proves"):
        record_prewarmed_image(layout, "reg.invalid/x:1", plan)


def test_a_fleet_node_checks_its_space_before_it_fetches(tmp_path: Path, registry: Registry, redis_url: str) -> None:
    """Issue 13 item 11: the space check of the embedded scheduler, on a fleet worker too."""
    import subprocess

    from tests.images import simple_image

    image = simple_image(tmp_path / "oci")
    ref = push(image, registry, "gc/space")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        env = clean_env(small / "store", PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                        PREWARM_NODE_NAME="tiny", **SPANS)
        worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@tiny")
        try:
            job = prewarm("schedule", ref, "--node", "tiny", env=env, check=True).stdout.strip()
            final = wait_job(job, env, timeout=120)
        finally:
            worker.stop()
        # Then every layer failed with the reason, and nothing was written to the store
        assert final["state"] == "failed", final
        errors = final["nodes"]["tiny"]["errors"]
        assert errors and all("not enough space" in e for e in errors.values()), errors
        assert ContentStore(small / "store").list_layers() == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
