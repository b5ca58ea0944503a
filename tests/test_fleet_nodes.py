"""Three workers as three nodes on one machine (issue 6 "Done when"), plus --keep, --selector,
cancel and --dry-run across nodes.

Each node is a ``prewarm worker`` process with its own PREWARM_NODE_NAME and PREWARM_ROOT,
all against one real redis-server and docker-registry.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from prewarm.imagebuild import BuiltImage
from prewarm.store.content import ContentStore
from tests.images import odd_image, simple_image
from tests.pipeline_helpers import (
    Worker,
    assert_matches_umoci,
    clean_env,
    prewarm,
    push,
    start_worker,
    wait_job,
)
from tests.services import RedisServer, Registry

SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20)}
NODES = ("n1", "n2", "n3")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> list[tuple[BuiltImage, str]]:
    """Two images, each pushed with its SOCI index."""
    out = []
    env = clean_env(tmp_path_factory.mktemp("indexer"), PREWARM_INSECURE_REGISTRIES=registry.host, **SPANS)
    for name, build in (("odd", odd_image), ("simple", simple_image)):
        image = build(tmp_path_factory.mktemp(f"{name}-nodes-oci"))
        ref = push(image, registry, f"fleet/nodes-{name}")
        prewarm("index", ref, "--push", env=env, check=True)
        out.append((image, ref))
    return out


def compare_dir(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir()
    return path


def node_env(tmp: Path, node: str, redis_url: str, registry: Registry, labels: str = "") -> dict[str, str]:
    return clean_env(tmp / f"store-{node}", PREWARM_BROKER_URL=redis_url, PREWARM_VISIBILITY_TIMEOUT="4",
                     PREWARM_INSECURE_REGISTRIES=registry.host, PREWARM_NODE_NAME=node,
                     PREWARM_NODE_LABELS=labels, **SPANS)


def start_node(tmp: Path, env: dict[str, str], tag: str = "") -> Worker:
    node = env["PREWARM_NODE_NAME"]
    return start_worker(env, tmp / f"{node}{tag}.log", "-c", "2", "--hostname", f"w{tag}@{node}")


def wait_nodes(env: dict[str, str], names: set[str], timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = json.loads(prewarm("nodes", "--json", env=env, check=True).stdout)
        if names <= {n["name"] for n in nodes}:
            return nodes
        time.sleep(0.2)
    raise AssertionError(f"nodes {names} did not register: {nodes}")


def test_three_nodes_two_images_under_a_budget_survive_a_killed_worker_and_a_redis_restart(
        tmp_path: Path, registry: Registry, redis_server: RedisServer, redis_url: str,
        images: list[tuple[BuiltImage, str]]) -> None:
    envs = {n: node_env(tmp_path, n, redis_url, registry) for n in NODES}
    env = envs["n1"]
    prewarm("budget", registry.host, "--rate", "20MB", "--burst", "2MB", "--concurrency", "6", env=env, check=True)
    workers = {n: start_node(tmp_path, envs[n]) for n in NODES}
    try:
        wait_nodes(env, set(NODES))
        # When both images are scheduled on all nodes
        job_ids = [prewarm("schedule", ref, "--all-nodes", env=env, check=True).stdout.strip() for _, ref in images]
        # And, mid-job, n2's worker is SIGKILLed, Redis restarted, and n2's worker started again
        deadline = time.monotonic() + 60
        while (before := json.loads(prewarm("status", job_ids[0], "--json", env=env, check=True).stdout)
               )["bytes_done"] == 0:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.1)
        assert before["bytes_done"] < before["bytes_total"], "the faults must land mid-job"
        workers["n2"].kill()
        redis_server.restart()
        workers["n2"] = start_node(tmp_path, envs["n2"], tag="-again")
        finals = [wait_job(job, env, timeout=240) for job in job_ids]
    finally:
        for w in workers.values():
            w.stop()
    # Then both jobs report success on every node, and the report is true
    for final in finals:
        assert final["state"] == "succeeded", final
        assert sorted(final["nodes"]) == list(NODES)
    for n in NODES:
        for i, (image, ref) in enumerate(images):
            assert_matches_umoci(image, ref, envs[n], compare_dir(tmp_path, f"cmp-{n}-{i}"))


def test_keep_warms_a_node_that_joins_later_and_selector_picks_by_label(
        tmp_path: Path, registry: Registry, redis_url: str, images: list[tuple[BuiltImage, str]]) -> None:
    image, ref = images[1]
    gpu = node_env(tmp_path, "gpu1", redis_url, registry, labels="pool=gpu")
    cpu = node_env(tmp_path, "cpu1", redis_url, registry, labels="pool=cpu")
    late = node_env(tmp_path, "gpu2", redis_url, registry, labels="pool=gpu")
    workers = [start_node(tmp_path, gpu), start_node(tmp_path, cpu)]
    try:
        wait_nodes(gpu, {"gpu1", "cpu1"})
        # When a standing schedule is made for pool=gpu
        job = prewarm("schedule", ref, "--selector", "pool=gpu", "--keep", env=gpu, check=True).stdout.strip()
        deadline = time.monotonic() + 60
        while json.loads(prewarm("status", job, "--json", env=gpu, check=True).stdout)["state"] != "succeeded":
            assert time.monotonic() < deadline, "gpu1 was not warmed"
            time.sleep(0.2)
        # And a gpu node starts its worker only afterwards
        workers.append(start_node(tmp_path, late))
        deadline = time.monotonic() + 60
        while True:
            status = json.loads(prewarm("status", job, "--json", env=gpu, check=True).stdout)
            if "gpu2" in status["nodes"] and status["state"] == "succeeded":
                break
            assert time.monotonic() < deadline, f"gpu2 did not join and finish: {status}"
            time.sleep(0.2)
    finally:
        for w in workers:
            w.stop()
    # Then both gpu nodes hold the image, and the cpu node was never part of the job
    assert sorted(status["nodes"]) == ["gpu1", "gpu2"]
    assert_matches_umoci(image, ref, gpu, compare_dir(tmp_path, "cmp-gpu1"))
    assert_matches_umoci(image, ref, late, compare_dir(tmp_path, "cmp-gpu2"))
    assert not ContentStore(Path(cpu["PREWARM_ROOT"])).is_ready(_first_layer(image))


def _first_layer(image: BuiltImage) -> str:
    index = json.loads((image.layout / "index.json").read_text())
    algo, hexd = index["manifests"][0]["digest"].split(":")
    manifest = json.loads((image.layout / "blobs" / algo / hexd).read_bytes())
    return manifest["layers"][0]["digest"]


def test_cancel_stops_the_work_and_leaves_every_store_consistent(
        tmp_path: Path, registry: Registry, redis_url: str, images: list[tuple[BuiltImage, str]]) -> None:
    image, ref = images[0]
    envs = {n: node_env(tmp_path, n, redis_url, registry) for n in ("c1", "c2")}
    env = envs["c1"]
    prewarm("budget", registry.host, "--rate", "4MB", "--burst", "1MB", env=env, check=True)
    workers = [start_node(tmp_path, e) for e in envs.values()]
    try:
        wait_nodes(env, set(envs))
        job = prewarm("schedule", ref, "--all-nodes", env=env, check=True).stdout.strip()
        deadline = time.monotonic() + 60
        while json.loads(prewarm("status", job, "--json", env=env, check=True).stdout)["bytes_done"] == 0:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.1)
        # When the job is cancelled mid-way
        prewarm("cancel", job, env=env, check=True)
        final = wait_job(job, env, timeout=120)
        # Then it reports cancelled (not success)
        assert final["state"] == "cancelled", final
        assert final["bytes_done"] < final["bytes_total"]
        # And each store is consistent: the image scheduled again, unthrottled, completes from
        # what the cancelled job left, and every node's tree equals umoci's
        prewarm("budget", registry.host, "--clear", env=env, check=True)
        again = wait_job(prewarm("schedule", ref, "--all-nodes", env=env, check=True).stdout.strip(), env)
    finally:
        for w in workers:
            w.stop()
    assert again["state"] == "succeeded", again
    for n, e in envs.items():
        assert_matches_umoci(image, ref, e, compare_dir(tmp_path, f"cmp-{n}"))


def _manifest_and_config(image: BuiltImage) -> tuple[dict, dict]:
    index = json.loads((image.layout / "index.json").read_text())
    manifest = json.loads(_blob_of(image, index["manifests"][0]["digest"]))
    return manifest, json.loads(_blob_of(image, manifest["config"]["digest"]))


def _blob_of(image: BuiltImage, digest: str) -> bytes:
    algo, hexd = digest.split(":")
    return (image.layout / "blobs" / algo / hexd).read_bytes()


def test_dry_run_prints_per_node_present_fetch_egress_free_and_time(
        tmp_path: Path, registry: Registry, redis_url: str, images: list[tuple[BuiltImage, str]]) -> None:
    image, ref = images[1]
    manifest, config = _manifest_and_config(image)
    layers = manifest["layers"]
    total = sum(layer["size"] for layer in layers)
    envs = {n: node_env(tmp_path, n, redis_url, registry) for n in ("d1", "d2")}
    # Given d2 already holds the image's first layer (committed straight into its store)
    held = layers[0]
    ContentStore(Path(envs["d2"]["PREWARM_ROOT"])).ingest_stream(
        held["digest"], [_blob_of(image, held["digest"])], media_type=held["mediaType"],
        diff_id=config["rootfs"]["diff_ids"][0])
    workers = [start_node(tmp_path, e) for e in envs.values()]
    try:
        wait_nodes(envs["d1"], set(envs))
        # When a dry run is asked for, as a table and as JSON
        out = prewarm("schedule", ref, "--all-nodes", "--dry-run", env=envs["d1"], check=True).stdout
        report = json.loads(prewarm("schedule", ref, "--all-nodes", "--dry-run", "--json", env=envs["d1"],
                                    check=True).stdout)
    finally:
        for w in workers:
            w.stop()
    # Then the table has a line per node and names each column
    for node in envs:
        assert any(node in ln for ln in out.splitlines()), out
    lowered = out.lower()
    for word in ("present", "fetch", "egress", "free", "time"):
        assert word in lowered, out
    # And its figures are the image's: d1 fetches all of it, d2 all but the layer it holds
    rows = {row["node"]: row for row in report["nodes"]}
    assert rows["d1"]["present_bytes"] == 0 and rows["d1"]["fetch_bytes"] == total, report
    assert rows["d2"]["present_bytes"] == held["size"], report
    assert rows["d2"]["fetch_bytes"] == total - held["size"], report
    assert report["registry_egress"] == 2 * total - held["size"], report
    for row in rows.values():
        assert row["free_after"] is not None and row["free_after"] > 0, report
    assert rows["d1"]["seconds"] >= rows["d2"]["seconds"] >= 0, report
    # And nothing was fetched: d1 holds no layer, d2 only the one it was given
    assert not any(ContentStore(Path(envs["d1"]["PREWARM_ROOT"])).is_ready(l["digest"]) for l in layers)
    assert [l["digest"] for l in layers if ContentStore(Path(envs["d2"]["PREWARM_ROOT"])).is_ready(l["digest"])] \
        == [held["digest"]]
