"""Protobuf <-> :mod:`prewarm.runtime.snapshot.snapshotter` values, and errors -> gRPC status codes.

:func:`status_code` is the one place our error tree meets gRPC; containerd's proxy
client turns the codes back into its ``errdefs`` (``IsNotFound``, ``IsAlreadyExists``...),
which is what its unpacker and conformance suite test for.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from prewarm.errors import (
    FailedPrecondition,
    InvalidSnapshotRequest,
    PrewarmError,
    SnapshotExists,
    SnapshotNotFound,
)
from prewarm.runtime.shim._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from prewarm.runtime.shim._proto.containerd.types import mount_pb2
from prewarm.runtime.snapshot.snapshotter import Info, Kind, Mount

_NANOS = 1_000_000_000


def status_code(err: BaseException) -> grpc.StatusCode:
    """The gRPC code for an error: the whole mapping, most specific class first."""
    if isinstance(err, SnapshotNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(err, SnapshotExists):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(err, FailedPrecondition):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(err, InvalidSnapshotRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, PrewarmError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def timestamp(ns: int) -> Timestamp:
    return Timestamp(seconds=ns // _NANOS, nanos=ns % _NANOS)


def nanoseconds(ts: Timestamp) -> int:
    return ts.seconds * _NANOS + ts.nanos


def info_to_proto(info: Info) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=info.kind.name,
                   created_at=timestamp(info.created_ns), updated_at=timestamp(info.updated_ns),
                   labels=dict(info.labels))


def info_from_proto(msg: pb.Info) -> Info:
    return Info(name=msg.name, parent=msg.parent, kind=Kind(msg.kind), labels=dict(msg.labels),
                created_ns=nanoseconds(msg.created_at), updated_ns=nanoseconds(msg.updated_at))


def mounts_to_proto(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def mounts_from_proto(mounts: Iterable[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(type=m.type, source=m.source, options=tuple(m.options)) for m in mounts]
