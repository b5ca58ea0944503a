"""Prometheus metrics of workers and the scheduler, and the worker's health endpoint.

Workers run several processes (Celery prefork), so metrics use prometheus_client's
multiprocess mode: ``prewarm worker`` sets ``PROMETHEUS_MULTIPROC_DIR`` before anything
imports prometheus_client and serves the merged view on ``PREWARM_METRICS_PORT``.
Flower serves its own task metrics on ``/metrics`` beside these.

=================================  =========  ==========================================
metric                             type       labels
=================================  =========  ==========================================
prewarm_bytes_fetched_total        counter    registry, kind (span | layer)
prewarm_spans_total                counter    result (fetched | present | failed)
prewarm_layers_total               counter    result (ready | failed)
prewarm_inflate_seconds            histogram  -
prewarm_errors_total               counter    kind (error class name)
prewarm_tasks_refused_total        counter    reason (unsigned | cancelled | task)
prewarm_store_bytes                gauge      - (unpacked bytes of ready layers on the node)
prewarm_peer_bytes_total           counter    direction (in | out): span bytes from / to peers
prewarm_peer_failures_total        counter    kind (corrupt | stalled | refused | busy | missing | error)
prewarm_peer_cache_bytes           gauge      - (bytes in the node's peer cache)
prewarm_job_bytes_done             gauge      job: on a worker, this node's share of an active
                                              job; on the scheduler, the whole job
prewarm_job_bytes_total            gauge      job (same split)
=================================  =========  ==========================================

``prewarm_store_bytes`` and a worker's job gauges are read when Prometheus scrapes (the
store's ready records; one pipelined Redis read of the node's active jobs), so they are
right after a gc, a restart or another process's work without anyone having to set them.
The scheduler (``prewarm schedule --wait`` on a fleet) sets its job gauges at each poll.

The same port answers ``GET /healthz`` (see :class:`Health`): what the Kubernetes
liveness and readiness probes of a worker ask.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from prewarm.errors import ConfigError, PrewarmError

if TYPE_CHECKING:
    from redis import Redis

    from prewarm.fleet.jobs import JobStatus

log = logging.getLogger(__name__)

BYTES_FETCHED = Counter("prewarm_bytes_fetched", "Bytes fetched from registries", ["registry", "kind"])
SPANS = Counter("prewarm_spans", "Span tasks by result", ["result"])
LAYERS = Counter("prewarm_layers", "Layers committed or failed", ["result"])
INFLATE_SECONDS = Histogram("prewarm_inflate_seconds", "Seconds inflating one span",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
ERRORS = Counter("prewarm_errors", "Failures by kind", ["kind"])
TASKS_REFUSED = Counter("prewarm_tasks_refused", "Task messages refused before any write, by what was wrong",
                        ["reason"])
PEER_BYTES = Counter("prewarm_peer_bytes", "Verified bytes received from and served to peers", ["direction"])
PEER_FAILURES = Counter("prewarm_peer_failures", "Peer fetches that failed, by kind", ["kind"])
PEER_CACHE_BYTES = Gauge("prewarm_peer_cache_bytes", "Bytes in the node's peer cache", multiprocess_mode="max")
#: The scheduler's view of a job (set by :func:`observe_job`); a worker reports its own
#: share through :class:`JobCollector` under the same names.
JOB_BYTES_DONE = Gauge("prewarm_job_bytes_done", "Bytes done of a job", ["job"], multiprocess_mode="max")
JOB_BYTES_TOTAL = Gauge("prewarm_job_bytes_total", "Bytes of a job", ["job"], multiprocess_mode="max")

#: A worker whose Celery consumer sent no heartbeat for this long is unhealthy (Celery
#: sends one every 2 s while it is connected to the broker).
HEALTH_STALE_SECONDS = 10.0
#: Active jobs a worker reports gauges for (the first by id): a scrape stays a bounded read.
MAX_JOB_GAUGES = 256
#: How long /healthz waits for Redis to answer a PING.
HEALTH_PING_TIMEOUT = 2.0


def observe_job(status: JobStatus) -> None:
    """Set the scheduler's job gauges from one poll of ``status``."""
    JOB_BYTES_DONE.labels(status.job_id).set(status.bytes_done)
    JOB_BYTES_TOTAL.labels(status.job_id).set(status.bytes_total)


class StoreCollector(Collector):
    """``prewarm_store_bytes``: the unpacked size of the ready layers under ``root``, at scrape time.

    A ready record never changes once written, so each layer's size is read once and kept
    until the layer is gone.
    """

    def __init__(self, root: Path) -> None:
        from prewarm.store.content import ContentStore

        self._store = ContentStore(root)
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()

    def store_bytes(self) -> int:
        with self._lock:
            present = set()
            for digest in self._store.list_layers():
                if digest not in self._sizes:
                    if not self._store.is_ready(digest):
                        continue
                    try:
                        info = self._store.ready_info(digest)
                    except (PrewarmError, OSError, ValueError) as err:  # removed meanwhile, or a torn record
                        log.debug("store bytes: layer %s not counted: %s", digest, err)
                        continue
                    size = info.get("uncompressed_size")
                    self._sizes[digest] = size if isinstance(size, int) and size >= 0 else 0
                present.add(digest)
            for gone in set(self._sizes) - present:
                del self._sizes[gone]
            return sum(self._sizes.values())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("prewarm_store_bytes", "Unpacked bytes of ready layers in the node's store",
                                value=self.store_bytes())


class JobCollector(Collector):
    """A worker's ``prewarm_job_bytes_done``/``_total``: this node's share of each active job.

    Read at scrape time: the members of the active-jobs set, then one pipeline of the
    node's counters in each (two round trips whatever the number of jobs; at most
    :data:`MAX_JOB_GAUGES` jobs).  Redis being
    down leaves the gauges out of that scrape (and /healthz says why).
    """

    def __init__(self, redis: Redis, node: str) -> None:
        self._redis = redis
        self._node = node

    def progress(self) -> dict[str, tuple[int, int]]:
        """Per active job of this node: (bytes done, bytes total)."""
        from prewarm.fleet import keys

        members = cast("set[bytes | str]", self._redis.smembers(keys.ACTIVE_JOBS))
        job_ids = sorted(j.decode() if isinstance(j, bytes) else j for j in members)[:MAX_JOB_GAUGES]
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job_node(job_id, self._node), ["bytes_done", "bytes_total"])
        out = {}
        for job_id, (done, total) in zip(job_ids, pipe.execute()):
            if total is None:
                continue  # not a job of this node
            out[job_id] = (int(done or 0), int(total))
        return out

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import redis

        try:
            progress = self.progress()
        except (redis.exceptions.RedisError, ValueError):
            return
        done = GaugeMetricFamily("prewarm_job_bytes_done", "Bytes done of a job on this node", labels=["job"])
        total = GaugeMetricFamily("prewarm_job_bytes_total", "Bytes of a job on this node", labels=["job"])
        for job_id, (d, t) in progress.items():
            done.add_metric([job_id], d)
            total.add_metric([job_id], t)
        yield done
        yield total


class Health:
    """Whether a worker can do work: its Celery consumer is connected and Redis answers.

    The consumer's proof of life is Celery's event heartbeat (``heartbeat_sent``, every
    2 s): Celery stops it when the broker connection breaks and starts it again once it
    has reconnected, so a heartbeat older than :data:`HEALTH_STALE_SECONDS` means the
    consumer is not consuming (not started yet, reconnecting, or wedged).  Redis itself
    is asked too, with a short timeout, because a heartbeat sent just before Redis went
    away is still fresh for a few seconds.  (A worker started with Celery's
    ``--without-heartbeat`` is therefore never healthy: do not pass it.)

    Args:
        ping: asks Redis (raises when it does not answer).
        stale_after: seconds after which a heartbeat no longer counts.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, ping: Callable[[], object], *, stale_after: float = HEALTH_STALE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ping = ping
        self._stale_after = stale_after
        self._clock = clock
        self._last_beat: float | None = None

    def beat(self, **_: object) -> None:
        """Record a consumer heartbeat (a ``celery.signals.heartbeat_sent`` receiver)."""
        self._last_beat = self._clock()

    def check(self) -> tuple[bool, str]:
        """(healthy, why): one line for the probe's log."""
        if self._last_beat is None:
            return False, "the Celery consumer has not started consuming yet"
        age = self._clock() - self._last_beat
        if age > self._stale_after:
            return False, f"the Celery consumer sent no heartbeat for {age:.0f} s (broker connection lost?)"
        try:
            self._ping()
        except Exception as err:  # noqa: BLE001 - any failure to answer is the answer
            return False, f"Redis does not answer: {err.__class__.__name__}: {err}"
        return True, "ok"


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape and probe."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _app(registry: CollectorRegistry, health: Health | None) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            if health is None:  # the scheduler: nothing to probe, and no pretending
                start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
                return [b"no health check here\n"]
            ok, why = health.check()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")])
            return [(why + "\n").encode()]
        return metrics(environ, start_response)

    return app


def serve(port: int, *, multiprocess: bool, collectors: Iterable[Collector] = (),
          health: Health | None = None, addr: str = "0.0.0.0") -> WSGIServer:
    """Serve ``/metrics`` (and ``/healthz`` when ``health`` is given) on ``port``, in a thread.

    All interfaces by default: Prometheus scrapes, and the kubelet probes, the pod IP.

    Raises:
        ConfigError: the port cannot be bound (taken, or privileged).

    Args:
        multiprocess: merge the metrics of every process writing to PROMETHEUS_MULTIPROC_DIR
            (a worker's pool) instead of this process's own.
        collectors: read at each scrape (:class:`StoreCollector`, :class:`JobCollector`).
    """
    from prometheus_client import REGISTRY

    if multiprocess:
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    for collector in collectors:
        registry.register(collector)
    try:
        server = make_server(addr, port, _app(registry, health), ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as err:
        raise ConfigError(f"cannot serve metrics on {addr}:{port} ({err.strerror}); set PREWARM_METRICS_PORT "
                          "(or --metrics-port) to a free port, or unset it") from None
    threading.Thread(target=server.serve_forever, name="prewarm-metrics", daemon=True).start()
    return server
