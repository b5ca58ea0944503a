"""Thin tasks: deserialise, call :mod:`prewarm.node.warm`, map errors to retry or failure, account.

Retry policy lives here and only here: ``Transient`` errors (registry unavailable, rate
limited) are retried with capped exponential backoff and jitter; a span whose bytes do
not match its digest (corrupted in transit) is fetched again a few times; everything else
(corrupt layer, lying zTOC, unsafe archive, auth failure, disk full) fails the layer at
once with its reason, which ``prewarm status`` shows.  Each task, when it finishes either
way, releases the next task of its node's window.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import random
import time
from typing import NoReturn

import kombu.exceptions
import redis
from celery import Task
from celery.exceptions import Ignore, Retry
from celery.signals import worker_init, worker_process_init

from prewarm.errors import DiffIdMismatch, DigestMismatch, PrewarmError, RateLimited, Transient
from prewarm.fleet import dispatch, jobs, keys
from prewarm.fleet.broker import redis_client
from prewarm.fleet.peers import ClaimedElsewhere
from prewarm.fleet.signing import VERIFIED, VERIFIED_KWARG
from prewarm.node.metrics import ERRORS, SPANS, TASKS_REFUSED
from prewarm.node.warm import NodeContext, Outcome, account, layer_failed, warm_layer, warm_span
from workers.app import app

log = logging.getLogger("prewarm.worker")

MAX_CORRUPT_SPAN_RETRIES = 3
#: Times a task puts itself back while another node fetches its span group from the registry
#: (other work runs meanwhile); after that it fetches from the registry itself.  A dead
#: claimant's lease lapses within PREWARM_PEER_LEASE and the group is taken over, so this
#: only bounds a live claimant that is very slow: about 4.5 minutes of waits in all (see
#: :func:`peer_wait_delay`), long enough for a claimant queued behind a tight registry
#: budget, short enough that a job never hangs on one.
MAX_PEER_WAITS = 100
#: The wait between two looks grows from 0.3 s to this: at 1,000 nodes with 32 tasks each in
#: flight, waiting tasks looking every 0.5 s were tens of thousands of messages a second.
PEER_WAIT_MAX_DELAY = 3.0

_ctx: NodeContext | None = None


@worker_init.connect
def _freeze_before_fork(**_: object) -> None:
    """Move everything the worker has built so far out of the cyclic GC's sight before the pool forks.

    Why: each pool process inherits the parent's objects (Celery, Redis, our modules)
    copy-on-write; every full collection in a child wrote GC headers on all of them,
    copying their pages (perf: gc_collect_main was the largest source of page faults in the
    pool processes of a cold pre-warm).  This is what ``gc.freeze`` is for; reference
    counting still frees these objects, only cycles among them are never collected.
    """
    gc.collect()
    gc.freeze()


@worker_process_init.connect
def _reset_context(**_: object) -> None:
    """Each forked worker process opens its own connections and file handles."""
    global _ctx
    _ctx = None
    _keep_freed_buffers()


def _keep_freed_buffers() -> None:
    """Let malloc reuse the span buffers it freed (a task's fetched bytes, 4 MiB inflated per span).

    Why: by default glibc maps buffers this large fresh and unmaps them when freed, or
    trims them off the heap, so every span's buffers were faulted in (and zeroed by the
    kernel) again: ~4% of a cold pre-warm's CPU in page faults (perf).  Buffers up to
    32 MiB (glibc's largest threshold) now come from the heap, and up to 64 MiB of freed
    heap is kept for the next span; the worker's memory stays bounded by its largest
    task, as before.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):  # not glibc: its defaults stay
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def context() -> NodeContext:
    global _ctx
    if _ctx is None:
        settings = app.conf.prewarm_settings
        _ctx = NodeContext.create(settings, redis_client(app.conf.broker_url))
    return _ctx


def peer_wait_delay(waits: int) -> float:
    """Seconds before a task waiting for another node's registry fetch looks again."""
    return min(PEER_WAIT_MAX_DELAY, 0.3 * 1.25 ** waits) * random.uniform(0.8, 1.2)


def _retry_delay(retries: int, err: BaseException, cap: float) -> float:
    if isinstance(err, RateLimited) and err.retry_after:
        return float(err.retry_after) + random.uniform(0, 1)
    return min(cap, 0.5 * 2**retries) * random.uniform(0.5, 1.0)


def _describe(err: BaseException, root: object = "PREWARM_ROOT") -> str:
    """The reason ``prewarm status`` shows; a full disk names the node's store, which the operator must free."""
    if isinstance(err, PrewarmError):
        return str(err)
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"disk full on this node's store {err.filename or root}: free space and re-run"
    return f"{type(err).__name__}: {err}"


#: Redis restarting, seen through redis-py (BusyLoadingError too) or through kombu's producer
#: (the send of the successor task, after its retries).
_BROKER_DOWN = (redis.exceptions.ConnectionError, kombu.exceptions.OperationalError)

#: How long a task waits for Redis to come back (a restart) before it gives up and is redelivered.
REDIS_OUTAGE_LIMIT = 120.0


def _run(task: Task, fn, ctx: NodeContext, kw: dict, signed: bool, name: str | None) -> None:  # type: ignore[no-untyped-def]
    """Run the task; while Redis is unreachable, wait and run it again (it is idempotent).

    A Redis restart must not fail a layer, nor lose the task's place in the node's window:
    a task that raised would be acked and never release its successor, so the window
    shrinks until the job stalls.  Landed spans are not fetched again and span counting
    is bitmap-idempotent, so running the whole task again once Redis is back is safe.
    """
    deadline = time.monotonic() + REDIS_OUTAGE_LIMIT
    while True:
        try:
            return _run_once(task, fn, ctx, kw, signed, name)
        except _BROKER_DOWN as err:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unreachable during %s (%s); waiting for it to come back", task.name, err)
            time.sleep(1.0)


def _refused(ctx: NodeContext, task: Task, kw: dict) -> str | None:  # type: ignore[type-arg]
    """Why this task must not run here (checked before it writes anything), or None."""
    why = jobs.task_refusal(ctx.redis, kw["job"], kw["node"], kw["layer_index"], ctx.settings.node_name)
    if why is None:
        try:
            plan = ctx.plan(kw["job"])
        except PrewarmError as err:
            return str(err)
        if kw["layer_index"] >= len(plan.layers):
            why = f"layer index {kw['layer_index']} is past the job's {len(plan.layers)} layers"
        elif kw.get("image") != plan.reference:
            # the registry fetched from is the plan's, never one a message names
            why = f"image {kw.get('image')!r} is not the job's {plan.reference}"
        elif kw.get("layer") != plan.layers[kw["layer_index"]].digest:
            why = f"layer {kw.get('layer')!r} is not layer {kw['layer_index']} of the job"
    if why is None and not (isinstance(kw.get("span", 0), int) and kw.get("span", 0) >= 0
                            and isinstance(kw.get("count", 1), int) and kw.get("count", 1) >= 1):
        why = f"span {kw.get('span')!r} / count {kw.get('count')!r} are not a non-negative index and a count"
    return why


def _run_once(task: Task, fn, ctx: NodeContext, kw: dict, signed: bool,  # type: ignore[no-untyped-def]
              name: str | None) -> None:
    if ctx.settings.trusted_certs and not signed:
        TASKS_REFUSED.labels("unsigned").inc()
        log.warning("refused %s %s: not signed by a scheduler this node trusts (PREWARM_TRUSTED_CERTS)",
                    task.name, {k: kw.get(k) for k in ("job", "node", "layer_index")})
        return
    # A signed body names no node: the queue it came from is this node's.
    kw = {**kw, "node": kw.get("node") or ctx.settings.node_name}
    job, node, layer_index = kw["job"], kw["node"], kw["layer_index"]
    span = kw.get("span", 0)
    # how often the task waited for another node's registry fetch: its kwargs when unsigned,
    # a header of the message when signed (the body is the scheduler's and cannot change)
    waits = kw.pop("waits", 0)
    if signed:
        waits = getattr(task.request, dispatch.WAITS_HEADER, 0)
    waits = waits if isinstance(waits, int) and 0 <= waits <= MAX_PEER_WAITS else MAX_PEER_WAITS
    outcome: Outcome | None = None
    error: str | None = None
    why = _refused(ctx, task, kw)
    if why == jobs.CANCELLED:  # queued before the cancel: nothing is fetched
        TASKS_REFUSED.labels("cancelled").inc()
        log.info("skipped %s of cancelled job %s", task.name, job)
        return
    if why is not None:
        TASKS_REFUSED.labels("task").inc()
        log.warning("refused %s %s: %s", task.name, {k: kw[k] for k in ("job", "node", "layer_index")}, why)
        return
    if layer_failed(ctx, job, node, layer_index):
        error = "layer already failed on this node"
    else:
        try:
            outcome = fn(ctx, patient=waits < MAX_PEER_WAITS, **{k: v for k, v in kw.items() if k != "node"})
        except (Retry, Ignore, *_BROKER_DOWN):
            raise
        except ClaimedElsewhere as err:
            _retry(task, ctx, kw, signed, err, peer_wait_delay(waits), waits + 1, waits=waits + 1)
        except Exception as err:  # every failure ends in a retry or a recorded reason
            retries = task.request.retries - waits  # waiting for a peer is not a failed attempt
            if isinstance(err, Transient) and retries < ctx.settings.transient_retries:
                _retry(task, ctx, kw, signed, err, _retry_delay(retries, err, ctx.settings.retry_max_delay),
                       ctx.settings.transient_retries + waits, waits=waits)
            # A diff_id mismatch is the image config against bytes that matched their own
            # digest: fetching them again cannot help.
            if isinstance(err, DigestMismatch) and not isinstance(err, DiffIdMismatch) \
                    and retries < MAX_CORRUPT_SPAN_RETRIES:
                log.warning("%s of %s corrupted in transit, fetching again: %s", f"span {span}" if "span" in kw else "whole layer", kw["layer"], err)
                _retry(task, ctx, kw, signed, err, 0.2, MAX_CORRUPT_SPAN_RETRIES + waits, waits=waits)
            if not isinstance(err, PrewarmError) and not isinstance(err, OSError):
                log.exception("unexpected error in %s", task.name)
            error = _describe(err, ctx.settings.root)
            ERRORS.labels(type(err).__name__).inc()
            SPANS.labels("failed").inc()
            log.error("%s %s failed: %s", task.name, kw, error)
    account(ctx, job=job, node=node, layer_index=layer_index, span=span, outcome=outcome, error=error, name=name)
    plan = ctx.plan(job)
    dispatch.release(app, ctx.redis, plan, job, node, 1)


def _retry(task: Task, ctx: NodeContext, kw: dict, signed: bool, err: Exception,  # type: ignore[type-arg]
           countdown: float, max_retries: int, *, waits: int) -> NoReturn:
    """Run the task again later: a signed task as the scheduler's same signed body.

    ``max_retries`` explicit: None would mean Celery's default of 3.  ``waits`` (how often
    the task waited for a peer) goes with it.  A signed task is not re-sent by
    ``task.retry`` (that would be a body this worker made, which no worker accepts): the
    job's signed body for it goes back into the queue with the next retry count, the waits
    and an eta, and this delivery ends.
    """
    if not signed:
        raise task.retry(exc=err, kwargs={**kw, "waits": waits}, countdown=countdown,
                         max_retries=max_retries) from err
    body = jobs.signed_body(ctx.redis, kw["job"], dispatch.signed_field(kw["layer_index"], kw.get("span", 0)))
    if body is None:
        raise err
    dispatch.publish_signed(app, keys.node_queue(kw["node"]), task.name, body,
                            retries=task.request.retries + 1, countdown=countdown, waits=waits)
    raise Ignore()


def _signed(extra: dict) -> bool:  # type: ignore[type-arg]
    return extra.get(VERIFIED_KWARG) == VERIFIED


@app.task(name=dispatch.TASK_WARM_SPAN, bind=True, acks_late=True)
def warm_span_task(self: Task, *, job: str, image: str, layer: str, layer_index: int, ztoc: str, span: int,
                   count: int = 1, node: str | None = None, name: str | None = None, waits: int = 0,
                   **extra: object) -> None:
    """Fetch, verify, inflate and store ``count`` adjacent spans of one layer on this node."""
    _run(self, warm_span, context(),
         {"job": job, "node": node, "image": image, "layer": layer, "layer_index": layer_index, "ztoc": ztoc,
          "span": span, "count": count, "waits": waits},
         _signed(extra), name)


@app.task(name=dispatch.TASK_WARM_LAYER, bind=True, acks_late=True)
def warm_layer_task(self: Task, *, job: str, image: str, layer: str, layer_index: int,
                    node: str | None = None, name: str | None = None, waits: int = 0, **extra: object) -> None:
    """Stream one whole layer (no zTOC) into this node's store."""
    _run(self, warm_layer, context(),
         {"job": job, "node": node, "image": image, "layer": layer, "layer_index": layer_index, "waits": waits},
         _signed(extra), name)
