"""Serve the snapshotter on a unix socket until SIGTERM/SIGINT.

containerd dials the socket named in ``[proxy_plugins.prewarm] address`` lazily, on the
first snapshot call, so the shim may start before or after containerd.  A stale socket
file from a killed shim is replaced; anything else at that path is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from prewarm.errors import ConfigError
from prewarm.runtime.shim._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)
from prewarm.runtime.shim.service import SnapshotsService
from prewarm.runtime.snapshot.overlay import OverlaySnapshotter

log = logging.getLogger(__name__)

#: Concurrent RPCs; containerd's unpacker and the CRI plugin call in parallel.
DEFAULT_WORKERS = 16


@dataclasses.dataclass
class ShimServer:
    """A running shim: the gRPC server and the snapshotter it serves."""

    address: Path
    server: grpc.Server
    snapshotter: OverlaySnapshotter

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace).wait()
        self.snapshotter.close()
        self.address.unlink(missing_ok=True)


def _claim_socket_path(address: Path) -> None:
    """Remove a stale socket at ``address``; refuse anything else.

    A socket nobody accepts on is what a killed shim leaves behind.  A socket that does
    accept is another shim serving (two shims on one root would corrupt nothing, sqlite
    serialises them, but containerd would talk to whichever bound last).

    Raises:
        ConfigError: ``address`` is a regular file or a directory, or a live socket.
    """
    address.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = address.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"--address {address} exists and is not a socket; choose another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(address))
        except OSError:
            address.unlink()
            return
    raise ConfigError(f"--address {address}: another process is serving on it; stop it first")


def serve(address: Path, root: Path, *, workers: int = DEFAULT_WORKERS,
          isolate_namespaces: bool = False) -> ShimServer:
    """Start serving ``containerd.services.snapshots.v1.Snapshots`` for ``root`` on ``address``.

    ``isolate_namespaces``: see :class:`~prewarm.runtime.shim.service.SnapshotsService` (off for
    containerd, whose backend keys already carry the namespace).

    Raises:
        ConfigError: the socket path is taken by something else or cannot be bound.
    """
    address = address.absolute()
    _claim_socket_path(address)
    snapshotter = OverlaySnapshotter(root)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshots"))
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter, isolate_namespaces=isolate_namespaces), server)
    try:
        server.add_insecure_port(f"unix:{address}")
    except RuntimeError as err:
        snapshotter.close()
        raise ConfigError(f"cannot listen on unix socket {address}: {err}") from None
    server.start()
    log.info("prewarm snapshotter serving %s on unix:%s", root, address)
    return ShimServer(address=address, server=server, snapshotter=snapshotter)


def run(address: Path, root: Path, *, isolate_namespaces: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly (the sqlite state is always durable).

    The signals are blocked before any gRPC thread exists and taken with ``sigwait`` in
    this thread: a Python handler would only run once the main thread wakes up, which it
    may never do when the kernel delivers the signal to one of gRPC's threads, and a
    signal that arrived before the handler was installed would kill the shim outright.
    """
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    shim = serve(address, root, isolate_namespaces=isolate_namespaces)
    signum = signal.sigwait(signals)
    log.info("signal %d: stopping", signum)
    shim.stop()
