"""Send span and layer tasks by name.  With :mod:`.signing`, the only modules of ``prewarm`` that import Celery.

The scheduler never imports ``workers``: it names tasks (``prewarm.warm_span``,
``prewarm.warm_layer``) and routes each to the queue of the node whose store it fills.
Messages stay small and carry no credential: job, image reference, layer digest, first
span and span count.
"""

from __future__ import annotations

import functools
from uuid import uuid4

import celery
import redis

from prewarm.errors import JobError
from prewarm.fleet import jobs, keys, peers
from prewarm.fleet.broker import celery_url
from prewarm.fleet.plan import ImagePlan
from prewarm.fleet.signing import SIGNED_CONTENT_TYPE, TaskSigner

TASK_WARM_SPAN = "prewarm.warm_span"
TASK_WARM_LAYER = "prewarm.warm_layer"
#: Message header of a signed task that waited for another node's registry fetch (peers).
WAITS_HEADER = "prewarm_waits"


@functools.lru_cache(maxsize=4)
def sender(broker_url: str) -> celery.Celery:
    """A Celery app used only to send messages (no task module imported)."""
    app = celery.Celery("prewarm-sender", broker=celery_url(broker_url))
    app.conf.task_serializer = "json"
    app.conf.broker_connection_retry_on_startup = True
    return app


def task_kwargs(plan: ImagePlan, job_id: str, name: str | None, k: int) -> tuple[str, dict[str, object]]:
    """The k-th task of the plan: its Celery name and keyword arguments, the same for every node.

    ``name`` is the image as the user named it, in signed bodies: a worker records the
    image under the name its signed task carries, not one read from Redis.
    """
    layer_index, span = plan.task_at(k)
    layer = plan.layers[layer_index]
    common: dict[str, object] = {"job": job_id, "image": plan.reference, "layer": layer.digest,
                                 "layer_index": layer_index}
    if name is not None:
        common["name"] = name
    if layer.mode == "spans":
        return TASK_WARM_SPAN, {**common, "ztoc": layer.ztoc_digest, "span": span, "count": layer.task_spans(span)}
    return TASK_WARM_LAYER, common


def signed_field(layer_index: int, span: int) -> str:
    """Where a task's signed body is kept in the job (by layer and first span, not by order)."""
    return f"{layer_index}:{span}"


def sign_plan(signer: TaskSigner, plan: ImagePlan, job_id: str, name: str) -> dict[str, bytes]:
    """Every task body of the job, signed once for all nodes (see :mod:`prewarm.fleet.signing`)."""
    out = {}
    for k in range(plan.task_count):
        _, kwargs = task_kwargs(plan, job_id, name, k)
        out[signed_field(*plan.task_at(k))] = signer.sign(kwargs)
    return out


def publish_signed(app: celery.Celery, queue: str, task_name: str, body: bytes, *, retries: int = 0,
                   countdown: float | None = None, waits: int = 0) -> None:
    """Put a task whose body the scheduler signed into ``queue``, the body untouched.

    The headers (a fresh task id, ``retries``, the eta of ``countdown``, how often the task
    already ``waits``-ed for another node's registry fetch) are built here the way Celery
    builds them; they are not signed, and the worker takes nothing from them that could
    make it do more than the signed body says.
    """
    message = app.amqp.as_task_v2(str(uuid4()), task_name, args=(), kwargs={}, retries=retries, countdown=countdown,
                                  ignore_result=True, argsrepr="()", kwargsrepr="(signed)")
    with app.producer_or_acquire() as producer:
        app.amqp.send_task_message(producer, task_name, message._replace(body=body), queue=queue,
                                   headers={WAITS_HEADER: waits} if waits else None,
                                   content_type=SIGNED_CONTENT_TYPE, content_encoding="utf-8")


def send_task(app: celery.Celery, r: redis.Redis, plan: ImagePlan, job_id: str, node: str, k: int) -> None:
    """Send the node's k-th task to its queue: the job's signed body for it, if it has them.

    The node does the plan's tasks in the plan's order, each layer started at the node's own
    point (:func:`peers.spread`): nodes fetch different span groups first and pass them on
    to each other.  ``k`` counts in the node's order everywhere (cursor, resends).

    Raises:
        JobError: the job is signed but its signed body for this task is missing.
    """
    signed, alone = jobs.dispatch_flags(r, job_id)
    index = peers.node_order(plan, k, node, alone)
    if signed:
        field = signed_field(*plan.task_at(index))
        body = jobs.signed_body(r, job_id, field)
        if body is None:
            raise JobError(f"job {job_id} is signed but has no signed body for task {field}; schedule it again")
        publish_signed(app, keys.node_queue(node), task_kwargs(plan, job_id, None, index)[0], body)
        return
    task_name, kwargs = task_kwargs(plan, job_id, None, index)
    kwargs = {"job": job_id, "node": node, **kwargs}  # the node's name right after the job's, as always
    app.send_task(task_name, kwargs=kwargs, queue=keys.node_queue(node))


def release(app: celery.Celery, r: redis.Redis, plan: ImagePlan, job_id: str, node: str, count: int = 1) -> int:
    """Release up to ``count`` more tasks of the node's window; returns how many were sent."""
    sent = 0
    for _ in range(count):
        k = jobs.claim_next(r, job_id, node)
        if k is None:
            break
        send_task(app, r, plan, job_id, node, k)
        sent += 1
    return sent
