"""Prometheus metrics of workers and the scheduler.

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
prewarm_store_bytes                gauge      - (bytes of ready layers on the node)
prewarm_peer_bytes_total           counter    direction (in | out): span bytes from / to peers
prewarm_peer_failures_total        counter    kind (corrupt | stalled | refused | busy | missing | error)
prewarm_peer_cache_bytes           gauge      - (bytes in the node's peer cache)
prewarm_job_bytes_done             gauge      job (scheduler, while waiting)
prewarm_job_bytes_total            gauge      job
=================================  =========  ==========================================
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BYTES_FETCHED = Counter("prewarm_bytes_fetched", "Bytes fetched from registries", ["registry", "kind"])
SPANS = Counter("prewarm_spans", "Span tasks by result", ["result"])
LAYERS = Counter("prewarm_layers", "Layers committed or failed", ["result"])
INFLATE_SECONDS = Histogram("prewarm_inflate_seconds", "Seconds inflating one span",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
ERRORS = Counter("prewarm_errors", "Failures by kind", ["kind"])
TASKS_REFUSED = Counter("prewarm_tasks_refused", "Task messages refused before any write, by what was wrong",
                        ["reason"])
STORE_BYTES = Gauge("prewarm_store_bytes", "Bytes of ready layers in the node's store",
                    multiprocess_mode="max")
PEER_BYTES = Counter("prewarm_peer_bytes", "Verified bytes received from and served to peers", ["direction"])
PEER_FAILURES = Counter("prewarm_peer_failures", "Peer fetches that failed, by kind", ["kind"])
PEER_CACHE_BYTES = Gauge("prewarm_peer_cache_bytes", "Bytes in the node's peer cache", multiprocess_mode="max")
JOB_BYTES_DONE = Gauge("prewarm_job_bytes_done", "Bytes done of a job", ["job"], multiprocess_mode="max")
JOB_BYTES_TOTAL = Gauge("prewarm_job_bytes_total", "Bytes of a job", ["job"], multiprocess_mode="max")


def serve(port: int, multiprocess: bool) -> None:
    """Serve /metrics on ``port`` (all interfaces: Prometheus scrapes the pod IP)."""
    if multiprocess:
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)
        start_http_server(port, registry=registry)
    else:
        start_http_server(port)
