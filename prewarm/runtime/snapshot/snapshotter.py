"""The snapshotter contract: what a snapshot is, and what containerd expects of us.

This module is the prose; :mod:`prewarm.runtime.snapshot.overlay` is the implementation and
:mod:`prewarm.runtime.shim.service` the gRPC adapter.  The terms and the lifecycle are
containerd's (``snapshots/snapshotter.go``), because containerd is the only client and
its conformance suite (``snapshots/testsuite``) is the judge.

Terms
-----

*Snapshot*
    A filesystem state, named by a *key* (for active snapshots and views) or a *name*
    (for committed ones).  Keys and names share one namespace per containerd namespace:
    ``Prepare("x")`` fails with :class:`~prewarm.errors.SnapshotExists` when a committed
    snapshot ``x`` exists, and the reverse.

*Kind*
    ``ACTIVE``: writable, made by :meth:`Snapshotter.prepare`, mounted read-write (the
    container's rootfs, or the place containerd applies a layer tar into).
    ``VIEW``: read-only, made by :meth:`Snapshotter.view`.
    ``COMMITTED``: made by :meth:`Snapshotter.commit` from an active snapshot; immutable;
    the only kind that may be a *parent*.

*Parent*
    The committed snapshot a new snapshot starts from.  A parent cannot be removed while
    a child references it (:class:`~prewarm.errors.FailedPrecondition`).

*Namespace*
    containerd's namespace (``default``, ``k8s.io`` for CRI).  Every method takes it as
    its first argument; snapshots of two namespaces never see each other, even with the
    same key.  Facing containerd the shim passes one fixed namespace, because containerd
    already puts the namespace into every key it sends and sends the namespace header on
    some calls only (:class:`prewarm.runtime.shim.service.SnapshotsService` explains).

*Labels*
    Free ``str -> str`` metadata.  containerd's garbage collector reads
    ``containerd.io/gc.root`` and ``containerd.io/gc.ref.*``; we read
    :data:`LABEL_SNAPSHOT_REF`.

Lifecycle (how containerd unpacks an image of layers L0, L1)
------------------------------------------------------------

::

    Prepare("extract-1 sha256:C0", parent="")        -> mounts of an empty rw dir
      containerd applies L0's tar into the mounts
    Commit("sha256:C0", key="extract-1 sha256:C0")    -> committed snapshot C0
    Prepare("extract-2 sha256:C1", parent="sha256:C0") -> overlay mounts: upper rw, lower C0
      containerd applies L1's tar (whiteouts become overlay whiteouts)
    Commit("sha256:C1", key="extract-2 sha256:C1")
    Prepare("<container id>", parent="sha256:C1")     -> the container's rootfs

``C0``, ``C1`` are OCI chain IDs (:func:`prewarm.store.layout.chain_ids`), which is why a layer
the content store has already unpacked can stand in for the whole extract-and-commit step.

The remote-snapshot handshake (why pre-warmed images start with no download)
----------------------------------------------------------------------------

containerd's unpacker passes ``containerd.io/snapshot.ref = <chain id>`` in the labels of
each layer's ``Prepare``.  containerd's own comment on ``LabelSnapshotRef`` spells out the
protocol: a snapshotter that can provide the layer by itself *commits it under that
name* and answers **AlreadyExists**; containerd then checks with ``List``/``Stat`` that a
committed snapshot of that name and parent exists, and skips fetching and applying the
layer.  Our :meth:`Snapshotter.prepare` does exactly that when
:func:`prewarm.runtime.snapshot.prewarmed.lookup_chain` finds the chain ID ready in the content
store and the layer's parent chain is the ``parent`` asked for.  The committed snapshot's
lower directory *is* the store's layer directory: nothing is copied.  Any other Prepare
(the layer is not pre-warmed, or it hangs under a different parent) is an ordinary
Prepare and containerd applies the layer itself.

Mounts
------

Mounts are *descriptions* (type, source, options) that containerd performs; the
snapshotter never mounts anything itself.  They follow containerd's overlay snapshotter:
an active snapshot with no parent is a ``bind`` of its own directory (read-write), a view
with exactly one parent is a read-only ``bind`` of that parent, everything else is an
``overlay`` whose ``lowerdir`` lists the parents nearest first, plus ``upperdir`` and
``workdir`` for active snapshots.

Durability
----------

All metadata lives in sqlite under ``Layout(root).snapshots()``; a restart of the shim
loses nothing.  A snapshot's directory is built under a temporary name and renamed into
place inside the metadata transaction that records it, and removed if that transaction
fails, so the disk never holds a snapshot the metadata does not know about, except for
leftovers of a crash, which :meth:`Snapshotter.cleanup` removes.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

#: The remote-snapshot label: the chain ID of the layer containerd's unpacker prepares.
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
#: The compressed digest of the layer containerd's CRI unpacker would apply (sent with
#: :data:`LABEL_SNAPSHOT_REF` on a pull): the shim serves a chain only from that very blob.
LABEL_CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
#: containerd's GC root label; a snapshot without it (or a lease) may be collected.
LABEL_GC_ROOT = "containerd.io/gc.root"
#: Our own labels start with this, so containerd's FilterInheritedLabels forwards them.
LABEL_PREFIX = "containerd.io/snapshot/prewarm."
#: Set on snapshots answered from the content store: the layer's compressed digest.
LABEL_PREWARMED_LAYER = LABEL_PREFIX + "layer-digest"

#: containerd refuses a label whose key and value together exceed this many bytes.
MAX_LABEL_SIZE = 4096


class Kind(enum.IntEnum):
    """The kind of a snapshot; the values are the wire values of containerd's ``Kind`` enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        """The spelling containerd's filters use (``kind==active``)."""
        return self.name.lower()


@dataclasses.dataclass(frozen=True)
class Info:
    """What :meth:`Snapshotter.stat` reports: containerd's ``snapshots.Info``.

    Timestamps are integer nanoseconds since the epoch so that ``created == updated``
    survives a round trip exactly (the conformance suite compares them with ``!=``).
    """

    name: str
    kind: Kind
    parent: str = ""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0


@dataclasses.dataclass(frozen=True)
class Mount:
    """One mount for containerd to perform: containerd's ``mount.Mount``."""

    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Usage:
    """Disk usage of a snapshot's own directory: bytes and inodes (containerd's ``Usage``)."""

    size: int = 0
    inodes: int = 0


class Snapshotter(Protocol):
    """containerd's ``snapshots.Snapshotter``, one namespace argument added to each call.

    Every method raises only :class:`~prewarm.errors.SnapshotError` subclasses on
    purpose, which the shim turns into gRPC codes in one place:
    :class:`~prewarm.errors.SnapshotNotFound` (NOT_FOUND),
    :class:`~prewarm.errors.SnapshotExists` (ALREADY_EXISTS),
    :class:`~prewarm.errors.FailedPrecondition` (FAILED_PRECONDITION),
    :class:`~prewarm.errors.InvalidSnapshotRequest` (INVALID_ARGUMENT).
    """

    def stat(self, namespace: str, key: str) -> Info:
        """Describe the snapshot ``key`` of any kind.

        Raises:
            SnapshotNotFound: no snapshot of that key or name in ``namespace``.
        """
        ...

    def update(self, namespace: str, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change the mutable part of a snapshot: its labels, and nothing else.

        With no ``fieldpaths`` the labels are replaced by ``info.labels``.  ``labels``
        does the same; ``labels.<key>`` sets that one label from ``info.labels`` or
        deletes it when ``info.labels`` lacks it.  ``updated`` becomes now; name, kind,
        parent and ``created`` never change (``info.parent`` is ignored).

        Raises:
            SnapshotNotFound: ``info.name`` does not exist.
            InvalidSnapshotRequest: a field path other than ``labels``/``labels.*``
                (``parent``, ``kind``, ``name`` are immutable), or an oversized label.
        """
        ...

    def usage(self, namespace: str, key: str) -> Usage:
        """Bytes and inodes the snapshot itself adds (not its parents).

        Committed snapshots report what was measured when they were committed; active
        ones are measured now, since the container keeps writing.

        Raises:
            SnapshotNotFound: no such snapshot.
        """
        ...

    def mounts(self, namespace: str, key: str) -> list[Mount]:
        """The mounts of an active snapshot or view, the same as Prepare/View returned.

        Raises:
            SnapshotNotFound: no such snapshot.
            FailedPrecondition: the snapshot is committed (it has no mounts of its own).
        """
        ...

    def prepare(self, namespace: str, key: str, parent: str = "",
                labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create an active snapshot ``key`` on top of the committed ``parent``.

        With label :data:`LABEL_SNAPSHOT_REF` naming a chain ID that is pre-warmed in the
        content store (with ``parent`` as its parent chain), the committed snapshot of
        that name is created instead (labels kept, lowerdir = the store's layer) and
        :class:`~prewarm.errors.SnapshotExists` is raised: that is the remote-snapshot
        handshake, not a failure.

        Raises:
            SnapshotExists: ``key`` exists, or the layer was provided from the store.
            SnapshotNotFound: ``parent`` does not exist.
            InvalidSnapshotRequest: ``parent`` is not committed, or an oversized label.
        """
        ...

    def view(self, namespace: str, key: str, parent: str = "",
             labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create a read-only snapshot ``key`` of ``parent``; raises as :meth:`prepare`."""
        ...

    def commit(self, namespace: str, name: str, key: str,
               labels: Mapping[str, str] | None = None) -> None:
        """Turn the active snapshot ``key`` into the committed snapshot ``name``.

        Its usage is measured now and frozen.  ``key`` no longer exists afterwards;
        ``labels`` replace the active snapshot's labels.

        Raises:
            SnapshotNotFound: ``key`` does not exist.
            SnapshotExists: ``name`` is taken.
            FailedPrecondition: ``key`` is a view or already committed.
        """
        ...

    def remove(self, namespace: str, key: str) -> None:
        """Remove a snapshot of any kind, with its directory (never a store layer).

        Raises:
            SnapshotNotFound: no such snapshot.
            FailedPrecondition: other snapshots have it as their parent.
        """
        ...

    def walk(self, namespace: str, filters: Sequence[str] = ()) -> Iterator[Info]:
        """Every snapshot of ``namespace`` matching any of ``filters`` (all if none).

        Each filter is containerd's syntax: ``,``-separated selectors that must all
        hold, ``field==value``, ``field!=value``, ``field~=regexp`` or a bare ``field``
        (present and non-empty); fields are ``name``, ``parent``, ``kind`` and
        ``labels.<key>`` (quote keys with dots: ``labels."containerd.io/gc.root"``).

        Raises:
            InvalidSnapshotRequest: a filter does not parse.
        """
        ...

    def cleanup(self) -> None:
        """Remove directories no snapshot owns (left by a crash or an interrupted remove)."""
        ...

    def close(self) -> None:
        """Release the metadata database."""
        ...
