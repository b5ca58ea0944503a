"""Scheduling: from an image reference to a job whose span tasks are on their way to nodes.

    resolve the image (manifest for the platform, config, diff_ids)
    === find each layer's zTOC: the registry's SOCI index, the node cache, or build it
    === plan: spans for indexed layers, whole-layer tasks for the rest
    === check space on this node (embedded) before any layer byte is fetched
    === record the job in Redis and release the first window of tasks per node

Nothing here waits for the work; :func:`wait_for_job` does, for ``--wait``.
:mod:`prewarm.fleet.submit` strings these steps together, once for a fleet and for the
embedded run alike.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import redis

from prewarm.config import BUILD_TOOL_IDENTIFIER, Settings
from prewarm.errors import AuthenticationFailed, ConfigError, JobError, JobTimeout, PrewarmError
from prewarm.fleet import dispatch, jobs, keys
from prewarm.fleet.nodes import list_nodes
from prewarm.fleet.plan import ImagePlan, SpanLayer
from prewarm.fleet.signing import TaskSigner
from prewarm.index.soci import build_layer_ztocs, find_soci_index, layer_ztoc_kind, push_soci_index
from prewarm.resolve.reference import Reference
from prewarm.resolve.registry.client import RegistryClient, ResolvedImage
from prewarm.store.content import ContentStore
from prewarm.store.layout import Layout
from prewarm.store.ztoc_cache import ZtocCache

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


def find_ztocs(settings: Settings, client: RegistryClient, resolved: ResolvedImage, *,
               build: bool, push: bool, say: Callable[[str], None]) -> tuple[dict[str, SpanLayer], IndexChoice]:
    """zTOC digest, span count, uncompressed size and TOC length of every layer that will go by spans.

    The registry's SOCI index is used when there is one.  Otherwise, with ``build``, the
    zTOCs are built here (one streaming pass over each layer, layers in parallel) and,
    with ``push``, pushed as a SOCI index so every node of a fleet fetches them by digest:
    one extra download of the image for the whole fleet, after which each node fetches
    spans in parallel.  Layers without a zTOC (small, zstd, or not built) go whole.
    """
    ref = resolved.reference
    cache = ZtocCache(Layout(settings.root))
    index = find_soci_index(client, resolved)
    out: dict[str, SpanLayer] = {}
    from_registry: list[str] = []
    for layer in resolved.layers:
        desc = index.ztoc_for_layer(layer.digest) if index is not None else None
        if desc is not None and layer.digest not in out:
            z = cache.get(desc.digest, client, ref.registry, ref.repository)
            out[layer.digest] = SpanLayer(desc.digest, z.num_spans, z.uncompressed_archive_size, len(z.files),
                                          desc.size)
            from_registry.append(layer.digest)
    built: list[str] = []
    if build and len(out) < len({l.digest for l in resolved.layers}):
        missing = [l for l in resolved.layers if l.digest not in out]
        if any(layer_ztoc_kind(l, settings.min_layer_size)[0] for l in missing):
            say("building zTOCs (the registry has no SOCI index for these layers)")
            built = _build_ztocs(settings, client, resolved, cache, out, push=push, say=say)
    whole = tuple(l.digest for l in resolved.layers if l.digest not in out)
    return out, IndexChoice(tuple(from_registry), tuple(built), whole)


def _build_ztocs(settings: Settings, client: RegistryClient, resolved: ResolvedImage, cache: ZtocCache,
                 out: dict[str, SpanLayer], *, push: bool, say: Callable[[str], None]) -> list[str]:
    """Build the zTOCs of the layers not in ``out``, push them (``push``), cache them, add them to ``out``.

    The zTOCs are built as files in a temporary folder under the store's ``tmp/`` (memory
    does not grow with a layer's file count) and copied into the node's zTOC cache; the
    folder goes when this returns.  Returns the layers built.
    """
    scratch = Layout(settings.root).tmp()
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="ztoc-build-") as folder:
        made = build_layer_ztocs(client, resolved, into=Path(folder), span_size=settings.span_size,
                                 min_layer_size=settings.min_layer_size, build_tool_identifier=BUILD_TOOL_IDENTIFIER,
                                 workers=max(1, os.cpu_count() or 1))
        built = {d: z for d, z in made.ztocs.items() if d not in out}
        if built and push:
            try:
                push_soci_index(client, resolved, {d: z.path for d, z in built.items()}, settings.span_size,
                                BUILD_TOOL_IDENTIFIER)
                say("pushed a SOCI index with them, so the nodes fetch the zTOCs by digest")
            except AuthenticationFailed as err:
                say(f"cannot push the SOCI index ({err}); those layers go whole to the fleet")
                return []
        for digest, made_one in built.items():
            zdigest = cache.put_file(made_one.path, made_one.digest)
            z = cache.get(zdigest)
            out[digest] = SpanLayer(zdigest, z.num_spans, z.uncompressed_archive_size, len(z.files), made_one.size)
    return list(built)


def estimate_unpacked_size(client: RegistryClient, ref: Reference, digest: str, size: int, media_type: str) -> int:
    """Uncompressed bytes of a layer without downloading it, for the space check.

    gzip: the ISIZE trailer (last 4 bytes, size mod 2**32 of the last member), lifted to the
    smallest value not below the compressed size; pigz-style layers have several members,
    so that can be low, and is never taken below 2x the compressed size.  zstd: 4x.
    Uncompressed tar: its size.
    """
    if is_gzip(media_type) and size >= 18:
        tail = client.fetch_range(ref.registry, ref.repository, digest, size - 4, size)
        isize = int.from_bytes(tail, "little")
        while isize < size:
            isize += 1 << 32
        return max(isize, 2 * size)
    if media_type.endswith(("tar", "diff.tar")):
        return size
    return 4 * size


def check_space_before_download(store: ContentStore, client: RegistryClient, resolved: ResolvedImage,
                                known: dict[str, int] | None = None) -> None:
    """Refuse a job that cannot fit on this node before any layer byte is fetched.

    Raises:
        InsufficientSpace: naming the store, what is free and what is needed.
    """
    known = known or {}
    needed, seen = 0, set()
    for layer in resolved.layers:
        if layer.digest in seen or store.is_ready(layer.digest):
            continue
        seen.add(layer.digest)
        needed += known.get(layer.digest) or estimate_unpacked_size(
            client, resolved.reference, layer.digest, layer.size, layer.media_type)
    if needed:
        store.check_space(needed)


#: Up to this many first-window messages the scheduler sends them itself (a job starts at
#: once); above it, each node's worker releases its own window at its next heartbeat, so
#: launching on a thousand nodes costs one Redis write per node, not a message per task.
EAGER_RELEASE_LIMIT = 2048


def launch(r: redis.Redis, broker_url: str, plan: ImagePlan, image: str, nodes: Sequence[str], *,
           window: int | None = None, present: dict[str, set[int]] | None = None,
           keep: dict[str, str | list[str]] | None = None, signer: TaskSigner | None = None) -> str:
    """Record the job; release the first ``window`` tasks of every node (default
    :data:`DEFAULT_WINDOW`), or leave that to the nodes.  With ``signer`` every task body
    is signed here, once (:mod:`prewarm.fleet.signing`)."""
    window = window or DEFAULT_WINDOW
    job_id = uuid.uuid4().hex[:12]
    signed = dispatch.sign_plan(signer, plan, job_id, image) if signer is not None else None
    job_id = jobs.create_job(r, plan, nodes, window=window, image=image, job_id=job_id, present=present,
                             keep=keep, signed=signed)
    if len(nodes) * window <= EAGER_RELEASE_LIMIT:
        app = dispatch.sender(broker_url)
        for node in nodes:
            if jobs.mark_started(r, job_id, node):
                dispatch.release(app, r, plan, job_id, node, window)
    return job_id


def _window_of(r: redis.Redis, job_id: str) -> int:
    raw = r.hget(keys.job(job_id), "window")
    return int(raw) if isinstance(raw, (bytes, str)) and raw else DEFAULT_WINDOW


def start_own_windows(r: redis.Redis, app, node: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Called by a node's worker: release the first window of every job not yet started on it."""
    started = []
    for job_id in jobs.unstarted_jobs(r, node):
        if jobs.mark_started(r, job_id, node):
            plan = jobs.load_plan(r, job_id)
            window = _window_of(r, job_id)
            dispatch.release(app, r, plan, job_id, node, window)
            started.append(job_id)
    return started


#: How long a waiting scheduler rides out an unreachable Redis (a restart takes seconds).
REDIS_OUTAGE_LIMIT = 120.0


#: Longest pause between two polls of a waiting scheduler, reached while nothing moves.
MAX_POLL_INTERVAL = 2.0
#: Added to the pause between polls per node of the job: 1 s at 1,000 nodes.
POLL_SECONDS_PER_NODE = 0.001
#: How often a waiting scheduler looks at the heartbeats of the job's nodes (seconds).
NODE_CHECK_INTERVAL = 10.0


def wait_for_job(r: redis.Redis, job_id: str, *, on_update: Callable[[jobs.JobStatus], None] | None = None,
                 interval: float = 0.2, alive: Callable[[], None] | None = None,
                 timeout: float | None = None, node_down_limit: float | None = None) -> jobs.JobStatus:
    """Poll until the job is finished; ``alive`` may raise if local workers died.

    Each poll costs a constant number of round trips whatever the fleet size (the plan is
    read once), and the pause between polls grows to :data:`MAX_POLL_INTERVAL` while no
    byte moves.  A node whose heartbeat stopped for ``node_down_limit`` seconds has its
    pending layers failed ("node down"), so a job never waits forever on a dead node.

    Redis restarting (connection refused, or loading its data back) is a pause, not the end
    of the job: workers reconnect and resume, so the waiting scheduler keeps polling too.

    Raises:
        JobTimeout: the timeout passed first (the message names each unfinished node).
        JobError: Redis stayed unreachable for REDIS_OUTAGE_LIMIT seconds.
    """
    start = time.monotonic()
    unreachable_since: float | None = None
    plan = None
    pause, last_done = interval, -1
    next_node_check = start
    while True:
        try:
            status = jobs.job_status(r, job_id, plan)
            plan = status.plan
            if node_down_limit is not None and time.monotonic() >= next_node_check:
                next_node_check = time.monotonic() + NODE_CHECK_INTERVAL
                if fail_down_nodes(r, job_id, status, node_down_limit):
                    status = jobs.job_status(r, job_id, plan)
        except redis.exceptions.ConnectionError as err:  # BusyLoadingError is one too
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if now - unreachable_since > REDIS_OUTAGE_LIMIT:
                raise JobError(f"Redis unreachable for {REDIS_OUTAGE_LIMIT:.0f}s while waiting for job {job_id} "
                               f"({err}); the job goes on: follow it with `prewarm status {job_id}`") from err
            time.sleep(interval)
            continue
        unreachable_since = None
        if on_update:
            on_update(status)
        if status.finished:
            jobs.finish_job(r, job_id)
            return status
        if alive:
            alive()
        if timeout is not None and time.monotonic() - start > timeout:
            raise JobTimeout(timeout_report(status, timeout))
        # a large fleet is polled less often: each poll reads three hashes per node
        floor = max(interval, POLL_SECONDS_PER_NODE * len(status.nodes))
        pause = floor if status.bytes_done != last_done else min(max(MAX_POLL_INTERVAL, floor), pause * 1.5)
        last_done = status.bytes_done
        _pause_until_woken(r, job_id, pause)


def _pause_until_woken(r: redis.Redis, job_id: str, pause: float) -> None:
    """Wait ``pause`` seconds, or less if a node of the job reaches its end (:func:`jobs.settle`).

    The wait in Redis (BLPOP) stays under half the client's own read timeout: a longer one
    is a ``TimeoutError`` from redis-py, not an empty pop (the pause grows with the fleet,
    a millisecond per node); the rest of a longer pause is slept.
    """
    read_timeout = r.connection_pool.connection_kwargs.get("socket_timeout")
    blocked = min(pause, read_timeout / 2) if read_timeout else pause
    start = time.monotonic()
    try:
        if r.blpop([keys.job_wake(job_id)], timeout=max(blocked, 0.01)) is not None:
            return
    except redis.exceptions.ConnectionError:
        pass  # the next poll reports the outage
    time.sleep(max(0.0, pause - (time.monotonic() - start)))


def timeout_report(status: jobs.JobStatus, timeout: float) -> str:
    """One line per unfinished node: what it holds, what is left, and its last error."""
    lines = [(f"job {status.job_id} did not finish within {timeout:.0f}s (it goes on: `prewarm status "
              f"{status.job_id}` follows it); unfinished nodes:")]
    for name, node in sorted(status.nodes.items()):
        if node.state in ("succeeded", "failed", "cancelled"):
            continue
        pending = sum(1 for i in range(len(status.plan.layers))
                      if node.layers.get(i, jobs.LAYER_PENDING) == jobs.LAYER_PENDING)
        lines.append(f"  {name}: {node.state}, {node.bytes_done}/{node.bytes_total} bytes, "
                     f"{pending} layer(s) pending")
    return "\n".join(lines)


def fail_down_nodes(r: redis.Redis, job_id: str, status: jobs.JobStatus, limit: float) -> list[str]:
    """Fail the pending layers of the job's nodes whose heartbeat stopped more than ``limit`` s ago."""
    beats = {n.name: n.heartbeat for n in list_nodes(r)}
    now = time.time()
    failed = []
    for name, node in status.nodes.items():
        if node.state in ("succeeded", "failed", "cancelled"):
            continue
        silent = now - beats.get(name, 0.0)
        if silent > limit:
            why = (f"node {name} is down: no heartbeat for {silent:.0f}s (over {limit:.0f}s); "
                   "start its worker and schedule again")
            for i in range(len(status.plan.layers)):
                if node.layers.get(i, jobs.LAYER_PENDING) == jobs.LAYER_PENDING:
                    jobs.record_layer(r, job_id, name, i, jobs.LAYER_FAILED, why)
            failed.append(name)
    return failed


def require_nodes(r: redis.Redis, nodes: Sequence[str]) -> list[str]:
    """The named nodes (each must be registered), or every registered node.

    Raises:
        ConfigError: a named node never registered (a typo would otherwise wait forever).
        PrewarmError: no node is registered at all.
    """
    if nodes:
        members = {n.decode() if isinstance(n, bytes) else n for n in cast(set[bytes], r.smembers(keys.NODES))}
        unknown = [n for n in nodes if n not in members]
        if unknown:
            raise ConfigError(f"unknown node(s) {', '.join(unknown)}: no worker ever registered under "
                              "that name (prewarm nodes lists them)")
        return list(dict.fromkeys(nodes))
    members = cast(set[bytes], r.smembers(keys.NODES))
    known = sorted(n.decode() if isinstance(n, bytes) else n for n in members)
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
    #: the node takes spans from its peers (span sharing on)
    shares: bool = False


def dry_run(plan: ImagePlan, nodes: Sequence[tuple[str, frozenset[str], int | None]],
            budget_bytes_per_s: float | None = None,
            sharing: frozenset[str] = frozenset()) -> tuple[list[DryRunLine], int]:
    """Per node: bytes already present, bytes to fetch, free disk afterwards, time; plus total egress.

    ``nodes`` holds (name, ready layer digests, free bytes or None).  Time assumes every node
    runs at :data:`NOMINAL_NODE_RATE` unless the registry budget, shared by the fleet, is lower.
    Nodes in ``sharing`` (span sharing on) take from each other, so the registry sends a
    layer any of them needs about once for all of them; every other node costs its own bytes.
    """
    lines, egress = [], 0
    shared_need: set[str] = set()
    for name, held, free in nodes:
        present = sum(l.size for l in plan.layers if l.digest in held)
        fetch = plan.total_bytes - present
        unpacked = sum(l.uncompressed_size or 4 * l.size for l in plan.layers if l.digest not in held)
        if name in sharing:
            shared_need |= {l.digest for l in plan.layers if l.digest not in held}
        else:
            egress += fetch
        lines.append(DryRunLine(name, present, fetch, None if free is None else free - unpacked, 0.0,
                                name in sharing))
    egress += sum(l.size for l in plan.layers if l.digest in shared_need)
    fetching = sum(1 for line in lines if line.fetch_bytes)
    rate = float(NOMINAL_NODE_RATE)
    if budget_bytes_per_s and fetching:
        rate = min(rate, budget_bytes_per_s / fetching)
    return [dataclasses.replace(line, seconds=line.fetch_bytes / rate) for line in lines], egress


def join_standing_jobs(r: redis.Redis, app, node: str, labels: dict[str, str],  # type: ignore[no-untyped-def]
                       is_ready: Callable[[str], bool]) -> list[str]:
    """Called by a node's worker: join every standing schedule that matches it, release its window."""
    joined = []
    for job_id in jobs.standing_jobs_for(r, {**labels, jobs.NODE_NAME_LABEL: node}):
        plan = jobs.load_plan(r, job_id)
        ready = {i for i, layer in enumerate(plan.layers) if is_ready(layer.digest)}
        if jobs.add_node(r, job_id, node, plan, ready) and jobs.mark_started(r, job_id, node):
            window = _window_of(r, job_id)
            dispatch.release(app, r, plan, job_id, node, window)
            joined.append(job_id)
    return joined


def resend_stalled(r: redis.Redis, app, node: str, stall_seconds: float) -> list[str]:  # type: ignore[no-untyped-def]
    """Called by a node's worker: refill the window of jobs stalled on this node.

    The unfinished tasks already released are sent again first (their messages may be lost);
    if they are fewer than the window, the next ones are released, since a lost successor
    leaves no unfinished task behind to resend.  Tasks are idempotent, so a task that was only
    slow and is now sent twice lands once.
    """
    resent = []
    for job_id in jobs.stalled_jobs(r, node, stall_seconds):
        plan = jobs.load_plan(r, job_id)
        window = _window_of(r, job_id)
        cursor = jobs.released(r, job_id, node)
        todo = [k for k in jobs.unfinished_tasks(r, job_id, node, plan) if k < cursor][:window]
        for k in todo:
            dispatch.send_task(app, r, plan, job_id, node, k)
        more = dispatch.release(app, r, plan, job_id, node, window - len(todo))
        jobs.touch(r, job_id, node)
        if todo or more:
            log.warning("job %s stalled on %s: sent %d unfinished task(s) again, released %d more",
                        job_id, node, len(todo), more)
            resent.append(job_id)
    return resent
