"""Job records in Redis: what was asked, and per node and per layer, what is true.

A job is one image pre-warmed on a set of nodes.  Redis holds:

* the job hash (image, manifest digest, window, created, cancelled flag),
* the plan once (:class:`prewarm.fleet.plan.ImagePlan` as JSON),
* per node: a cursor into the plan (the next task to release), byte counters, and the
  state of each layer (``pending``, ``ready``, ``failed``) with the reason of a failure,
* per node and layer: a bitmap of finished spans.  ``SETBIT`` returns the old bit, so a
  redelivered or duplicated task never counts twice.

The job's overall state is DERIVED from the layer states every time it is read
(:func:`job_status`), never stored: a job is ``succeeded`` only when every layer on every
node is ``ready``, so it cannot report success with a layer missing.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterable

import redis

from prewarm.fleet import keys, peers
from prewarm.errors import JobError
from prewarm.fleet.plan import ImagePlan

LAYER_PENDING = "pending"
LAYER_READY = "ready"
LAYER_FAILED = "failed"

# Claim the next task of a node's cursor unless the job is cancelled or the plan is done.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'cancelled') == '1' then return -1 end
local total = tonumber(redis.call('HGET', KEYS[2], 'tasks_total'))
local k = redis.call('HINCRBY', KEYS[2], 'cursor', 1) - 1
if k >= total then
  redis.call('HINCRBY', KEYS[2], 'cursor', -1)
  return -1
end
return k
"""


@dataclasses.dataclass(frozen=True)
class NodeStatus:
    node: str
    state: str  # pending | running | succeeded | failed | cancelled
    bytes_done: int
    bytes_total: int
    tasks_finished: int
    tasks_total: int
    layers: dict[int, str]
    errors: dict[int, str]
    started: float
    updated: float
    #: Compressed bytes this node took from the registry and from peers (span sharing), and
    #: how many peers it found sending wrong bytes.
    bytes_registry: int = 0
    bytes_peers: int = 0
    peer_bad: int = 0


@dataclasses.dataclass(frozen=True)
class JobStatus:
    job_id: str
    image: str
    state: str  # pending | running | succeeded | failed | cancelled
    created: float
    plan: ImagePlan
    nodes: dict[str, NodeStatus]

    @property
    def bytes_done(self) -> int:
        return sum(n.bytes_done for n in self.nodes.values())

    @property
    def bytes_total(self) -> int:
        return sum(n.bytes_total for n in self.nodes.values())

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    def failures(self) -> list[str]:
        """One line per failed layer: node, layer digest and why."""
        out = []
        for node in sorted(self.nodes):
            ns = self.nodes[node]
            for idx, reason in sorted(ns.errors.items()):
                digest = self.plan.layers[idx].digest if idx < len(self.plan.layers) else f"#{idx}"
                out.append(f"{node}: layer {digest}: {reason}")
        return out


def _s(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def create_job(r: redis.Redis, plan: ImagePlan, nodes: Iterable[str], *, window: int,
               image: str, job_id: str | None = None, present: dict[str, set[int]] | None = None,
               keep: dict[str, str] | None = None) -> str:
    """Record a new job; no task is released yet (see :func:`claim_next`).

    Args:
        present: per node, indexes of layers the node already holds ready; they are
            recorded ready at once and their tasks are skipped by the workers.
        keep: a standing schedule: nodes that register later and whose labels match this
            selector ({} matches every node) join the job (:func:`standing_jobs_for`).
    """
    job_id = job_id or uuid.uuid4().hex[:12]
    nodes = sorted(set(nodes))
    if not nodes and keep is None:
        raise JobError("no node to pre-warm on: name one with --node, or start a worker")
    now = time.time()
    pipe = r.pipeline(transaction=True)
    pipe.hset(keys.job(job_id), mapping={
        "image": image, "reference": plan.reference, "manifest_digest": plan.manifest_digest,
        "window": window, "created": now, "cancelled": "0",
        "keep": json.dumps(keep) if keep is not None else "",
    })
    pipe.set(keys.job_plan(job_id), plan.to_json())
    pipe.zadd(keys.JOBS, {job_id: now})
    pipe.sadd(keys.ACTIVE_JOBS, job_id)
    pipe.execute()
    for node in nodes:
        add_node(r, job_id, node, plan, (present or {}).get(node, set()))
    return job_id


def add_node(r: redis.Redis, job_id: str, node: str, plan: ImagePlan, ready: set[int] | frozenset[int]) -> bool:
    """Add a node to a job (at creation, or joining a standing schedule); False if it was there."""
    if not r.sadd(keys.job_nodes(job_id), node):
        return False
    now = time.time()
    pipe = r.pipeline(transaction=True)
    pipe.hset(keys.job_node(job_id, node), mapping={
        "cursor": 0, "tasks_total": plan.task_count, "tasks_finished": 0,
        "bytes_total": plan.total_bytes,
        "bytes_done": sum(plan.layers[i].size for i in ready),
        "started": now, "updated": now,
    })
    pipe.hset(keys.job_node_layers(job_id, node), mapping={
        str(i): (LAYER_READY if i in ready else LAYER_PENDING) for i in range(len(plan.layers))
    })
    pipe.execute()
    return True


def standing_jobs_for(r: redis.Redis, labels: dict[str, str]) -> list[str]:
    """Active standing schedules (``--keep``) whose selector matches these node labels."""
    out = []
    for raw in r.smembers(keys.ACTIVE_JOBS):
        job_id = _s(raw)
        h = r.hmget(keys.job(job_id), "keep", "cancelled")
        keep, cancelled = _s(h[0]), _s(h[1])
        if not keep or cancelled == "1":
            continue
        selector = json.loads(keep)
        if all(labels.get(k) == v for k, v in selector.items()):
            out.append(job_id)
    return sorted(out)


def load_plan(r: redis.Redis, job_id: str) -> ImagePlan:
    raw = r.get(keys.job_plan(job_id))
    if raw is None:
        raise JobError(f"job {job_id} does not exist (prewarm status lists the jobs)")
    return ImagePlan.from_json(raw)


def claim_next(r: redis.Redis, job_id: str, node: str) -> int | None:
    """Advance the node's cursor and return the task index to release, or None when done."""
    k = int(r.eval(_CLAIM, 2, keys.job(job_id), keys.job_node(job_id, node)))
    return None if k < 0 else k


def layer_state(r: redis.Redis, job_id: str, node: str, layer: int) -> str:
    return _s(r.hget(keys.job_node_layers(job_id, node), str(layer))) or LAYER_PENDING


def record_span(r: redis.Redis, job_id: str, node: str, layer: int, span: int, nbytes: int) -> bool:
    """Count a finished span once, however often it is reported; True if this call counted it."""
    old = r.setbit(keys.job_node_spans(job_id, node, layer), span, 1)
    if old:
        return False
    pipe = r.pipeline(transaction=True)
    pipe.hincrby(keys.job_node(job_id, node), "tasks_finished", 1)
    pipe.hincrby(keys.job_node(job_id, node), "bytes_done", nbytes)
    pipe.hset(keys.job_node(job_id, node), "updated", time.time())
    pipe.execute()
    return True


def record_layer(r: redis.Redis, job_id: str, node: str, layer: int, state: str,
                 reason: str | None = None) -> None:
    """Set a layer's state on a node.  ``ready`` wins over ``failed`` (a retry that succeeded)."""
    if state not in (LAYER_READY, LAYER_FAILED, LAYER_PENDING):
        raise ValueError(state)
    pipe = r.pipeline(transaction=True)
    pipe.hset(keys.job_node_layers(job_id, node), str(layer), state)
    if state == LAYER_FAILED:
        pipe.hset(keys.job_node_errors(job_id, node), str(layer), reason or "failed")
    else:
        pipe.hdel(keys.job_node_errors(job_id, node), str(layer))
    pipe.hset(keys.job_node(job_id, node), "updated", time.time())
    pipe.execute()


def unfinished_tasks(r: redis.Redis, job_id: str, node: str, plan: ImagePlan) -> list[int]:
    """Task indexes (in the node's order, see ``dispatch.send_task``) not finished on the node:
    spans whose bit is unset, whole layers not ready, in layers neither ready nor failed."""
    layers = {int(_s(k)): _s(v) for k, v in r.hgetall(keys.job_node_layers(job_id, node)).items()}
    bitmaps: dict[int, bytes] = {}
    out = []
    for k in range(plan.task_count):
        li, span = plan.task_at(peers.spread(plan, k, node))
        if layers.get(li) in (LAYER_READY, LAYER_FAILED):
            continue
        if plan.layers[li].mode == "spans":
            bits = bitmaps.get(li)
            if bits is None:
                bits = bitmaps[li] = r.get(keys.job_node_spans(job_id, node, li)) or b""
            byte = span >> 3
            if byte < len(bits) and bits[byte] >> (7 - (span & 7)) & 1:
                continue
        out.append(k)
    return out


def stalled_jobs(r: redis.Redis, node: str, stall_seconds: float) -> list[str]:
    """Active jobs started on ``node`` with work left and nothing finished for ``stall_seconds``.

    Task messages can be lost: a worker killed between taking a message and recording it as
    unacknowledged loses it in kombu, and a Redis restart can fail the send of a task's
    successor after its index was claimed.  Each loss shrinks the node's window by one, so a
    job stalls whether or not every task was released yet.
    """
    out = []
    now = time.time()
    for raw in r.smembers(keys.ACTIVE_JOBS):
        job_id = _s(raw)
        if not r.sismember(keys.job_nodes(job_id), node) or _s(r.hget(keys.job(job_id), "cancelled")) == "1":
            continue
        h = {_s(k): _s(v) for k, v in r.hgetall(keys.job_node(job_id, node)).items()}
        if not h or int(h.get("cursor", 0)) == 0:
            continue  # nothing released yet: the node's first window is start_own_windows' work
        if now - float(h.get("updated", now)) < stall_seconds:
            continue
        states = [_s(v) for v in r.hvals(keys.job_node_layers(job_id, node))]
        if states and all(st in (LAYER_READY, LAYER_FAILED) for st in states):
            continue
        out.append(job_id)
    return sorted(out)


def released(r: redis.Redis, job_id: str, node: str) -> int:
    """How many of the plan's tasks were handed out to ``node`` (its cursor)."""
    return int(_s(r.hget(keys.job_node(job_id, node), "cursor")) or 0)


def mark_started(r: redis.Redis, job_id: str, node: str) -> bool:
    """Claim the release of a node's first window; True for exactly one caller."""
    return bool(r.hsetnx(keys.job_node(job_id, node), "started_release", 1))


def unstarted_jobs(r: redis.Redis, node: str) -> list[str]:
    """Active, not cancelled jobs of ``node`` whose first window nobody released yet."""
    out = []
    for raw in r.smembers(keys.ACTIVE_JOBS):
        job_id = _s(raw)
        if not r.sismember(keys.job_nodes(job_id), node) or _s(r.hget(keys.job(job_id), "cancelled")) == "1":
            continue
        if not r.hexists(keys.job_node(job_id, node), "started_release"):
            out.append(job_id)
    return sorted(out)


def touch(r: redis.Redis, job_id: str, node: str) -> None:
    r.hset(keys.job_node(job_id, node), "updated", time.time())


def finish_job(r: redis.Redis, job_id: str) -> None:
    """A job that ended (and is not a standing schedule) hands out no more work."""
    if not _s(r.hget(keys.job(job_id), "keep")):
        r.srem(keys.ACTIVE_JOBS, job_id)


def cancel_job(r: redis.Redis, job_id: str) -> None:
    if not r.exists(keys.job(job_id)):
        raise JobError(f"job {job_id} does not exist (prewarm status lists the jobs)")
    r.hset(keys.job(job_id), "cancelled", "1")
    r.srem(keys.ACTIVE_JOBS, job_id)


def node_status(r: redis.Redis, job_id: str, node: str, plan: ImagePlan, cancelled: bool) -> NodeStatus:
    h = {_s(k): _s(v) for k, v in r.hgetall(keys.job_node(job_id, node)).items()}
    layers = {int(_s(k)): _s(v) for k, v in r.hgetall(keys.job_node_layers(job_id, node)).items()}
    errors = {int(_s(k)): _s(v) for k, v in r.hgetall(keys.job_node_errors(job_id, node)).items()}
    states = [layers.get(i, LAYER_PENDING) for i in range(len(plan.layers))]
    tasks_finished = int(h.get("tasks_finished", 0))
    if all(s == LAYER_READY for s in states):
        state = "succeeded"
    elif all(s in (LAYER_READY, LAYER_FAILED) for s in states):
        state = "failed"
    elif cancelled:
        state = "cancelled"
    elif tasks_finished == 0 and int(h.get("bytes_done", 0)) == 0:
        state = "pending"
    else:
        state = "running"
    bytes_total, tasks_total = int(h.get("bytes_total", 0)), int(h.get("tasks_total", 0))
    bytes_done = int(h.get("bytes_done", 0))
    if state == "succeeded":
        # Every layer is ready in the store.  Spans landed by a worker killed before it
        # reported are counted only when redelivered, which may come after the layer is ready.
        bytes_done, tasks_finished = bytes_total, tasks_total
    return NodeStatus(
        node=node, state=state, bytes_done=bytes_done,
        bytes_total=bytes_total, tasks_finished=tasks_finished,
        tasks_total=tasks_total, layers=layers, errors=errors,
        started=float(h.get("started", 0)), updated=float(h.get("updated", 0)),
        bytes_registry=int(h.get("bytes_registry", 0)), bytes_peers=int(h.get("bytes_peers", 0)),
        peer_bad=int(h.get("peer_bad", 0)),
    )


def job_status(r: redis.Redis, job_id: str) -> JobStatus:
    """Read a job and derive its state from its layers.

    Raises:
        JobError: no such job.
    """
    h = {_s(k): _s(v) for k, v in r.hgetall(keys.job(job_id)).items()}
    if not h:
        raise JobError(f"job {job_id} does not exist (prewarm status lists the jobs)")
    plan = load_plan(r, job_id)
    cancelled = h.get("cancelled") == "1"
    nodes = {_s(n): node_status(r, job_id, _s(n), plan, cancelled)
             for n in r.smembers(keys.job_nodes(job_id))}
    states = {n.state for n in nodes.values()}
    if not states:
        state = "cancelled" if cancelled else "pending"
    elif states == {"succeeded"}:
        state = "succeeded"
    elif states <= {"succeeded", "failed"}:
        state = "failed"
    elif cancelled:
        state = "cancelled"
    elif states == {"pending"}:
        state = "pending"
    else:
        state = "running"
    return JobStatus(job_id, h.get("image", ""), state, float(h.get("created", 0)), plan, nodes)


def job_image_name(r: redis.Redis, job_id: str) -> str:
    """The image as the user named it when scheduling (the name of its record on nodes)."""
    return _s(r.hget(keys.job(job_id), "image"))


def list_jobs(r: redis.Redis, limit: int = 20) -> list[str]:
    return [_s(j) for j in r.zrevrange(keys.JOBS, 0, limit - 1)]


def job_summary_json(status: JobStatus) -> str:
    return json.dumps({
        "job": status.job_id, "image": status.image, "state": status.state,
        "bytes_done": status.bytes_done, "bytes_total": status.bytes_total,
        "nodes": {
            n: {"state": s.state, "bytes_done": s.bytes_done, "bytes_total": s.bytes_total,
                "tasks_finished": s.tasks_finished, "tasks_total": s.tasks_total,
                "bytes_registry": s.bytes_registry, "bytes_peers": s.bytes_peers, "peer_bad": s.peer_bad,
                "errors": {status.plan.layers[i].digest: e for i, e in s.errors.items()}}
            for n, s in sorted(status.nodes.items())
        },
    }, indent=2)
