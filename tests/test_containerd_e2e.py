"""Pre-warmed images registered in a REAL containerd (Debian's 1.6, CRI on, the shim as its
``prewarm`` proxy snapshotter) by ``prewarm schedule --containerd``, against the real local
registry: what the kubelet's pull fetches, what a container sees, a shim crash, and the
merged rootfs against ``umoci unpack``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prewarm.errors import ContainerdUnavailable
from prewarm.runtime.containerd import ContainerdClient, register_image
from prewarm.runtime.images import find_record
from prewarm.runtime.shim._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from prewarm.runtime.shim._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)
from prewarm.runtime.shim._proto.runtime.v1 import api_pb2 as cri
from prewarm.store.layout import Layout
from tests.containerd import (
    WHITEOUT,
    Containerd,
    HandmadeImage,
    cri_images,
    cri_pull,
    make_image,
    make_layer,
    push_image,
    run_containerd,
    shell_files,
)
from tests.images import odd_image, simple_image
from tests.pipeline_helpers import clean_env, prewarm, push, start_worker
from tests.rootfs import overlay_mount, umoci_unpack
from tests.services import Registry, wait_until
from tests.treecompare import compare_trees

SCRIPT = ("while read l; do echo $l; done < /etc/hello; while read l; do echo $l; done < /etc/top; "
          "[ -e /etc/gone ] && echo gone-present || echo gone-absent")


@pytest.fixture()
def node(tmp_path: Path, registry: Registry) -> Iterator[Containerd]:
    """containerd with CRI whose prewarm shim serves the node's PREWARM_ROOT."""
    with run_containerd(tmp_path / "store", cri=True, registry_hosts={registry.host: registry.url}) as ctrd:
        yield ctrd


def shell_image(repo_name: str) -> HandmadeImage:
    # The base names the repository too: the registry's log is shared by the session, so a layer
    # digest must be this test's own for its byte counts to mean anything.
    base = make_layer({**shell_files(), "etc/hello": b"hello from the store\n", "etc/gone": b"x\n",
                       "etc/image": repo_name.encode()})
    top = make_layer({"etc/gone": WHITEOUT, "etc/top": f"top of {repo_name}\n".encode()})
    return make_image(repo_name, [base, top])


def layer_bytes(registry: Registry, image: HandmadeImage) -> dict[str, int]:
    return {l.digest: registry.bytes_served(f"/blobs/{l.digest}") for l in image.layers}


def schedule(ref: str, node: Containerd, registry: Registry, *extra: str) -> None:
    env = clean_env(node.store)
    prewarm("schedule", ref, "--wait", "--quiet", "--index", "none", "--insecure-registry", registry.host,
            "--containerd", str(node.address), "--namespace", "k8s.io", *extra, env=env, check=True)


def run(node: Containerd, ref: str, cid: str) -> list[str]:
    return node.ctr("run", "--rm", "--snapshotter", "prewarm", ref, cid, "/bin/sh", "-c", SCRIPT,
                    namespace="k8s.io").stdout.split()


def test_registered_image_pulls_with_no_layer_runs_and_survives_a_shim_kill(
        node: Containerd, registry: Registry, repo_name: str) -> None:
    # Given an image with a shell and a whiteout, pre-warmed by `prewarm schedule --containerd`
    image = shell_image(repo_name)
    ref = push_image(registry.url, repo_name, "v1", image)
    schedule(ref, node, registry)
    warmed = layer_bytes(registry, image)
    assert all(warmed[l.digest] >= len(l.blob) for l in image.layers)

    # Then containerd already lists the image in CRI's namespace, labelled with its top snapshot
    assert ref in node.ctr("images", "ls", "-q", namespace="k8s.io").stdout.split()
    images = cri_images(node)
    status = images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout=30)
    assert status.image.id, "CRI does not report the registered image as present"

    # When the kubelet's path pulls it (CRI PullImage)
    started = time.perf_counter()
    cri_pull(images, ref)
    print(f"\nCRI PullImage of the pre-warmed image: {time.perf_counter() - started:.3f}s")

    # Then no layer byte left the registry for it
    assert layer_bytes(registry, image) == warmed
    # And a container runs from the pre-warmed layers, whiteout applied
    expected = ["hello", "from", "the", "store", "top", "of", *repo_name.split(), "gone-absent"]
    assert run(node, ref, "e2e-1") == expected

    # When the shim is SIGKILLed and started again
    node.kill_shim()
    node.start_shim()
    # Then the registered image still runs, with still no layer fetched
    assert run(node, ref, "e2e-2") == expected
    assert layer_bytes(registry, image) == warmed


def test_registration_is_idempotent_and_containerd_gc_keeps_the_snapshots(
        node: Containerd, registry: Registry, repo_name: str) -> None:
    # Given a registered image
    image = shell_image(repo_name)
    ref = push_image(registry.url, repo_name, "v1", image)
    schedule(ref, node, registry)

    # When it is registered again (schedule of a pre-warmed image) and containerd's gc runs
    schedule(ref, node, registry)
    node.ctr("content", "prune", "references", namespace="k8s.io", check=False)
    node.collect_garbage()
    # Then the image is listed once, and its snapshots are still in containerd's database
    assert node.ctr("images", "ls", "-q", namespace="k8s.io").stdout.split().count(ref) == 1
    snaps = node.ctr("snapshots", "--snapshotter", "prewarm", "ls", namespace="k8s.io").stdout
    record = find_record(Layout(node.store), ref)
    assert record is not None
    assert all(chain in snaps for chain in record.chain_ids)
    assert run(node, ref, "e2e-3")[-1] == "gone-absent"


def test_partly_prewarmed_image_pulls_the_missing_layer_through_containerd(
        node: Containerd, registry: Registry, repo_name: str) -> None:
    # Given an image whose base layer is pre-warmed (registered through another image) but not its top
    image = shell_image(repo_name)
    base_only = make_image(repo_name + "-base", image.layers[:1])
    schedule(push_image(registry.url, repo_name + "-base", "v1", base_only), node, registry)
    ref = push_image(registry.url, repo_name, "v1", image)
    before = layer_bytes(registry, image)

    # When CRI pulls the full image
    cri_pull(cri_images(node), ref)

    # Then only the missing layer came from the registry, and the image runs
    base, top = image.layers
    after = layer_bytes(registry, image)
    assert after[base.digest] == before[base.digest]
    assert after[top.digest] == before[top.digest] + len(top.blob)
    assert run(node, ref, "e2e-4")[-1] == "gone-absent"


def merged_rootfs_matches_umoci(node: Containerd, chain: str, layout_dir: Path, tag: str, tmp: Path) -> list[str]:
    """View the top chain through containerd, mount what containerd says, compare with umoci's unpack.

    The view is made under a lease, as containerd's clients make theirs: without one,
    containerd's garbage collector may remove it at any moment.
    """
    with node.lease() as lease, node.snapshots_channel() as channel:
        stub = pb_grpc.SnapshotsStub(channel)
        md = (("containerd-namespace", "k8s.io"), ("containerd-lease", lease))
        view = stub.View(pb.ViewSnapshotRequest(snapshotter="prewarm", key=f"e2e-view-{tag}", parent=chain),
                         metadata=md)
        try:
            node.collect_garbage()  # the lease keeps the view (and the snapshots under it)
            [mount] = view.mounts
            options = list(mount.options)
            if mount.type == "overlay":
                lowers = next(o for o in options if o.startswith("lowerdir=")).split("=", 1)[1].split(":")
            else:
                lowers = [mount.source]
            expected = umoci_unpack(layout_dir, tag, tmp / "umoci")
            with overlay_mount(lowers, tmp / "merged") as merged:
                return compare_trees(expected, merged)
        finally:
            stub.Remove(pb.RemoveSnapshotRequest(snapshotter="prewarm", key=f"e2e-view-{tag}"), metadata=md)


@pytest.mark.parametrize("build", [simple_image, odd_image], ids=["simple", "odd"])
def test_merged_rootfs_of_registered_image_equals_umoci(node: Containerd, registry: Registry, repo_name: str,
                                                        tmp_path: Path, build) -> None:  # type: ignore[no-untyped-def]
    # Given a test image pre-warmed and registered (odd: zstd and plain tar layers too)
    image = build(tmp_path / "oci")
    ref = push(image, registry, repo_name)
    schedule(ref, node, registry)
    record = find_record(Layout(node.store), ref)
    assert record is not None
    served = registry.bytes_served("/blobs/")
    # When containerd's view of the top chain is mounted
    diffs = merged_rootfs_matches_umoci(node, record.chain_ids[-1], image.layout, image.tag, tmp_path)
    # Then it is exactly umoci's rootfs; containerd applied nothing: the shim answered every layer
    # from the store and no blob left the registry after the pre-warm
    assert diffs == [], "\n".join(diffs[:40])
    assert node.shim_log.read_text().count("answering ALREADY_EXISTS") == len(record.chain_ids)
    assert registry.bytes_served("/blobs/") == served


def test_unreachable_containerd_is_a_clear_error(tmp_path: Path, registry: Registry, repo_name: str) -> None:
    # Given an image and a containerd socket that does not exist
    image = simple_image(tmp_path / "oci")
    ref = push(image, registry, repo_name)
    env = clean_env(tmp_path / "store")
    served = registry.bytes_served("/blobs/")
    # When schedule is asked to register it there
    proc = prewarm("schedule", ref, "--wait", "--quiet", "--insecure-registry", registry.host,
                   "--containerd", str(tmp_path / "nope.sock"), env=env)
    # Then it refuses before anything is fetched (exit 2), in one line naming the socket and what to do
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "nope.sock" in proc.stderr and "start containerd" in proc.stderr
    assert registry.bytes_served("/blobs/") == served
    assert find_record(Layout(tmp_path / "store"), ref) is None
    # And once the image is pre-warmed, the library raises the Transient subclass for that socket
    prewarm("schedule", ref, "--wait", "--quiet", "--insecure-registry", registry.host, env=env, check=True)
    record = find_record(Layout(tmp_path / "store"), ref)
    assert record is not None
    with pytest.raises(ContainerdUnavailable):
        register_image(ContainerdClient(tmp_path / "nope.sock"), Layout(tmp_path / "store"), record,
                       *_blobs(image))


def _blobs(image) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    index = json.loads((image.layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = (image.layout / "blobs" / "sha256" / manifest_digest.split(":")[1]).read_bytes()
    config_digest = json.loads(manifest)["config"]["digest"]
    return manifest, (image.layout / "blobs" / "sha256" / config_digest.split(":")[1]).read_bytes()


def test_fleet_worker_registers_the_image_it_completes(node: Containerd, registry: Registry, redis_url: str,
                                                       repo_name: str, tmp_path: Path) -> None:
    # Given a worker of node n1 on the shim's store, told to register in the node's containerd
    image = shell_image(repo_name)
    ref = push_image(registry.url, repo_name, "v1", image)
    env = clean_env(node.store, PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                    PREWARM_NODE_NAME="n1")
    worker = start_worker({**env, "PREWARM_CONTAINERD_ADDRESS": str(node.address)}, tmp_path / "w.log", "-c", "2")
    try:
        # When the fleet schedules the image on n1 and waits
        prewarm("schedule", ref, "--node", "n1", "--wait", "--quiet", "--index", "none", env=env, check=True)
        # Then the worker registered it in containerd's k8s.io namespace
        wait_until(lambda: ref in node.ctr("images", "ls", "-q", namespace="k8s.io").stdout.split(),
                   timeout=60, what=f"{ref} in containerd ({worker.log})")
    finally:
        worker.stop()
    warmed = layer_bytes(registry, image)
    # And CRI pulls it with no layer byte and it runs on the pre-warmed layers
    cri_pull(cri_images(node), ref)
    assert layer_bytes(registry, image) == warmed
    assert run(node, ref, "e2e-5")[-1] == "gone-absent"
    # And schedule --containerd with a fleet says where the option belongs instead
    proc = prewarm("schedule", ref, "--node", "n1", "--containerd", str(node.address), env=env)
    assert proc.returncode == 2 and "prewarm worker" in proc.stderr and "Traceback" not in proc.stderr


def test_rm_and_gc_keep_layers_a_snapshot_uses_and_remove_the_rest(node: Containerd, registry: Registry,
                                                                   repo_name: str) -> None:
    # Given image A (base + top) and image B (A's base only), both pre-warmed and registered
    image = shell_image(repo_name)
    ref_a = push_image(registry.url, repo_name, "v1", image)
    ref_b = push_image(registry.url, repo_name + "-base", "v1", make_image(repo_name + "-base", image.layers[:1]))
    schedule(ref_a, node, registry)
    schedule(ref_b, node, registry)
    env = clean_env(node.store)
    layout = Layout(node.store)
    base, top = image.layers
    record_a = find_record(layout, ref_a)
    assert record_a is not None

    # When A is removed from prewarm's records
    prewarm("rm", ref_a, env=env, check=True)
    # Then `prewarm images` lists B only, and A's top layer stays: containerd's snapshot still uses it
    listed = json.loads(prewarm("images", "--json", env=env, check=True).stdout)
    assert [i["name"] for i in listed] == [ref_b]
    assert layout.layer_ready(top.digest).is_file() and layout.layer_ready(base.digest).is_file()
    assert "nothing to remove" in prewarm("gc", env=env, check=True).stdout
    assert run(node, ref_a, "e2e-6")[-1] == "gone-absent"

    # When containerd drops A and its top snapshot (the shim loses it in containerd's gc pass)
    node.ctr("images", "rm", ref_a, namespace="k8s.io")
    node.ctr("snapshots", "--snapshotter", "prewarm", "rm", record_a.chain_ids[-1], namespace="k8s.io")
    node.collect_garbage()
    assert top.digest in prewarm("gc", "--dry-run", env=env, check=True).stdout
    # Then gc removes the top layer, which nothing uses any more, and keeps the base B needs
    assert prewarm("gc", env=env, check=True).stdout.split() == ["removed", top.digest]
    assert not layout.layer(top.digest).exists() and layout.layer_ready(base.digest).is_file()
    out = node.ctr("run", "--rm", "--snapshotter", "prewarm", ref_b, "e2e-7", "/bin/sh", "-c",
                   "while read l; do echo $l; done < /etc/hello", namespace="k8s.io").stdout
    assert out.split() == ["hello", "from", "the", "store"]


def test_bad_namespace_is_a_clear_error(tmp_path: Path, registry: Registry, repo_name: str) -> None:
    # Given a pre-warmed image and a containerd (no CRI needed)
    image = simple_image(tmp_path / "oci")
    ref = push(image, registry, repo_name)
    with run_containerd(tmp_path / "store") as ctrd:
        env = clean_env(ctrd.store)
        # When schedule registers it under a namespace containerd refuses
        proc = prewarm("schedule", ref, "--wait", "--quiet", "--insecure-registry", registry.host,
                       "--containerd", str(ctrd.address), "--namespace", "Bad NS!", env=env)
        # Then one line names the namespace and what to use, and containerd got no image
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert "namespace 'Bad NS!'" in proc.stderr and "--namespace k8s.io" in proc.stderr
        assert ctrd.ctr("images", "ls", "-q", namespace="k8s.io").stdout.split() == []
