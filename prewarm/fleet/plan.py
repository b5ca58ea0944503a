"""Turn a resolved image into units of work: spans of indexed layers, whole unindexed layers.

Pure: no I/O.  The plan is stored once per job in Redis and every node walks it with a
cursor, so Redis holds one plan per job and a counter per node, never a task list per
node (a 20 GB image has ~5,000 spans; a fleet has hundreds of nodes).

Work order: whole-layer tasks first, largest first (they are long and cannot be split),
then the indexed layer with the fewest TOC entries, then the other indexed layers
interleaved, each task taken in order of how far into its layer it is (a layer of 40
tasks advances twice as fast as one of 20), fewest entries first among equals.  Each
layer's spans stay in stream order (so the in-order hash of its compressed bytes mostly
advances without spooling).

Why the smallest TOC first: a layer's spans cannot land before its TOC was checked and
its tree created, which takes seconds for 50,000 entries; the scheduler prepares the
largest TOC first (``prewarm.node.prepare``) while the workers land the layer that is
quick to prepare.  Why interleaved after it: layers of many small files keep the CPU
busy creating files, layers of large files keep the disk busy; one after the other, each
left the other resource idle.  Measured on the pipeline bench (three layers): landing
the 16,000-entry torch layer alone, the CPU was 90% in I/O wait for a second; the
51,000-entry layer that followed was CPU-bound.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from prewarm.resolve.registry.client import ResolvedImage

LayerMode = Literal["spans", "whole"]


class SpanLayer(NamedTuple):
    """What the plan needs of a layer's zTOC."""

    ztoc_digest: str
    num_spans: int
    uncompressed_size: int
    num_files: int = 0
    #: Bytes of the zTOC (0: unknown); nodes fetch it from peers by this length.
    ztoc_size: int = 0


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One distinct layer of the image and how it will be fetched.

    ``mode`` is ``"spans"`` when a zTOC splits it (``ztoc_digest`` names the zTOC), else
    ``"whole"``: one streamed task (small, zstd, uncompressed without index, no Range).
    """

    digest: str
    size: int
    media_type: str
    diff_id: str
    mode: LayerMode
    num_spans: int
    ztoc_digest: str | None = None
    uncompressed_size: int | None = None
    #: Adjacent spans one task fetches (one Range request) and lands; the last task of a
    #: layer may have fewer.
    spans_per_task: int = 1
    #: TOC entries (what preparing the layer costs).
    num_files: int = 0
    #: Bytes of the zTOC (0: unknown): the length a node asks peers for (bounded by the node).
    ztoc_size: int = 0

    def __post_init__(self) -> None:
        if self.mode == "whole" and self.num_spans != 1:
            raise ValueError(f"layer {self.digest}: a whole-layer plan has exactly one task")
        if self.mode == "spans" and (self.num_spans < 1 or not self.ztoc_digest):
            raise ValueError(f"layer {self.digest}: a span plan needs a zTOC and at least one span")
        if self.spans_per_task < 1:
            raise ValueError(f"layer {self.digest}: spans_per_task must be at least 1")

    @property
    def task_count(self) -> int:
        return -(-self.num_spans // self.spans_per_task)

    def task_spans(self, first: int) -> int:
        """How many spans the task starting at span ``first`` covers."""
        return min(self.spans_per_task, self.num_spans - first)


@dataclasses.dataclass(frozen=True)
class ImagePlan:
    """The work for one image on one node, identical for every node of a job.

    ``layers`` holds each distinct layer once (work units); ``layer_order`` gives the
    image's layers bottom to top by index into ``layers`` (a digest may repeat), with
    ``diff_ids`` in the same order, which is what snapshots (chain IDs) need.
    """

    reference: str
    manifest_digest: str
    config_digest: str
    layers: tuple[LayerPlan, ...]
    layer_order: tuple[int, ...]
    diff_ids: tuple[str, ...]
    platform: str = ""
    _work: tuple[int, ...] = dataclasses.field(default=(), compare=False, repr=False)
    _tasks: tuple[tuple[int, int], ...] = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        # Work order (see the module's docstring): whole layers, largest first, then span
        # layers, fewest TOC entries first (image order among equals).
        whole = sorted((i for i, l in enumerate(self.layers) if l.mode == "whole"),
                       key=lambda i: -self.layers[i].size)
        spans = sorted((i for i, l in enumerate(self.layers) if l.mode == "spans"),
                       key=lambda i: self.layers[i].num_files)
        tasks = [(i, t) for i in whole + spans[:1] for t in range(self.layers[i].task_count)]
        rest = sorted((t / self.layers[i].task_count, rank, i, t)
                      for rank, i in enumerate(spans[1:]) for t in range(self.layers[i].task_count))
        tasks += [(i, t) for _, _, i, t in rest]
        object.__setattr__(self, "_work", tuple(whole + spans))
        object.__setattr__(self, "_tasks", tuple(tasks))

    @property
    def task_count(self) -> int:
        return sum(layer.task_count for layer in self.layers)

    @property
    def total_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    def task_at(self, k: int) -> tuple[int, int]:
        """The k-th unit of work as (layer index, its first span); whole layers have span 0.

        A task is named by its first span everywhere (messages, the job's span bitmaps).

        Raises:
            IndexError: k is outside the plan.
        """
        if not 0 <= k < self.task_count:
            raise IndexError(f"task {k} is outside the plan of {self.task_count} tasks")
        li, t = self._tasks[k]
        return li, t * self.layers[li].spans_per_task

    def next_span_layer(self, layer_index: int) -> LayerPlan | None:
        """The span layer after ``layer_index`` in work order (the one to prepare ahead)."""
        work = [i for i in self._work if self.layers[i].mode == "spans"]
        if layer_index not in work:
            return None
        pos = work.index(layer_index) + 1
        return self.layers[work[pos]] if pos < len(work) else None

    def to_json(self) -> str:
        return json.dumps({
            "reference": self.reference,
            "manifest_digest": self.manifest_digest,
            "config_digest": self.config_digest,
            "platform": self.platform,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "layer_order": list(self.layer_order),
            "diff_ids": list(self.diff_ids),
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ImagePlan:
        raw = json.loads(text)
        return cls(
            reference=raw["reference"],
            manifest_digest=raw["manifest_digest"],
            config_digest=raw["config_digest"],
            platform=raw.get("platform", ""),
            layers=tuple(LayerPlan(**layer) for layer in raw["layers"]),
            layer_order=tuple(raw["layer_order"]),
            diff_ids=tuple(raw["diff_ids"]),
        )


def plan_image(
    *,
    reference: str,
    manifest_digest: str,
    config_digest: str,
    layers: Sequence[tuple[str, int, str]],
    diff_ids: Sequence[str],
    span_layers: dict[str, SpanLayer] | dict[str, tuple[str, int, int]],
    platform: str = "",
    spans_per_task: int = 1,
) -> ImagePlan:
    """Build the plan.

    Args:
        layers: the manifest's layers bottom to top as (digest, size, media type).
        diff_ids: the config's rootfs.diff_ids, same order.
        span_layers: for layers that have a usable zTOC, digest -> :class:`SpanLayer` (or
            its first three fields); every other layer is planned whole.
        spans_per_task: adjacent spans one task covers (a layer's last task may have fewer).

    Raises:
        ValueError: the manifest and config disagree on the number of layers.
    """
    if len(layers) != len(diff_ids):
        raise ValueError(
            f"{reference}: the manifest lists {len(layers)} layers but the config has "
            f"{len(diff_ids)} diff_ids"
        )
    index_of: dict[str, int] = {}
    plans: list[LayerPlan] = []
    order: list[int] = []
    for (digest, size, media_type), diff_id in zip(layers, diff_ids):
        if digest not in index_of:
            index_of[digest] = len(plans)
            if digest in span_layers:
                z = SpanLayer(*span_layers[digest])
                plans.append(LayerPlan(digest, size, media_type, diff_id, "spans", z.num_spans,
                                       z.ztoc_digest, z.uncompressed_size, spans_per_task, z.num_files,
                                       z.ztoc_size))
            else:
                plans.append(LayerPlan(digest, size, media_type, diff_id, "whole", 1))
        order.append(index_of[digest])
    return ImagePlan(reference, manifest_digest, config_digest, tuple(plans), tuple(order),
                     tuple(diff_ids), platform)


def plan_resolved(resolved: ResolvedImage, span_layers: dict[str, SpanLayer], *,
                  spans_per_task: int = 1) -> ImagePlan:
    """:func:`plan_image` for an image the registry client resolved.

    Here rather than with the scheduler: the command that finds an image already
    pre-warmed needs its plan but none of the scheduler's imports (Celery, Redis), which
    were half of its one second.
    """
    return plan_image(
        reference=f"{resolved.reference.registry}/{resolved.reference.repository}@{resolved.manifest_digest}",
        manifest_digest=resolved.manifest_digest,
        config_digest=resolved.config_digest,
        layers=[(layer.digest, layer.size, layer.media_type) for layer in resolved.layers],
        diff_ids=list(resolved.diff_ids),
        span_layers=span_layers,
        platform=resolved.platform or "",
        spans_per_task=spans_per_task,
    )
