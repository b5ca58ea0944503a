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

import kombu.exceptions
import redis
from celery import Task
from celery.exceptions import Retry
from celery.signals import worker_init, worker_process_init

from prewarm.fleet import dispatch
from prewarm.fleet.broker import redis_client
from prewarm.errors import DigestMismatch, PrewarmError, RateLimited, Transient
from prewarm.fleet.peers import ClaimedElsewhere
from prewarm.node.metrics import ERRORS, SPANS
from prewarm.node.warm import NodeContext, Outcome, account, layer_failed, warm_layer, warm_span
from workers.app import app

log = logging.getLogger("prewarm.worker")

MAX_TRANSIENT_RETRIES = 10
MAX_CORRUPT_SPAN_RETRIES = 3
#: Times a task puts itself back while another node fetches its span group from the registry
#: (about 0.5 s each, other work runs meanwhile); after that it fetches from the registry
#: itself, so a slow or lost claimant delays the node by at most this much.
MAX_PEER_WAITS = 60

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


def _retry_delay(retries: int, err: BaseException) -> float:
    if isinstance(err, RateLimited) and err.retry_after:
        return float(err.retry_after) + random.uniform(0, 1)
    return min(60.0, 0.5 * 2**retries) * random.uniform(0.5, 1.0)


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


def _run(task: Task, fn, ctx: NodeContext, kw: dict) -> None:  # type: ignore[no-untyped-def]
    """Run the task; while Redis is unreachable, wait and run it again (it is idempotent).

    A Redis restart must not fail a layer, nor lose the task's place in the node's window:
    a task that raised would be acked and never release its successor, so the window
    shrinks until the job stalls.  Landed spans are not fetched again and span counting
    is bitmap-idempotent, so running the whole task again once Redis is back is safe.
    """
    deadline = time.monotonic() + REDIS_OUTAGE_LIMIT
    while True:
        try:
            return _run_once(task, fn, ctx, kw)
        except _BROKER_DOWN as err:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unreachable during %s (%s); waiting for it to come back", task.name, err)
            time.sleep(1.0)


def _run_once(task: Task, fn, ctx: NodeContext, kw: dict) -> None:  # type: ignore[no-untyped-def]
    job, node, layer_index = kw["job"], kw["node"], kw["layer_index"]
    span = kw.get("span", 0)
    waits = kw.get("waits", 0)
    outcome: Outcome | None = None
    error: str | None = None
    if layer_failed(ctx, job, node, layer_index):
        error = "layer already failed on this node"
    else:
        try:
            outcome = fn(ctx, patient=waits < MAX_PEER_WAITS, **{k: v for k, v in kw.items() if k not in ("node", "waits")})
        except (Retry, *_BROKER_DOWN):
            raise
        except ClaimedElsewhere as err:
            raise task.retry(exc=err, kwargs={**kw, "waits": waits + 1}, countdown=random.uniform(0.3, 0.7),
                             max_retries=None) from err
        except Exception as err:  # noqa: BLE001 - every failure ends in a retry or a recorded reason
            retries = task.request.retries - waits  # waiting for a peer is not a failed attempt
            if isinstance(err, Transient) and retries < MAX_TRANSIENT_RETRIES:
                raise task.retry(exc=err, countdown=_retry_delay(retries, err), max_retries=None) from err
            if isinstance(err, DigestMismatch) and retries < MAX_CORRUPT_SPAN_RETRIES:
                log.warning("%s of %s corrupted in transit, fetching again: %s", f"span {span}" if "span" in kw else "whole layer", kw["layer"], err)
                raise task.retry(exc=err, countdown=0.2, max_retries=None) from err
            if not isinstance(err, PrewarmError) and not isinstance(err, OSError):
                log.exception("unexpected error in %s", task.name)
            error = _describe(err, ctx.settings.root)
            ERRORS.labels(type(err).__name__).inc()
            SPANS.labels("failed").inc()
            log.error("%s %s failed: %s", task.name, kw, error)
    account(ctx, job=job, node=node, layer_index=layer_index, span=span, outcome=outcome, error=error)
    plan = ctx.plan(job)
    dispatch.release(app, ctx.redis, plan, job, node, 1)


@app.task(name=dispatch.TASK_WARM_SPAN, bind=True, acks_late=True)
def warm_span_task(self: Task, *, job: str, node: str, image: str, layer: str, layer_index: int,
                   ztoc: str, span: int, count: int = 1, waits: int = 0) -> None:
    """Fetch, verify, inflate and store ``count`` adjacent spans of one layer on this node."""
    _run(self, warm_span, context(), dict(job=job, node=node, image=image, layer=layer,
                                          layer_index=layer_index, ztoc=ztoc, span=span, count=count,
                                          waits=waits))


@app.task(name=dispatch.TASK_WARM_LAYER, bind=True, acks_late=True)
def warm_layer_task(self: Task, *, job: str, node: str, image: str, layer: str, layer_index: int,
                    waits: int = 0) -> None:
    """Stream one whole layer (no zTOC) into this node's store."""
    _run(self, warm_layer, context(), dict(job=job, node=node, image=image, layer=layer,
                                           layer_index=layer_index, waits=waits))
