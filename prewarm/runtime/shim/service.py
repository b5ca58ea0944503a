"""``containerd.services.snapshots.v1.Snapshots`` over a :class:`Snapshotter`: a thin adapter.

Each method reads the namespace, converts the request, calls the snapshotter and
converts the answer; :func:`_rpc` converts errors once per method (containerd's
``contrib/snapshotservice`` does the same with ``errdefs.ToGRPC``).  No snapshot logic
lives here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty

from prewarm.errors import PrewarmError, SnapshotExists
from prewarm.runtime.shim._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from prewarm.runtime.shim._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)
from prewarm.runtime.shim.convert import (
    info_from_proto,
    info_to_proto,
    mounts_to_proto,
    status_code,
)
from prewarm.runtime.snapshot.snapshotter import Snapshotter

log = logging.getLogger(__name__)

#: The gRPC metadata key containerd puts its namespace in.
NAMESPACE_KEY = "containerd-namespace"
#: Infos per List response message, as containerd's own service batches them.
LIST_BATCH = 100

R = TypeVar("R")


#: The one namespace of the shim unless namespaces are isolated.
UNNAMESPACED = ""


def namespace_of(context: grpc.ServicerContext) -> str:
    """The containerd namespace in the call's metadata, or :data:`UNNAMESPACED` without one."""
    for key, value in context.invocation_metadata():
        if key == NAMESPACE_KEY and value:
            return str(value)
    return UNNAMESPACED


def _abort(context: grpc.ServicerContext, method: str, err: BaseException) -> None:
    code = status_code(err)
    if isinstance(err, SnapshotExists):
        log.info("%s: ALREADY_EXISTS: %s", method, err)
    elif isinstance(err, PrewarmError):
        log.debug("%s: %s: %s", method, code.name, err)
    else:
        log.exception("%s failed unexpectedly", method)
    context.abort(code, str(err) or type(err).__name__)


def _rpc(method: Callable[..., R]) -> Callable[..., R]:
    """Turn any error of a unary method into its gRPC status (the one conversion per method)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> R:
        try:
            return method(self, request, context)
        except Exception as err:
            _abort(context, method.__name__, err)
            raise  # context.abort raises; this line is never reached

    return wrapper


class SnapshotsService(pb_grpc.SnapshotsServicer):
    """The gRPC servicer; ``snapshotter`` does the work.

    Namespaces: containerd 1.6 is inconsistent about the ``containerd-namespace`` header
    towards proxy plugins.  Calls made from a request's context (CRI's unpacker Prepare)
    carry it, calls from its own background contexts (the Stat right after, garbage
    collection's Remove) do not, and a snapshot created under ``k8s.io`` must still be
    found by a header-less Stat.  containerd's metadata layer already scopes every backend
    key as ``<namespace>/<n>/<key>``, exactly as its built-in overlay snapshotter (which
    knows no namespaces) sees them.  So by default the shim keeps one space and ignores
    the header; ``isolate_namespaces=True`` keeps snapshots of different headers apart,
    for clients that always send it (containerd's proxy client used directly, as in the
    conformance suite).
    """

    def __init__(self, snapshotter: Snapshotter, *, isolate_namespaces: bool = False) -> None:
        self.snapshotter = snapshotter
        self.isolate_namespaces = isolate_namespaces

    def _namespace(self, context: grpc.ServicerContext) -> str:
        return namespace_of(context) if self.isolate_namespaces else UNNAMESPACED

    @_rpc
    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        mounts = self.snapshotter.prepare(self._namespace(context), request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=mounts_to_proto(mounts))

    @_rpc
    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        mounts = self.snapshotter.view(self._namespace(context), request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=mounts_to_proto(mounts))

    @_rpc
    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> pb.MountsResponse:
        mounts = self.snapshotter.mounts(self._namespace(context), request.key)
        return pb.MountsResponse(mounts=mounts_to_proto(mounts))

    @_rpc
    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> Empty:
        self.snapshotter.commit(self._namespace(context), request.name, request.key, dict(request.labels))
        return Empty()

    @_rpc
    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> Empty:
        self.snapshotter.remove(self._namespace(context), request.key)
        return Empty()

    @_rpc
    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        info = self.snapshotter.stat(self._namespace(context), request.key)
        return pb.StatSnapshotResponse(info=info_to_proto(info))

    @_rpc
    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self.snapshotter.update(self._namespace(context), info_from_proto(request.info), paths)
        return pb.UpdateSnapshotResponse(info=info_to_proto(info))

    def List(self, request: pb.ListSnapshotsRequest,
             context: grpc.ServicerContext) -> Iterator[pb.ListSnapshotsResponse]:
        try:
            infos = list(self.snapshotter.walk(self._namespace(context), list(request.filters)))
        except Exception as err:  # noqa: BLE001 - the same one conversion, for the streaming method
            _abort(context, "List", err)
            return
        for start in range(0, len(infos), LIST_BATCH):
            batch = infos[start:start + LIST_BATCH]
            yield pb.ListSnapshotsResponse(info=[info_to_proto(i) for i in batch])

    @_rpc
    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> pb.UsageResponse:
        usage = self.snapshotter.usage(self._namespace(context), request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_rpc
    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> Empty:
        self.snapshotter.cleanup()
        return Empty()
