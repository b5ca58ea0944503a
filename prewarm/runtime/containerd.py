"""Registration of a pre-warmed image in containerd, so the kubelet sees it present.

Order matters: the layer snapshots first, then the image.  CRI reports an image as
present as soon as containerd has its record, and a kubelet with ``IfNotPresent`` then
never pulls; if the snapshots were missing at that moment the container would fail to
start.  So:

1. through containerd's own Snapshots service (its gRPC socket, snapshotter
   ``prewarm``), each layer's chain is prepared bottom first with
   ``containerd.io/snapshot.ref = <chain id>`` exactly as containerd's unpacker does.
   The shim already holds the layer, commits it under the chain ID and answers
   ALREADY_EXISTS; containerd records the committed snapshot in its metadata with the
   ``containerd.io/gc.root`` label, so its garbage collector keeps it;
2. an OCI archive holding only index, manifest and config is imported with
   ``ctr images import --no-unpack``: containerd stores the two blobs and the image
   record (name -> manifest digest) and fetches nothing;
3. the image gets ``containerd.io/gc.ref.snapshot.prewarm = <top chain id>``, the label
   containerd's unpacker leaves, so the image also keeps its snapshots alive.

Every step is idempotent: registering again finds the committed snapshots (containerd
answers ALREADY_EXISTS from its own database) and re-imports the same digests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from prewarm.errors import ConfigError, ContainerdError, ContainerdUnavailable, StoreError
from prewarm.resolve.digest import sha256_digest
from prewarm.resolve.reference import parse_reference
from prewarm.resolve.registry.client import RegistryClient
from prewarm.runtime.images import ImageRecord
from prewarm.runtime.shim._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from prewarm.runtime.shim._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)
from prewarm.store.layout import Layout

#: The proxy plugin name of the shim in containerd's config (deploy/containerd/config.toml).
SNAPSHOTTER = "prewarm"
#: CRI keeps its images in this containerd namespace.
DEFAULT_NAMESPACE = "k8s.io"
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
LABEL_GC_ROOT = "containerd.io/gc.root"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
_RPC_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class Registration:
    """What was registered: the containerd image name, its manifest and the chain IDs (bottom first)."""

    name: str
    namespace: str
    manifest_digest: str
    chain_ids: tuple[str, ...]


def containerd_image_name(reference: str) -> str:
    """The fully qualified name containerd and CRI use for ``reference`` (``docker.io/library/x:latest``).

    A reference pinned by digest only keeps its digest form (``repo@sha256:...``), as CRI does.
    """
    return str(parse_reference(reference))


def gc_snapshot_label(snapshotter: str = SNAPSHOTTER) -> str:
    """The image label that makes containerd's gc keep the top snapshot (and with it its parents)."""
    return f"containerd.io/gc.ref.snapshot.{snapshotter}"


def _manifest_media_type(manifest: bytes) -> str:
    try:
        media_type = json.loads(manifest).get("mediaType")
    except (ValueError, AttributeError) as err:
        raise ContainerdError(f"the image manifest is not JSON ({err}); pre-warm the image again") from err
    return media_type or MANIFEST_MEDIA_TYPE


def write_oci_archive(path: Path, name: str, manifest: bytes, config: bytes) -> Path:
    """An OCI image-layout tar with index, manifest and config but no layer blob.

    ``io.containerd.image.name`` in the index names the image for ``ctr images import``.
    """
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": _manifest_media_type(manifest), "digest": sha256_digest(manifest),
                       "size": len(manifest),
                       "annotations": {"io.containerd.image.name": name}}],
    }
    entries = {
        "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
        "index.json": json.dumps(index).encode(),
        f"blobs/sha256/{sha256_digest(manifest).split(':', 1)[1]}": manifest,
        f"blobs/sha256/{sha256_digest(config).split(':', 1)[1]}": config,
    }
    with tarfile.open(path, "w") as tar:
        for entry, data in entries.items():
            info = tarfile.TarInfo(entry)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


class ContainerdClient:
    """containerd on one socket and namespace: its Snapshots service over gRPC, images through ``ctr``."""

    def __init__(self, address: Path | str, namespace: str = DEFAULT_NAMESPACE, *,
                 snapshotter: str = SNAPSHOTTER, ctr: str | None = None) -> None:
        self.address = Path(address)
        self.namespace = namespace
        self.snapshotter = snapshotter
        found = ctr or shutil.which("ctr")
        if found is None:
            raise ConfigError("containerd's `ctr` command is not on PATH; install containerd's client "
                              "(Debian: apt-get install containerd)")
        self.ctr_path = found

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("containerd-namespace", self.namespace),)

    def _rpc_error(self, err: grpc.RpcError, what: str) -> ContainerdError:
        code = err.code()
        detail = err.details() or ""
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ContainerdUnavailable(
                f"containerd at {self.address} does not answer ({detail}); start containerd or give the "
                "right socket with --containerd")
        if code == grpc.StatusCode.INVALID_ARGUMENT and "namespace" in detail:
            return ContainerdError(f"containerd refused namespace {self.namespace!r}: {detail}; "
                                   "use e.g. --namespace k8s.io")
        if "snapshotter not loaded" in detail or code == grpc.StatusCode.NOT_FOUND and self.snapshotter in detail:
            return ContainerdError(
                f"containerd at {self.address} has no snapshotter {self.snapshotter!r} ({detail}); add the "
                "proxy_plugins block of deploy/containerd/config.toml and restart containerd")
        return ContainerdError(f"containerd at {self.address}: {what} failed: {code.name} {detail}")

    def ensure_snapshots(self, chain_ids: list[str]) -> None:
        """Have containerd record each chain as a committed ``prewarm`` snapshot, bottom first.

        Raises:
            ContainerdUnavailable: the socket does not answer.
            ContainerdError: containerd refused, or the shim does not hold a layer (it
                answered with a fresh active snapshot, which is removed again).
        """
        if not self.address.exists():
            raise ContainerdUnavailable(f"containerd socket {self.address} does not exist; start containerd "
                                        "or give the right socket with --containerd")
        with grpc.insecure_channel(f"unix:{self.address}") as channel:
            stub = pb_grpc.SnapshotsStub(channel)
            parent = ""
            for level, chain_id in enumerate(chain_ids):
                key = f"prewarm-register-{uuid.uuid4().hex} {chain_id}"
                labels = {LABEL_SNAPSHOT_REF: chain_id, LABEL_GC_ROOT: time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime())}
                try:
                    stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=self.snapshotter, key=key, parent=parent,
                                                           labels=labels),
                                 metadata=self._metadata(), timeout=_RPC_TIMEOUT)
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                        raise self._rpc_error(err, f"Prepare of layer {level} ({chain_id})") from err
                else:
                    # The shim did not hold this layer: it prepared an empty active snapshot.
                    with contextlib.suppress(grpc.RpcError):
                        stub.Remove(pb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key),
                                    metadata=self._metadata(), timeout=_RPC_TIMEOUT)
                    raise ContainerdError(
                        f"layer {level} (chain {chain_id}) is not pre-warmed in the shim's store; "
                        "check that the shim's --root is this node's PREWARM_ROOT and pre-warm the image again")
                parent = chain_id

    def ctr(self, *args: str) -> str:
        """Run ``ctr -a SOCKET -n NAMESPACE ARGS``; its stdout.

        Raises:
            ContainerdUnavailable: ctr could not connect.
            ContainerdError: ctr failed otherwise (its message is included).
        """
        cmd = [self.ctr_path, "--address", str(self.address), "--namespace", self.namespace, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
        if proc.returncode != 0:
            message = (proc.stderr or proc.stdout).strip()
            if "connection" in message and ("refused" in message or "no such file" in message):
                raise ContainerdUnavailable(f"containerd at {self.address} does not answer: {message}")
            raise ContainerdError(f"`ctr {' '.join(args[:2])}` against {self.address} failed: {message}")
        return proc.stdout

    def import_image(self, name: str, manifest: bytes, config: bytes, top_chain_id: str) -> None:
        """Store manifest and config, point ``name`` at the manifest, label it with its top snapshot.

        Raises:
            ContainerdError: the import or the labelling failed.
        """
        with tempfile.TemporaryDirectory(prefix="prewarm-import-") as tmp:
            archive = write_oci_archive(Path(tmp) / "image.tar", name, manifest, config)
            self.ctr("images", "import", "--no-unpack", "--all-platforms", str(archive))
        self.ctr("images", "label", name, f"{gc_snapshot_label(self.snapshotter)}={top_chain_id}")

    def image_names(self) -> list[str]:
        """The names of the images in this namespace (``ctr images ls -q``)."""
        return [line for line in self.ctr("images", "ls", "-q").splitlines() if line.strip()]


def register_image(client: ContainerdClient, layout: Layout, record: ImageRecord, manifest: bytes,
                   config: bytes) -> Registration:
    """Make containerd see the pre-warmed ``record`` as present and usable, fetching no layer.

    ``manifest`` and ``config`` are the image's blobs as the registry served them (their
    digests are checked against the record, so containerd holds what the kubelet would pull).

    Raises:
        StoreError: a layer of the record is not ready in the store, or the blobs do not match.
        ContainerdUnavailable: containerd does not answer.
        ContainerdError: containerd refused a step.
    """
    if sha256_digest(manifest) != record.manifest_digest or sha256_digest(config) != record.config_digest:
        raise StoreError(f"{record.name}: the manifest/config given do not match the record "
                         f"({record.manifest_digest}); pre-warm the image again")
    for digest in record.layer_digests:
        if not layout.layer_ready(digest).is_file():
            raise StoreError(f"{record.name}: layer {digest} is not ready in {layout.root}; "
                             f"pre-warm the image again (prewarm schedule {record.name} --wait)")
    chains = record.chain_ids
    client.ensure_snapshots(chains)
    name = containerd_image_name(record.name)
    client.import_image(name, manifest, config, chains[-1])
    return Registration(name, client.namespace, record.manifest_digest, tuple(chains))


def register_from_registry(client: ContainerdClient, layout: Layout, record: ImageRecord,
                           registry: RegistryClient) -> Registration:
    """:func:`register_image` for a worker, which has the record but not the blobs: fetch them.

    Only the manifest (by digest) and the config come from the registry, both small and
    verified; they are what CRI would fetch too.

    Raises:
        RegistryError: the manifest or config cannot be fetched.
        StoreError, ContainerdError: as :func:`register_image`.
    """
    ref = parse_reference(record.reference)
    manifest, _, _ = registry.get_manifest(ref.registry, ref.repository, record.manifest_digest)
    config = registry.get_blob(ref.registry, ref.repository, record.config_digest)
    return register_image(client, layout, record, manifest, config)
