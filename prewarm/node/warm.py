"""What a node's worker does for one task: fetch, verify, inflate, land, and account.

The Celery tasks in ``workers.tasks`` are thin wrappers around :func:`warm_span` and
:func:`warm_layer`; everything here is plain Python that takes a :class:`NodeContext`,
so it can be read, tested and profiled without Celery.

Per span task (the hot path)::

    with span sharing on (prewarm.node.sharing): spans peers hold, from peers, verified;
    for the rest, claim the group's registry fetch, or wait for the node that has
    one Range GET of its adjacent spans' bytes     (registry, through the node's budget)
    then for each span:
    === verify the span digest                     (transport check; the layer digest is the real one)
    === inflate from the checkpoint, check the next checkpoint's window against our tail
    === land: TOC checked against the real tar headers, pwrite into pre-sized files,
        in-order hash of the compressed layer advanced, layer committed when complete
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator
from typing import BinaryIO

from redis import Redis

from prewarm.config import Settings
from prewarm.errors import BadZtoc, ConfigError, PlanMismatch, PrewarmError, RateLimited, Transient
from prewarm.fleet import jobs, peers
from prewarm.fleet.budget import RegistryBudget
from prewarm.fleet.plan import ImagePlan, LayerPlan
from prewarm.index.inflate import inflate_span
from prewarm.index.ztoc import Ztoc
from prewarm.node.metrics import BYTES_FETCHED, INFLATE_SECONDS, LAYERS, SPANS, TASKS_REFUSED
from prewarm.node.prepare import prepare_layers_ahead
from prewarm.node.sharing import Sharing
from prewarm.resolve.digest import verify
from prewarm.resolve.reference import Reference, parse_reference
from prewarm.resolve.registry.client import RegistryClient
from prewarm.resolve.registry.retry import RetryPolicy
from prewarm.runtime import gc
from prewarm.runtime.images import ImageRecord, record_prewarmed_image
from prewarm.store.content import ContentStore, fetch_range
from prewarm.store.layout import Layout
from prewarm.store.ztoc_cache import MAX_ZTOC_BYTES, ZtocCache

log = logging.getLogger(__name__)

#: Seconds between refreshes of a running job's gc pin (well inside gc.PIN_TTL).
PIN_REFRESH = 60.0
#: What a whole (unindexed) layer is assumed to unpack to, times its compressed size, for
#: the space check (the dry run assumes the same).
WHOLE_LAYER_EXPANSION = 4


@dataclasses.dataclass
class NodeContext:
    """What one worker process keeps between tasks: clients, store, caches."""

    settings: Settings
    redis: Redis
    client: RegistryClient
    store: ContentStore
    layout: Layout
    ztocs: ZtocCache
    budget: RegistryBudget
    #: Fleet span sharing (None: PREWARM_PEER_PORT=0, everything comes from the registry).
    sharing: Sharing | None = None
    _plans: dict[str, ImagePlan] = dataclasses.field(default_factory=dict)
    _refs: dict[str, Reference] = dataclasses.field(default_factory=dict)
    _ahead: set[str] = dataclasses.field(default_factory=set)
    _pinned: dict[str, float] = dataclasses.field(default_factory=dict)
    _verified: set[str] = dataclasses.field(default_factory=set)  # plans (by hash) checked here
    _verified_wrong: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def create(cls, settings: Settings, r: Redis) -> NodeContext:
        layout = Layout(settings.root)
        # A 429 must reach the fleet budget (warm_span's back-off) at once, not be waited out
        # inside the client while the rest of the fleet keeps asking.
        client = RegistryClient.from_settings(settings, retry=RetryPolicy(retry_rate_limited=False))
        return cls(settings, r, client, ContentStore(settings.root),
                   layout, ZtocCache(layout), RegistryBudget(r), Sharing.from_settings(settings, r))

    def plan(self, job_id: str) -> ImagePlan:
        plan = self._plans.get(job_id)
        if plan is None:
            plan = self._plans[job_id] = jobs.load_plan(self.redis, job_id)
            if len(self._plans) > 64:
                self._plans.pop(next(iter(self._plans)))
        return plan

    def pin(self, job_id: str, plan: ImagePlan) -> None:
        """Called by each task: admit the job here once, and keep its layers from ``prewarm gc``.

        Admitting checks, before the first byte of the job on this node:

        * that the registry is one this node allows (``PREWARM_REGISTRIES``), before any
          connection to it;
        * the image itself: the node resolves the plan's pinned reference
          (``repo@sha256:...``) and checks that the manifest and config digests, the layers
          with their sizes and media types, and the diff_ids are the plan's.  The plan comes
          from Redis, which anyone with its password can write; the registry's bytes are
          checked against the digest the job names;
        * the space: the layers not yet begun in this store must fit, at their zTOC's
          uncompressed size or, for whole layers, :data:`WHOLE_LAYER_EXPANSION` times their
          compressed size (the embedded scheduler checks before launching too).

        The pin is refreshed once a minute while tasks run.

        Raises:
            ConfigError: the registry is not allowed on this node.
            PlanMismatch: the plan is not the image's (counted, not retried).
            InsufficientSpace: the job's layers cannot fit in this node's store.
        """
        now = time.monotonic()
        last = self._pinned.get(job_id)
        if last is None:
            self._verify_plan(plan)
            begun = set(self.store.list_layers())
            needed = sum(layer.uncompressed_size or WHOLE_LAYER_EXPANSION * layer.size
                         for layer in plan.layers if layer.digest not in begun)
            if needed:
                self.store.check_space(needed)
            if self.sharing is not None:
                # zTOCs this node already has (an earlier job, a scheduler run here) go to
                # the peers that need them now, instead of one more copy from the registry.
                for layer in plan.layers:
                    if layer.ztoc_digest is not None and self.ztocs.has(layer.ztoc_digest):
                        self.sharing.offer_cached(layer.ztoc_digest, self.ztocs.path(layer.ztoc_digest))
        if last is None or now - last >= PIN_REFRESH:
            gc.pin(self.layout, job_id, (layer.digest for layer in plan.layers))
            self._pinned[job_id] = now
            if len(self._pinned) > 64:
                self._pinned.pop(next(iter(self._pinned)))

    def _verify_plan(self, plan: ImagePlan) -> None:
        # keyed by the whole plan: another plan naming the same manifest is checked on its own
        key = hashlib.sha256(plan.to_json().encode()).hexdigest()
        if key in self._verified:
            return
        if key in self._verified_wrong:  # refused once: not asked of the registry again
            raise PlanMismatch(f"the job's plan for {plan.reference} disagrees with the image this node verified "
                               f"({', '.join(self._verified_wrong[key])})")
        ref = parse_reference(plan.reference)
        if not self.settings.registry_allowed(ref.registry):
            raise ConfigError(f"registry {ref.registry} is not allowed on node {self.settings.node_name} "
                              "(PREWARM_REGISTRIES); add it there to pre-warm its images")
        if ref.digest != plan.manifest_digest:
            raise PlanMismatch(f"the job's image {plan.reference} is not pinned to its manifest "
                               f"{plan.manifest_digest}")
        # within the fleet's budget and its 429 back-off, like every request of a worker
        with _fleet_backoff_on_429(self, ref.registry), self.budget.request(ref.registry, 0):
            resolved = self.client.resolve(ref, plan.platform or None)
        wrong = [what for what, ours, theirs in (
            ("manifest digest", plan.manifest_digest, resolved.manifest_digest),
            ("config digest", plan.config_digest, resolved.config_digest),
            ("layers", [(plan.layers[i].digest, plan.layers[i].size, plan.layers[i].media_type)
                        for i in plan.layer_order],
             [(layer.digest, layer.size, layer.media_type) for layer in resolved.layers]),
            ("diff_ids", list(plan.diff_ids), list(resolved.diff_ids)),
        ) if ours != theirs]
        if wrong:
            TASKS_REFUSED.labels("plan").inc()
            self._verified_wrong[key] = wrong
            raise PlanMismatch(f"the job's plan for {plan.reference} disagrees with the image this node verified "
                               f"in the registry ({', '.join(wrong)}); the job was not made by a scheduler from "
                               "this image, refusing it")
        self._verified.add(key)

    def reference(self, image: str) -> Reference:
        ref = self._refs.get(image)
        if ref is None:
            ref = self._refs[image] = parse_reference(image)
        return ref


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a task did: bytes it accounts for, whether it fetched, whether the layer is now ready."""

    nbytes: int
    fetched: bool
    layer_ready: bool


def span_accounting_bytes(ztoc, index: int) -> int:  # type: ignore[no-untyped-def]
    """Compressed bytes a span accounts for, so that a layer's spans add up to its size exactly.

    Neighbouring spans may share one byte; each span counts from the end of the one before.
    """
    span = ztoc.span(index)
    start = ztoc.span(index - 1).compressed_end if index > 0 else 0
    return span.compressed_end - start


def warm_span(ctx: NodeContext, *, job: str, image: str, layer: str, layer_index: int,
              ztoc: str, span: int, count: int = 1, patient: bool = False) -> Outcome:
    """Fetch, verify, inflate and land spans ``span .. span + count - 1`` of one layer.

    The spans not yet in the store are fetched in one Range request (from the first of them
    to the last), then each is verified, inflated and landed in turn; a redelivered task
    fetches only what is still missing.

    With span sharing on, spans some peer holds come from peers first (verified before
    use); for the rest the node claims the group's registry fetch, and if another node has
    claimed it and ``patient`` is set, it raises ``ClaimedElsewhere`` so the task does other
    work first and comes back for the bytes from that node.

    Raises:
        RegistryError: fetching failed (``Transient`` ones are retried by the task).
        CorruptContent: a span, its zTOC or the layer do not match what vouches for them.
        StoreError: the store cannot take the span (disk full, ...).
    """
    plan = ctx.plan(job)
    lp = plan.layers[layer_index]
    if lp.digest != layer:
        raise ValueError(f"task names layer {layer} but the job's plan has {lp.digest} at {layer_index}")
    ctx.pin(job, plan)
    ref = ctx.reference(image)
    z = _ztoc(ctx, ref, ztoc, job=job, size=lp.ztoc_size, patient=patient)
    if not (count >= 1 and 0 <= span and span + count <= z.num_spans):
        raise ValueError(f"task names spans {span}..{span + count - 1} of layer {layer}, which has "
                         f"{z.num_spans}")
    _check_span_sizes(z, span, count, layer, ctx.settings.max_span_bytes)
    if z.uncompressed_archive_size > ctx.settings.max_expansion * max(lp.size, 1 << 20):
        raise BadZtoc(f"the zTOC of layer {layer} says it unpacks to {z.uncompressed_archive_size} bytes, over "
                      f"{ctx.settings.max_expansion}x its {lp.size} compressed bytes (PREWARM_MAX_EXPANSION)")
    nbytes = sum(span_accounting_bytes(z, i) for i in range(span, span + count))
    if ctx.store.is_ready(layer):
        SPANS.labels("present").inc(count)
        return Outcome(nbytes, False, True)
    store = ctx.store
    todo = [i for i in range(span, span + count) if not store.span_landed(layer, i)]
    if len(todo) < count:  # a redelivered task (landed bytes of a valid state only)
        store.prepare_layer(layer, z, diff_id=lp.diff_id)
        todo = [i for i in range(span, span + count) if not store.span_landed(layer, i)]
        SPANS.labels("present").inc(count - len(todo))
        if not todo:
            return Outcome(nbytes, False, store.finish_if_complete(layer, z))
    sharing = ctx.sharing
    shared: dict[int, bytes] = {}
    claimed = False
    if sharing is not None:
        shared = sharing.take_spans(job, layer, z, todo)
        if len(shared) < len(todo):
            claimed, owner = sharing.claim(layer, span)
            if not claimed and patient:
                if shared:  # land what peers already delivered (a group arriving span by span)
                    _fetch_and_land(ctx, plan, lp, ref, z, job, layer, layer_index, sorted(shared), shared, nbytes)
                raise peers.ClaimedElsewhere(f"span group {span} of layer {layer} is being fetched from the "
                                             f"registry by node {owner}; taking it from there later")
    try:
        return _fetch_and_land(ctx, plan, lp, ref, z, job, layer, layer_index, todo, shared, nbytes)
    finally:
        if claimed:
            assert sharing is not None
            sharing.release(layer, span)


def _fetch_and_land(ctx: NodeContext, plan: ImagePlan, lp: LayerPlan, ref: Reference, z: Ztoc,
                    job: str, layer: str, layer_index: int, todo: list[int], shared: dict[int, bytes],
                    nbytes: int) -> Outcome:
    """Fetch from the registry what peers did not deliver, then verify, inflate and land ``todo``."""
    store = ctx.store
    rest = [i for i in todo if i not in shared]
    data = header = b""
    start = 0
    if rest:
        start = fetch_range(z.span(rest[0]))[0]  # span 0 also brings the gzip header (layer digest)
        data = _registry_range(ctx, ref, layer, start, z.span(rest[-1]).compressed_end)
    if 0 in shared and z.span(0).compressed_start > 0:
        # The gzip header: no span digest covers it, so it never comes from a peer.
        header = _registry_range(ctx, ref, layer, 0, z.span(0).compressed_start)
    peers.count_bytes(ctx.redis, job, ctx.settings.node_name, registry=len(data) + len(header),
                      peers=sum(len(b) for b in shared.values()))
    if ctx.sharing is not None:
        ctx.sharing.give_back(sum(z.span(i).uncompressed_end - z.span(i).uncompressed_start for i in todo))
    whole = memoryview(data)
    bodies: dict[int, tuple[memoryview, memoryview]] = {}  # span -> (its compressed bytes, what inflates it)
    for i in todo:
        s = z.span(i)
        lo, hi = fetch_range(s)
        if i in shared:  # verified by take_spans
            body = compressed = memoryview(shared[i])
            if i == 0 and header:
                compressed = memoryview(header + shared[i])
        else:
            compressed = whole[lo - start:hi - start]
            body = compressed[s.compressed_start - lo:]
            verify(body, s.digest, what=f"span {i} of layer {layer} ({ref.registry}/{ref.repository})")
        bodies[i] = (body, compressed)
    if ctx.sharing is not None:
        # Verified: served to the nodes waiting for this group before it is even inflated,
        # and announced in one round trip for the whole group.
        ctx.sharing.keep_spans(layer, {i: body for i, (body, _) in bodies.items()})
    ready = False
    for i in todo:
        s = z.span(i)
        body, compressed = bodies.pop(i)
        next_window = z.checkpoint(i + 1).window if i + 1 < z.num_spans and s.checkpoint else None
        with INFLATE_SECONDS.time():
            # The last span keeps the zero padding after the archive end: the diff_id covers it.
            last = i == z.num_spans - 1
            out = inflate_span(s, body, next_window=next_window, is_last=last, keep_padding=last)
        # Prepared after fetching and inflating: while one process of the node validates a cold
        # layer's TOC (under the layer lock), the others fetch and inflate instead of waiting.
        store.prepare_layer(layer, z, diff_id=lp.diff_id)
        ready = store.land_span(layer, z, i, compressed, out).ready
        SPANS.labels("fetched").inc()
    prepare_ahead(ctx, plan, job, layer_index, ref)
    if ready:
        LAYERS.labels("ready").inc()
    return Outcome(nbytes, True, ready)


def _check_span_sizes(z: Ztoc, first: int, count: int, layer: str, ceiling: int) -> None:
    """Refuse, before any fetch, spans larger than the ceiling (a hostile or unusual zTOC).

    A span is fetched and inflated whole in memory; a zTOC with one huge span, or a gzip
    stream of one giant deflate block (no checkpoint can split it), would otherwise get a
    worker OOM-killed, its task redelivered and killed again, in a loop.

    Raises:
        BadZtoc: a span is over the ceiling (the layer fails; not retried).
    """
    for i in range(first, first + count):
        s = z.span(i)
        size = max(s.compressed_end - s.compressed_start, s.uncompressed_end - s.uncompressed_start)
        if size > ceiling:
            raise BadZtoc(f"span {i} of layer {layer} is {size} bytes, over the {ceiling}-byte ceiling for one "
                          "span (PREWARM_MAX_SPAN); its zTOC cannot be landed by spans: schedule it with "
                          "--index none to pull the layer whole")


def _registry_range(ctx: NodeContext, ref: Reference, layer: str, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` of a layer from the registry, within the fleet's budget."""
    with _fleet_backoff_on_429(ctx, ref.registry), ctx.budget.request(ref.registry, end - start):
        data = ctx.client.fetch_range(ref.registry, ref.repository, layer, start, end)
    BYTES_FETCHED.labels(ref.registry, "span").inc(len(data))
    return data


def _ztoc(ctx: NodeContext, ref: Reference, digest: str, *, job: str | None = None, size: int = 0,
          patient: bool = False) -> Ztoc:
    """The zTOC ``digest``: from the node's cache, from a peer, or from the registry.

    Why peers: zTOCs are registry egress too (a 32 KiB window per span, megabytes per
    layer), and every node of a job needs every one of them at its start; from the
    registry that is one more copy per node.  With span sharing on (and the plan giving the
    zTOC's size), peers are asked first, the first node to need it claims the registry
    fetch, and a ``patient`` task of another node raises ``ClaimedElsewhere`` to come back
    for it from that node.  Whatever a peer sends is checked against ``digest`` first.

    Raises:
        ClaimedElsewhere: another node is fetching it from the registry (``patient`` only).
    """
    if ctx.ztocs.has(digest):  # (one cached before this job was offered to peers when it was admitted)
        return ctx.ztocs.get(digest)
    sharing = ctx.sharing
    if sharing is None or job is None or not 0 < size <= MAX_ZTOC_BYTES:
        return _ztoc_from_registry(ctx, ref, digest)
    data = sharing.take_small_blob(job, digest, size, what=f"zTOC {digest}")
    if data is not None:
        ctx.ztocs.put(data, digest)
        sharing.keep_small_blob(digest, data)
        return ctx.ztocs.get(digest)
    mine, owner = sharing.claim(digest, None)
    if not mine and patient:
        raise peers.ClaimedElsewhere(f"zTOC {digest} is being fetched from the registry by node {owner}; "
                                     "taking it from there later")
    try:
        z = _ztoc_from_registry(ctx, ref, digest)
        sharing.keep_small_blob(digest, ctx.ztocs.path(digest).read_bytes())
        return z
    finally:
        if mine:
            sharing.release(digest, None)


def _ztoc_from_registry(ctx: NodeContext, ref: Reference, digest: str) -> Ztoc:
    """Fetch the zTOC within the fleet's registry budget, once per node: its size (a HEAD)
    is charged before it is fetched, and a 429 on it backs the whole fleet off like one on a span."""
    with ctx.ztocs.fetching(digest):  # one process of the node fetches it, the others wait for it
        if ctx.ztocs.has(digest):
            return ctx.ztocs.get(digest)
        with _fleet_backoff_on_429(ctx, ref.registry):
            with ctx.budget.request(ref.registry, 0):
                size = ctx.client.blob_exists(ref.registry, ref.repository, digest) or 0
            with ctx.budget.request(ref.registry, size):
                return ctx.ztocs.get(digest, ctx.client, ref.registry, ref.repository)


@contextlib.contextmanager
def _fleet_backoff_on_429(ctx: NodeContext, registry: str) -> Iterator[None]:
    """Any 429 from ``registry`` (span, zTOC or layer) makes the whole fleet wait its Retry-After.

    Raises:
        RateLimited: re-raised after the back-off is set, so the task is retried later.
    """
    try:
        yield
    except RateLimited as err:
        ctx.budget.backoff(registry, err.retry_after or 1.0)
        raise


def prepare_ahead(ctx: NodeContext, plan: ImagePlan, job: str, layer_index: int, ref: Reference) -> None:
    """Prepare the job's next span layer (in work order) while this one is still landing (once per process).

    Why: preparing a layer (checking its TOC, creating its tree) takes seconds for 70,000
    files, and every span of it waits for that; done ahead by one process, it overlaps the
    others' work on this layer.  :func:`prewarm.node.prepare.prepare_layers_ahead` does it
    (never waiting for the lock, leaving failures to the layer's own tasks); its zTOC is
    fetched within the fleet's registry budget, or from a peer; when another node is
    fetching it from the registry, the layer is not prepared ahead (its tasks take the
    zTOC from that node later) rather than fetched a second time.
    """
    nxt = plan.next_span_layer(layer_index)
    if nxt is None or nxt.digest in ctx._ahead or nxt.ztoc_digest is None:
        return
    ctx._ahead.add(nxt.digest)
    if len(ctx._ahead) > 256:
        ctx._ahead.clear()
    prepare_layers_ahead(ctx.store, [nxt], lambda digest: _ztoc(ctx, ref, digest, job=job, size=nxt.ztoc_size,
                                                                 patient=True))


def warm_layer(ctx: NodeContext, *, job: str, image: str, layer: str, layer_index: int,
               patient: bool = False) -> Outcome:
    """Stream one whole layer (no zTOC) into the store, verified against digest and diff_id.

    With span sharing on, a small layer comes from a peer when one holds it (staged and
    verified against the layer digest first), is claimed like a span group otherwise, and
    is kept for peers once the store has verified it.
    """
    plan = ctx.plan(job)
    lp = plan.layers[layer_index]
    if lp.digest != layer:
        raise ValueError(f"task names layer {layer} but the job's plan has {lp.digest} at {layer_index}")
    ctx.pin(job, plan)
    if ctx.store.is_ready(layer):
        return Outcome(lp.size, False, True)
    ref = ctx.reference(image)
    sharing = ctx.sharing if ctx.sharing is not None and ctx.sharing.blob_fits(lp.size) else None
    if sharing is None:
        _layer_from_registry(ctx, ref, lp, None)
        peers.count_bytes(ctx.redis, job, ctx.settings.node_name, registry=lp.size)
        return Outcome(lp.size, True, True)
    staged = sharing.take_blob(job, layer, lp.size)
    if staged is not None:
        try:
            with open(staged, "rb") as f:
                ctx.store.ingest_stream(layer, iter(lambda: f.read(1 << 20), b""), media_type=lp.media_type,
                                        diff_id=lp.diff_id)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        sharing.keep_blob(layer, staged)
        peers.count_bytes(ctx.redis, job, sharing.node, peers=lp.size)
        LAYERS.labels("ready").inc()
        return Outcome(lp.size, True, True)
    mine, owner = sharing.claim(layer, None)
    if not mine and patient:
        raise peers.ClaimedElsewhere(f"layer {layer} is being fetched from the registry by node {owner}; "
                                     "taking it from there later")
    staged = sharing.cache.staging(layer)
    try:
        with open(staged, "wb") as keep:
            _layer_from_registry(ctx, ref, lp, keep)
        sharing.keep_blob(layer, staged)
        peers.count_bytes(ctx.redis, job, sharing.node, registry=lp.size)
    finally:
        staged.unlink(missing_ok=True)
        if mine:
            sharing.release(layer, None)
    return Outcome(lp.size, True, True)


def _layer_from_registry(ctx: NodeContext, ref: Reference, lp: LayerPlan, keep: BinaryIO | None) -> None:
    """Stream the layer from the registry into the store (and into ``keep``, for peers, as it goes)."""
    try:
        with ctx.budget.request(ref.registry, 0), \
                ctx.client.stream_blob(ref.registry, ref.repository, lp.digest) as chunks:
            ctx.store.ingest_stream(lp.digest, _metered(ctx, ref.registry, chunks, keep),
                                    media_type=lp.media_type, diff_id=lp.diff_id,
                                    max_uncompressed=ctx.settings.max_expansion * max(lp.size, 1 << 20),
                                    chunks_verify=True)  # stream_blob checks the digest at its end
        LAYERS.labels("ready").inc()
    except RateLimited as err:
        ctx.budget.backoff(ref.registry, err.retry_after or 1.0)
        raise


def _metered(ctx: NodeContext, registry: str, chunks: Iterator[bytes],
             keep: BinaryIO | None = None) -> Iterator[bytes]:
    """Charge a streamed layer to the byte budget chunk by chunk (the lease is held outside)."""
    take = ctx.budget.take
    counter = BYTES_FETCHED.labels(registry, "layer")
    for chunk in chunks:
        take(registry, len(chunk))
        counter.inc(len(chunk))
        if keep is not None:
            keep.write(chunk)
        yield chunk


def complete_image(ctx: NodeContext, job: str, name: str, *, name_signed: bool = False) -> bool:
    """If every layer of the job's image is ready on this node, record the image and its chains.

    Idempotent: several workers may get here for the same image.  The image is recorded
    under ``name`` only when the scheduler signed it (``name_signed``) or this node resolves
    the name to the job's manifest itself; otherwise under the job's pinned reference, so
    a name read from Redis can never point at another image's tree.
    """
    plan = ctx.plan(job)
    if not all(ctx.store.is_ready(layer.digest) for layer in plan.layers):
        return False
    ctx.pin(job, plan)
    if not name_signed:
        name = _verified_name(ctx, name, plan)
    record = record_prewarmed_image(ctx.layout, name, plan)
    gc.unpin(ctx.layout, job)
    if ctx.settings.containerd_address is not None:
        register_in_containerd(ctx, record)
    return True


#: Tries to resolve an image name at the end of a job (a registry that fails now and then
#: must not cost the image its name): 8 tries, 0.2 s doubling to 2 s between them.
NAME_TRIES = 8


def _verified_name(ctx: NodeContext, name: str, plan: ImagePlan) -> str:
    """``name`` if it names the plan's manifest here and now, else the plan's pinned reference."""
    try:
        ref = parse_reference(name)
        if ref.digest is not None:
            named = ref.digest
        else:
            for attempt in range(NAME_TRIES):
                try:
                    with _fleet_backoff_on_429(ctx, ref.registry), ctx.budget.request(ref.registry, 0):
                        named = ctx.client.resolve(ref, plan.platform or None).manifest_digest
                    break
                except PrewarmError as err:
                    # Transient is a mixin, not an exception class: `except Transient` raised a
                    # TypeError as soon as anything failed, and the task died with the name unrecorded
                    if not isinstance(err, Transient) or attempt == NAME_TRIES - 1:
                        raise
                    time.sleep(min(2.0, 0.2 * 2**attempt))
    except PrewarmError as err:
        log.warning("image name %r of job for %s cannot be verified (%s); recording it as %s",
                    name, plan.manifest_digest, err, plan.reference)
        return plan.reference
    if named != plan.manifest_digest:
        log.warning("image name %r resolves to %s on this node, not to the job's %s; recording the job's image "
                    "as %s", name, named, plan.manifest_digest, plan.reference)
        return plan.reference
    return name


def register_in_containerd(ctx: NodeContext, record: ImageRecord) -> None:
    """Register a completed image in the node's containerd (worker --containerd).

    A failure is logged, not raised: the layers are ready and stay so; the task must not be
    retried for it. `prewarm schedule IMAGE --wait --containerd SOCKET` without a broker, on the
    node, registers it again and fetches nothing once the layers are ready.
    """
    from prewarm.runtime.containerd import ContainerdClient, register_from_registry

    assert ctx.settings.containerd_address is not None
    try:
        done = register_from_registry(ContainerdClient(ctx.settings.containerd_address,
                                                       ctx.settings.containerd_namespace),
                                      ctx.layout, record, ctx.client)
    except PrewarmError as err:
        log.error("image %s is pre-warmed but could not be registered in containerd: %s", record.name, err)
        return
    log.info("image %s registered in containerd %s (namespace %s)", done.name, ctx.settings.containerd_address,
             done.namespace)


def account(ctx: NodeContext, *, job: str, node: str, layer_index: int, span: int, outcome: Outcome | None,
            error: str | None, name: str | None = None) -> None:
    """Record a finished task in the job: span counted once, layer state, image record when complete.

    ``name`` is the image name a signed task carries; only unsigned tasks take it from the
    job's record in Redis.
    """
    r = ctx.redis
    if outcome is not None:
        jobs.record_span(r, job, node, layer_index, span, outcome.nbytes)
        if outcome.layer_ready:
            # The image record is written before the layer counts as ready in the job: the
            # job reads "succeeded" only once `prewarm mounts IMAGE` works on the node (a
            # caller that stopped the worker at "succeeded" found no image record).
            image = name or jobs.job_image_name(r, job)
            try:
                if complete_image(ctx, job, image, name_signed=name is not None):
                    log.info("image %s complete on %s", image, node)
            finally:
                jobs.record_layer(r, job, node, layer_index, jobs.LAYER_READY)
            jobs.settle(r, job, node)
    else:
        jobs.record_span(r, job, node, layer_index, span, 0)
        # The first failure of a layer keeps its reason; later spans of it only count.
        if jobs.layer_state(r, job, node, layer_index) == jobs.LAYER_PENDING:
            jobs.record_layer(r, job, node, layer_index, jobs.LAYER_FAILED, error)
            LAYERS.labels("failed").inc()
            jobs.settle(r, job, node)


def layer_failed(ctx: NodeContext, job: str, node: str, layer_index: int) -> bool:
    return jobs.layer_state(ctx.redis, job, node, layer_index) == jobs.LAYER_FAILED

