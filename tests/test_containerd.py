"""The shim behind a REAL containerd (Debian's 1.6): ctr commands, the remote-snapshot
handshake, running a container on pre-warmed layers, and a shim crash in between."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from prewarm.runtime.shim._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from prewarm.runtime.shim._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)
from prewarm.runtime.snapshot.snapshotter import LABEL_GC_ROOT, LABEL_SNAPSHOT_REF
from prewarm.store.layout import chain_ids as compute_chain_ids
from tests.containerd import (
    WHITEOUT,
    Containerd,
    install_prewarmed,
    make_image,
    make_layer,
    oci_archive,
    run_containerd,
    shell_files,
)


@pytest.fixture()
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    with run_containerd(tmp_path / "store") as ctrd:
        yield ctrd


def shim_infos(ctrd: Containerd) -> dict[str, pb.Info]:
    """Every snapshot the shim itself holds, asked over its own socket.

    containerd 1.6 sends proxy plugins no namespace header (its backend keys carry the
    namespace), so neither do we here.
    """
    with grpc.insecure_channel(f"unix:{ctrd.shim_address}") as channel:
        stub = pb_grpc.SnapshotsStub(channel)
        out: dict[str, pb.Info] = {}
        for resp in stub.List(pb.ListSnapshotsRequest()):
            out.update({i.name: i for i in resp.info})
        return out


def test_ctr_snapshot_commands_reach_the_shim(containerd: Containerd) -> None:
    # Given containerd with the prewarm proxy snapshotter
    ctr = lambda *a: containerd.ctr("snapshots", "--snapshotter", "prewarm", *a)

    # When ctr prepares, commits and prepares a child through containerd
    ctr("prepare", "base-active")
    ctr("commit", "base", "base-active")
    ctr("prepare", "child", "base")
    mounts = ctr("mounts", "/mnt/x", "child").stdout

    # Then the shim holds them (containerd names them <ns>/<n>/<key>), with the right kinds
    infos = shim_infos(containerd)
    by_key = {name.rsplit("/", 1)[-1]: info for name, info in infos.items()}
    assert by_key["base"].kind == pb.COMMITTED
    assert by_key["child"].kind == pb.ACTIVE
    assert by_key["child"].parent == by_key["base"].name
    assert "overlay" in mounts and "lowerdir=" in mounts and "upperdir=" in mounts

    # When ctr removes them, containerd's garbage collector removes them from the shim too
    # (containerd deletes backend snapshots in its GC pass, right after the removal)
    ctr("rm", "child")
    ctr("rm", "base")
    containerd.collect_garbage(namespace="default")
    assert shim_infos(containerd) == {}


def prepare_like_the_unpacker(ctrd: Containerd, chain_ids: list[str]) -> list[grpc.StatusCode]:
    """Call containerd's Snapshots service the way its unpacker does, one Prepare per layer.

    containerd's metadata layer forwards each Prepare to the shim; on ALREADY_EXISTS it
    finds the committed snapshot with a List filter and records it in its own database.
    """
    codes = []
    with ctrd.snapshots_channel() as channel:
        stub = pb_grpc.SnapshotsStub(channel)
        parent = ""
        for chain_id in chain_ids:
            labels = {LABEL_SNAPSHOT_REF: chain_id, LABEL_GC_ROOT: "test"}
            try:
                stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="prewarm", key=f"extract-{uuid.uuid4()} {chain_id}",
                                                       parent=parent, labels=labels),
                             metadata=(("containerd-namespace", "default"),))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
            parent = chain_id
    return codes


def test_prewarmed_image_runs_on_store_layers_and_survives_a_shim_crash(containerd: Containerd,
                                                                       tmp_path: Path) -> None:
    # Given an image of two layers, the second deleting a file of the first, pre-warmed by
    # hand in the content store, and containerd holding only its manifest and config
    base = make_layer({**shell_files(), "etc/hello": b"hello from the store\n", "etc/gone": b"x\n"})
    top = make_layer({"etc/gone": WHITEOUT, "etc/top": b"top layer\n"})
    image = make_image("docker.io/prewarm/test:handshake", [base, top])
    chain_ids = install_prewarmed(containerd.store, [base, top])
    containerd.ctr("images", "import", "--no-unpack", str(oci_archive(image, tmp_path / "img.tar", with_layers=False)))

    # When containerd prepares each layer with containerd.io/snapshot.ref, as its unpacker does
    codes = prepare_like_the_unpacker(containerd, chain_ids)

    # Then the shim answers ALREADY_EXISTS for both and commits them from the store, no copy
    assert codes == [grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ALREADY_EXISTS]
    log = containerd.shim_log.read_text()
    assert log.count("answering ALREADY_EXISTS") == 2, log
    infos = shim_infos(containerd)
    assert infos[chain_ids[1]].kind == pb.COMMITTED and infos[chain_ids[1]].parent == chain_ids[0]

    # And ctr run on the prewarm snapshotter sees the files, the whiteout applied
    script = "while read l; do echo $l; done < /etc/hello; while read l; do echo $l; done < /etc/top; " \
             "[ -e /etc/gone ] && echo gone-present || echo gone-absent"
    out = containerd.ctr("run", "--rm", "--snapshotter", "prewarm", image.name, "run-1",
                         "/bin/sh", "-c", script).stdout
    assert out.split() == ["hello", "from", "the", "store", "top", "layer", "gone-absent"]

    # When the shim is killed (SIGKILL) and started again
    containerd.kill_shim()
    containerd.start_shim()

    # Then no snapshot is lost: the shim still has both layers and containerd runs the image again
    after = shim_infos(containerd)
    assert {chain_ids[0], chain_ids[1]} <= set(after)
    assert after[chain_ids[1]].created_at == infos[chain_ids[1]].created_at
    out = containerd.ctr("run", "--rm", "--snapshotter", "prewarm", image.name, "run-2",
                         "/bin/sh", "-c", script).stdout
    assert out.split()[-1] == "gone-absent"


def test_layer_that_is_not_prewarmed_is_prepared_normally(containerd: Containerd) -> None:
    # Given a base layer in the store but a second layer that is not
    base = make_layer({"etc/base": b"base\n"})
    missing = make_layer({"etc/missing": b"m\n"})
    chains = install_prewarmed(containerd.store, [base])
    all_chains = compute_chain_ids([base.diff_id, missing.diff_id])
    assert all_chains[0] == chains[0]

    # When containerd prepares both like its unpacker
    codes = prepare_like_the_unpacker(containerd, all_chains)

    # Then the first is provided and the second gets an ordinary active snapshot to apply into
    assert codes == [grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OK]
    infos = shim_infos(containerd)
    actives = [i for i in infos.values() if i.kind == pb.ACTIVE]
    assert len(actives) == 1 and actives[0].parent == all_chains[0]
