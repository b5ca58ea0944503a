"""The shim over real gRPC on a unix socket: status codes, streaming List, Usage, Mounts,
Cleanup, namespaces, the handshake, and the command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from prewarm.errors import ConfigError
from prewarm.runtime.shim._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from prewarm.runtime.shim._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)
from prewarm.runtime.shim.server import ShimServer, serve
from prewarm.runtime.snapshot.snapshotter import LABEL_SNAPSHOT_REF
from tests.containerd import install_prewarmed, make_layer
from tests.services import wait_until

NS = (("containerd-namespace", "default"),)


@pytest.fixture()
def shim(tmp_path: Path) -> Iterator[ShimServer]:
    server = serve(tmp_path / "run" / "shim.sock", tmp_path / "root")
    yield server
    server.stop()


@pytest.fixture()
def stub(shim: ShimServer) -> Iterator[pb_grpc.SnapshotsStub]:
    with grpc.insecure_channel(f"unix:{shim.address}") as channel:
        yield pb_grpc.SnapshotsStub(channel)


def code_of(call, *args, **kwargs) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code()


def test_errors_become_the_grpc_codes_containerd_expects(stub: pb_grpc.SnapshotsStub) -> None:
    # Given a committed base with an active child
    stub.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=NS)
    stub.Commit(pb.CommitSnapshotRequest(name="base", key="a"), metadata=NS)
    stub.Prepare(pb.PrepareSnapshotRequest(key="child", parent="base"), metadata=NS)

    # Then each misuse maps to its code (errdefs on containerd's side)
    assert code_of(stub.Stat, pb.StatSnapshotRequest(key="nope"), metadata=NS) == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="child"), metadata=NS) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert code_of(stub.Remove, pb.RemoveSnapshotRequest(key="base"), metadata=NS) == \
        grpc.StatusCode.FAILED_PRECONDITION
    info = stub.Stat(pb.StatSnapshotRequest(key="child"), metadata=NS).info
    assert code_of(stub.Update, pb.UpdateSnapshotRequest(info=info, update_mask=FieldMask(paths=["kind"])),
                   metadata=NS) == grpc.StatusCode.INVALID_ARGUMENT
    list_all = lambda req, **kw: list(stub.List(req, **kw))
    assert code_of(list_all, pb.ListSnapshotsRequest(filters=["kind=="]), metadata=NS) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_list_streams_in_batches_and_filters(stub: pb_grpc.SnapshotsStub) -> None:
    # Given 150 active snapshots, a third of them labelled
    for i in range(150):
        labels = {"group": "x"} if i % 3 == 0 else {}
        stub.Prepare(pb.PrepareSnapshotRequest(key=f"s{i:03d}", labels=labels), metadata=NS)

    # When all are listed, then filtered
    responses = list(stub.List(pb.ListSnapshotsRequest(), metadata=NS))
    filtered = [i.name for r in stub.List(pb.ListSnapshotsRequest(filters=["labels.group==x"]), metadata=NS)
                for i in r.info]

    # Then the stream carries at most 100 per message and the filter selects the labelled ones
    assert [len(r.info) for r in responses] == [100, 50]
    assert filtered == [f"s{i:03d}" for i in range(0, 150, 3)]


def test_usage_mounts_and_cleanup_over_grpc(shim: ShimServer, stub: pb_grpc.SnapshotsStub) -> None:
    # Given an active snapshot with a 32 KiB file in its upper dir, and a stray directory
    mounts = stub.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=NS).mounts
    upper = Path(mounts[0].source)
    (upper / "f").write_bytes(b"z" * 32768)
    stray = shim.snapshotter.dirs / "new-stray"
    stray.mkdir()

    # Then Usage and Mounts answer what the snapshot holds and how to mount it
    usage = stub.Usage(pb.UsageRequest(key="a"), metadata=NS)
    assert usage.size >= 32768 and usage.inodes == 2
    again = stub.Mounts(pb.MountsRequest(key="a"), metadata=NS).mounts
    assert [(m.type, m.source, list(m.options)) for m in again] == [("bind", str(upper), ["rw", "rbind"])]

    # When Cleanup is called, the stray directory goes and the snapshot stays
    stub.Cleanup(pb.CleanupRequest(), metadata=NS)
    assert not stray.exists() and upper.is_dir()


def test_namespaces_kept_apart_when_isolated(tmp_path: Path) -> None:
    # Given a shim that isolates namespaces, and the same key prepared in two of them and
    # once with no namespace header
    shim = serve(tmp_path / "iso.sock", tmp_path / "root", isolate_namespaces=True)
    try:
        with grpc.insecure_channel(f"unix:{shim.address}") as channel:
            stub = pb_grpc.SnapshotsStub(channel)
            for ns in ("default", "k8s.io"):
                stub.Prepare(pb.PrepareSnapshotRequest(key="same", labels={"ns": ns}),
                             metadata=(("containerd-namespace", ns),))
            stub.Prepare(pb.PrepareSnapshotRequest(key="same", labels={"ns": "none"}))

            # Then each sees its own
            for ns in ("default", "k8s.io"):
                info = stub.Stat(pb.StatSnapshotRequest(key="same"), metadata=(("containerd-namespace", ns),)).info
                assert info.labels["ns"] == ns
            assert stub.Stat(pb.StatSnapshotRequest(key="same")).info.labels["ns"] == "none"
    finally:
        shim.stop()


def test_by_default_the_namespace_header_does_not_split_snapshots(stub: pb_grpc.SnapshotsStub) -> None:
    # Given a snapshot prepared with a namespace header, as containerd's CRI unpacker sends it
    stub.Prepare(pb.PrepareSnapshotRequest(key="k8s.io/1/key"), metadata=(("containerd-namespace", "k8s.io"),))

    # Then containerd's header-less follow-up calls find it, and a second Prepare collides
    assert stub.Stat(pb.StatSnapshotRequest(key="k8s.io/1/key")).info.kind == pb.ACTIVE
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="k8s.io/1/key"), metadata=NS) == \
        grpc.StatusCode.ALREADY_EXISTS


def test_handshake_answers_already_exists_and_list_finds_it(shim: ShimServer, stub: pb_grpc.SnapshotsStub) -> None:
    # Given a pre-warmed base layer in the shim's store
    (c0,) = install_prewarmed(shim.snapshotter.layout.root, [make_layer({"etc/a": b"a\n"})])

    # When containerd's unpacker prepares it
    code = code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="extract-1", labels={LABEL_SNAPSHOT_REF: c0}),
                   metadata=NS)

    # Then ALREADY_EXISTS, and the very filter containerd's metadata layer uses finds it
    assert code == grpc.StatusCode.ALREADY_EXISTS
    found = [i for r in stub.List(pb.ListSnapshotsRequest(
        filters=[f'labels."containerd.io/snapshot.ref"=={c0},parent==""']), metadata=NS) for i in r.info]
    assert [(i.name, i.kind, i.parent) for i in found] == [(c0, pb.COMMITTED, "")]


def test_cli_runs_stops_on_sigterm_and_refuses_a_non_socket(tmp_path: Path) -> None:
    prewarm = str(Path(sys.executable).parent / "prewarm")
    # Given a path that is a regular file
    taken = tmp_path / "taken"
    taken.write_text("not a socket")
    # When the shim is asked to listen there / Then it exits 2 with one line naming the path
    proc = subprocess.run([prewarm, "snapshotter", "--address", str(taken), "--root", str(tmp_path / "r")],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"prewarm: error: --address {taken} exists and is not a socket; choose another path"]

    # Given a stale socket left by a killed shim, and a live one
    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(stale))
    dead.close()
    live = serve(tmp_path / "live.sock", tmp_path / "r2")
    try:
        # Then the stale one is taken over and the live one refused
        serve(stale, tmp_path / "r3").stop()
        with pytest.raises(ConfigError, match="another process is serving"):
            serve(live.address, tmp_path / "r4")
    finally:
        live.stop()

    # Given a shim started from the command line with PREWARM_ROOT
    sock = tmp_path / "s.sock"
    env = {**os.environ, "PREWARM_ROOT": str(tmp_path / "envroot")}
    shim = subprocess.Popen([prewarm, "snapshotter", "--address", str(sock)], env=env,
                            stderr=subprocess.PIPE)
    try:
        wait_until(sock.exists, timeout=60, what="the shim socket")
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            pb_grpc.SnapshotsStub(channel).Prepare(pb.PrepareSnapshotRequest(key="k"), metadata=NS)
        # When it gets SIGTERM / Then it exits 0, removes its socket, and kept state under PREWARM_ROOT
        shim.send_signal(signal.SIGTERM)
        assert shim.wait(30) == 0
        assert not sock.exists()
        assert (tmp_path / "envroot" / "snapshots" / "metadata.db").is_file()
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait()
