"""Scheduling: from an image reference to a job whose span tasks are on their way to nodes.

    resolve the image (manifest for the platform, config, diff_ids)
    === find each layer's zTOC: the registry's SOCI index, the node cache, or build it
    === plan: spans for indexed layers, whole-layer tasks for the rest
    === check space on this node (embedded) before any layer byte is fetched
    === record the job in Redis and release the first window of tasks per node

Nothing here waits for the work; :func:`wait_for_job` does, for ``--wait``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence

import redis

from prewarm import dispatch, jobs, keys
from prewarm.config import BUILD_TOOL_IDENTIFIER, Settings
from prewarm.errors import AuthenticationFailed, JobError, PrewarmError
from prewarm.layout import Layout
from prewarm.plan import ImagePlan, plan_image
from prewarm.reference import Reference
from prewarm.registry.client import RegistryClient, ResolvedImage
from prewarm.soci import find_soci_index, push_soci_index
from prewarm.store import ContentStore
from prewarm.ztoc import serialize_ztoc
from prewarm.ztoc_build import build_ztoc
from prewarm.ztoc_cache import ZtocCache

log = logging.getLogger(__name__)

GZIP_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})
#: Default number of tasks in flight per node (bounded queues: Redis holds nodes x window).
DEFAULT_WINDOW = 32


@dataclasses.dataclass(frozen=True)
class IndexChoice:
    """Where each layer's zTOC came from (for the user, and the closing report)."""

    from_registry: tuple[str, ...] = ()
    built: tuple[str, ...] = ()
    whole: tuple[str, ...] = ()


def is_gzip(media_type: str) -> bool:
    return media_type in GZIP_TYPES


def _build_one(client: RegistryClient, ref: Reference, digest: str, span_size: int) -> bytes:
    with client.stream_blob(ref.registry, ref.repository, digest) as chunks:
        z = build_ztoc(chunks, span_size=span_size, build_tool_identifier=BUILD_TOOL_IDENTIFIER)
    return serialize_ztoc(z)


def find_ztocs(settings: Settings, client: RegistryClient, resolved: ResolvedImage, *,
               build: bool, push: bool, say: Callable[[str], None]) -> tuple[dict[str, tuple[str, int, int]], IndexChoice]:
    """zTOC digest, span count and uncompressed size for every layer that will go by spans.

    Layers below the minimum size, zstd and uncompressed layers are left to whole-layer tasks
    (as soci leaves them un-indexed).  Built zTOCs go into this node's cache; with ``push``
    (a fleet: the nodes fetch zTOCs from the registry) they are pushed as a SOCI index.
    """
    ref = resolved.reference
    cache = ZtocCache(Layout(settings.root))
    index = find_soci_index(client, resolved)
    out: dict[str, tuple[str, int, int]] = {}
    from_registry, to_build, whole = [], [], []
    for layer in resolved.layers:
        if layer.digest in out or layer.digest in to_build:
            continue
        desc = index.ztoc_for_layer(layer.digest) if index is not None else None
        if desc is not None:
            z = cache.get(desc.digest, client, ref.registry, ref.repository)
            out[layer.digest] = (desc.digest, z.num_spans, z.uncompressed_archive_size)
            from_registry.append(layer.digest)
        elif build and is_gzip(layer.media_type) and layer.size >= settings.min_layer_size:
            to_build.append(layer.digest)
        else:
            whole.append(layer.digest)
    built: dict[str, bytes] = {}
    if to_build:
        say(f"building zTOCs for {len(to_build)} layer(s) (no SOCI index in the registry)")
        workers = max(1, min(len(to_build), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = {d: pool.submit(_build_one, client, ref, d, settings.span_size) for d in to_build}
            for digest, fut in futures.items():
                built[digest] = fut.result()
        for digest, data in built.items():
            zdigest = cache.put(data)
            z = cache.get(zdigest)
            out[digest] = (zdigest, z.num_spans, z.uncompressed_archive_size)
        if push:
            try:
                push_soci_index(client, resolved, built, settings.span_size, BUILD_TOOL_IDENTIFIER)
            except AuthenticationFailed as err:
                say(f"cannot push the SOCI index ({err}); those layers go whole to the fleet")
                for digest in built:
                    out.pop(digest, None)
                whole.extend(built)
                built = {}
    return out, IndexChoice(tuple(from_registry), tuple(built), tuple(whole))


def make_plan(resolved: ResolvedImage, span_layers: dict[str, tuple[str, int, int]]) -> ImagePlan:
    return plan_image(
        reference=f"{resolved.reference.registry}/{resolved.reference.repository}@{resolved.manifest_digest}",
        manifest_digest=resolved.manifest_digest,
        config_digest=resolved.config_digest,
        layers=[(l.digest, l.size, l.media_type) for l in resolved.layers],
        diff_ids=list(resolved.diff_ids),
        span_layers=span_layers,
        platform=resolved.platform or "",
    )


def estimate_unpacked(plan: ImagePlan) -> int:
    """Bytes the layers will take on disk: the zTOC's size where known, else 4x compressed."""
    return sum(layer.uncompressed_size or 4 * layer.size for layer in plan.layers)


def check_local_space(store: ContentStore, plan: ImagePlan) -> set[int]:
    """Layers already ready on this node; raise InsufficientSpace before fetching anything."""
    present = {i for i, layer in enumerate(plan.layers) if store.is_ready(layer.digest)}
    needed = sum(layer.uncompressed_size or 4 * layer.size
                 for i, layer in enumerate(plan.layers) if i not in present)
    if needed:
        store.check_space(needed)
    return present


def launch(r: redis.Redis, broker_url: str, plan: ImagePlan, image: str, nodes: Sequence[str], *,
           window: int, present: dict[str, set[int]] | None = None, keep: dict[str, str] | None = None) -> str:
    """Record the job and release the first ``window`` tasks of every node."""
    job_id = jobs.create_job(r, plan, nodes, window=window, image=image, present=present, keep=keep)
    app = dispatch.sender(broker_url)
    for node in nodes:
        dispatch.release(app, r, plan, job_id, node, window)
    return job_id


def wait_for_job(r: redis.Redis, job_id: str, *, on_update: Callable[[jobs.JobStatus], None] | None = None,
                 interval: float = 0.2, alive: Callable[[], None] | None = None,
                 timeout: float | None = None) -> jobs.JobStatus:
    """Poll until the job is finished; ``alive`` may raise if local workers died.

    Raises:
        JobError: the timeout passed first.
    """
    start = time.monotonic()
    while True:
        status = jobs.job_status(r, job_id)
        if on_update:
            on_update(status)
        if status.finished:
            return status
        if alive:
            alive()
        if timeout is not None and time.monotonic() - start > timeout:
            raise JobError(f"job {job_id} did not finish within {timeout:.0f}s; `prewarm status {job_id}` follows it")
        time.sleep(interval)


def require_nodes(r: redis.Redis, nodes: Sequence[str]) -> list[str]:
    if nodes:
        return list(nodes)
    known = sorted(n.decode() if isinstance(n, bytes) else n for n in r.smembers(keys.NODES))
    if not known:
        raise PrewarmError("no node to pre-warm: start `prewarm worker` on the nodes, or name them with --node")
    return known


#: Per-node throughput assumed by ``--dry-run`` estimates when nothing better is known (bytes/s).
NOMINAL_NODE_RATE = 100_000_000


@dataclasses.dataclass(frozen=True)
class DryRunLine:
    node: str
    present_bytes: int
    fetch_bytes: int
    free_after: int | None
    seconds: float


def dry_run(plan: ImagePlan, nodes: Sequence[tuple[str, frozenset[str], int | None]],
            budget_bytes_per_s: float | None = None) -> tuple[list[DryRunLine], int]:
    """Per node: bytes already present, bytes to fetch, free disk afterwards, time; plus total egress.

    ``nodes`` holds (name, ready layer digests, free bytes or None).  Time assumes every node
    runs at :data:`NOMINAL_NODE_RATE` unless the registry budget, shared by the fleet, is lower.
    """
    lines, egress = [], 0
    for name, held, free in nodes:
        present = sum(l.size for l in plan.layers if l.digest in held)
        fetch = plan.total_bytes - present
        unpacked = sum(l.uncompressed_size or 4 * l.size for l in plan.layers if l.digest not in held)
        egress += fetch
        lines.append(DryRunLine(name, present, fetch, None if free is None else free - unpacked, 0.0))
    fetching = sum(1 for line in lines if line.fetch_bytes)
    rate = NOMINAL_NODE_RATE
    if budget_bytes_per_s and fetching:
        rate = min(rate, budget_bytes_per_s / fetching)
    return [dataclasses.replace(line, seconds=line.fetch_bytes / rate) for line in lines], egress


def join_standing_jobs(r: redis.Redis, app, node: str, labels: dict[str, str],  # type: ignore[no-untyped-def]
                       is_ready: Callable[[str], bool]) -> list[str]:
    """Called by a node's worker: join every standing schedule that matches it, release its window."""
    joined = []
    for job_id in jobs.standing_jobs_for(r, labels):
        plan = jobs.load_plan(r, job_id)
        ready = {i for i, layer in enumerate(plan.layers) if is_ready(layer.digest)}
        if jobs.add_node(r, job_id, node, plan, ready):
            window = int(r.hget(keys.job(job_id), "window") or DEFAULT_WINDOW)
            dispatch.release(app, r, plan, job_id, node, window)
            joined.append(job_id)
    return joined
