"""Send span and layer tasks by name.  The only module of ``prewarm`` that imports Celery.

The scheduler never imports ``workers``: it names tasks (``prewarm.warm_span``,
``prewarm.warm_layer``) and routes each to the queue of the node whose store it fills.
Messages stay small and carry no credential: job, image reference, layer digest, first
span and span count.
"""

from __future__ import annotations

import functools

import celery
import redis

from prewarm.fleet import jobs, keys, peers
from prewarm.fleet.broker import celery_url
from prewarm.fleet.plan import ImagePlan

TASK_WARM_SPAN = "prewarm.warm_span"
TASK_WARM_LAYER = "prewarm.warm_layer"


@functools.lru_cache(maxsize=4)
def sender(broker_url: str) -> celery.Celery:
    """A Celery app used only to send messages (no task module imported)."""
    app = celery.Celery("prewarm-sender", broker=celery_url(broker_url))
    app.conf.task_serializer = "json"
    app.conf.broker_connection_retry_on_startup = True
    return app


def send_task(app: celery.Celery, plan: ImagePlan, job_id: str, node: str, k: int) -> None:
    """Send the node's k-th task to its queue.

    The node does the plan's tasks in the plan's order, each layer started at the node's own
    point (:func:`peers.spread`): nodes fetch different span groups first and pass them on
    to each other.  ``k`` counts in the node's order everywhere (cursor, resends).
    """
    layer_index, span = plan.task_at(peers.spread(plan, k, node))
    layer = plan.layers[layer_index]
    common = {"job": job_id, "node": node, "image": plan.reference, "layer": layer.digest,
              "layer_index": layer_index}
    if layer.mode == "spans":
        app.send_task(TASK_WARM_SPAN, kwargs={**common, "ztoc": layer.ztoc_digest, "span": span,
                                              "count": layer.task_spans(span)},
                      queue=keys.node_queue(node))
    else:
        app.send_task(TASK_WARM_LAYER, kwargs=common, queue=keys.node_queue(node))


def release(app: celery.Celery, r: redis.Redis, plan: ImagePlan, job_id: str, node: str, count: int = 1) -> int:
    """Release up to ``count`` more tasks of the node's window; returns how many were sent."""
    sent = 0
    for _ in range(count):
        k = jobs.claim_next(r, job_id, node)
        if k is None:
            break
        send_task(app, plan, job_id, node, k)
        sent += 1
    return sent
