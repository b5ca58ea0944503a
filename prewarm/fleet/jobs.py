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

from prewarm.errors import JobError, JobNotFound
from prewarm.fleet import keys, peers
from prewarm.fleet.plan import ImagePlan

LAYER_PENDING = "pending"
LAYER_READY = "ready"
LAYER_FAILED = "failed"

# Claim the next task of a node's cursor unless the job is cancelled or the plan is done.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'cancelled') == '1' then return -1 end
local total = tonumber(redis.call('HGET', KEYS[2], 'tasks_total'))
if not total then return -1 end  -- no such job or node: claim nothing, create nothing
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
               keep: dict[str, str | list[str]] | None = None, signed: dict[str, bytes] | None = None) -> str:
    """Record a new job; no task is released yet (see :func:`claim_next`).

    Args:
        present: per node, indexes of layers the node already holds ready; they are
            recorded ready at once and their tasks are skipped by the workers.
        keep: a standing schedule: nodes that register later and whose labels match this
            selector ({} matches every node) join the job (:func:`standing_jobs_for`).
        signed: the job's task bodies signed by the scheduler, by
            :func:`prewarm.fleet.dispatch.signed_field` (see :mod:`prewarm.fleet.signing`).
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
        "keep": json.dumps(keep) if keep is not None else "", "signed": "1" if signed else "",
        # one node and no standing schedule: its tasks go in plain plan order (dispatch.send_task)
        "alone": "1" if len(nodes) == 1 and keep is None else "",
    })
    if signed:
        pipe.hset(keys.job_signed(job_id), mapping=signed)
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


#: The label every node has implicitly: its own name (``--node X --keep`` selects by it).
NODE_NAME_LABEL = "prewarm.io/node"


def standing_jobs_for(r: redis.Redis, labels: dict[str, str]) -> list[str]:
    """Active standing schedules (``--keep``) whose selector matches these node labels.

    A selector value is one label value, or a list of values any of which matches.  Two
    round trips, whatever the number of active jobs (each node's worker asks every beat).
    """
    ids = _active_jobs(r)
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(keys.job(job_id), "keep", "cancelled")
    out = []
    for job_id, (raw_keep, raw_cancelled) in zip(ids, pipe.execute()):
        keep, cancelled = _s(raw_keep), _s(raw_cancelled)
        if not keep or cancelled == "1":
            continue
        selector = json.loads(keep)
        if all(labels.get(k) in v if isinstance(v, list) else labels.get(k) == v for k, v in selector.items()):
            out.append(job_id)
    return sorted(out)


def _active_jobs(r: redis.Redis) -> list[str]:
    return sorted(_s(raw) for raw in r.smembers(keys.ACTIVE_JOBS))


def dispatch_flags(r: redis.Redis, job_id: str) -> tuple[bool, bool]:
    """(the job's tasks are signed, the job is for one node alone), in one round trip."""
    signed, alone = r.hmget(keys.job(job_id), ["signed", "alone"])
    return _s(signed) == "1", _s(alone) == "1"


def signed_body(r: redis.Redis, job_id: str, field: str) -> bytes | None:
    raw = r.hget(keys.job_signed(job_id), field)
    return raw if isinstance(raw, bytes) else None


def load_plan(r: redis.Redis, job_id: str) -> ImagePlan:
    raw = r.get(keys.job_plan(job_id))
    if raw is None:
        raise JobNotFound(f"job {job_id} does not exist (prewarm status lists the jobs)")
    return ImagePlan.from_json(raw)


def claim_next(r: redis.Redis, job_id: str, node: str) -> int | None:
    """Advance the node's cursor and return the task index to release, or None when done."""
    k = int(r.eval(_CLAIM, 2, keys.job(job_id), keys.job_node(job_id, node)))
    return None if k < 0 else k


def layer_state(r: redis.Redis, job_id: str, node: str, layer: int) -> str:
    return _s(r.hget(keys.job_node_layers(job_id, node), str(layer))) or LAYER_PENDING


def record_span(r: redis.Redis, job_id: str, node: str, layer: int, span: int, nbytes: int) -> bool:
    """Count a finished span once, however often it is reported; True if this call counted it."""
    bitmap = keys.job_node_spans(job_id, node, layer)
    old = r.setbit(bitmap, span, 1)
    if old:
        return False
    pipe = r.pipeline(transaction=True)
    pipe.hincrby(keys.job_node(job_id, node), "tasks_finished", 1)
    pipe.hincrby(keys.job_node(job_id, node), "bytes_done", nbytes)
    pipe.hset(keys.job_node(job_id, node), "updated", time.time())
    pipe.ttl(keys.job(job_id))
    *_, ttl = pipe.execute()
    _expire_with_job(r, ttl, bitmap)
    return True


def _expire_with_job(r: redis.Redis, job_ttl: int, *created: str) -> None:
    """A task that ends after its job was cancelled or finished creates keys: they expire with the job."""
    if job_ttl > 0:
        for key in created:
            r.expire(key, job_ttl)


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
    pipe.ttl(keys.job(job_id))
    *_, ttl = pipe.execute()
    if state == LAYER_FAILED:
        _expire_with_job(r, ttl, keys.job_node_errors(job_id, node))


def unfinished_tasks(r: redis.Redis, job_id: str, node: str, plan: ImagePlan) -> list[int]:
    """Task indexes (in the node's order, see ``dispatch.send_task``) not finished on the node:
    spans whose bit is unset, whole layers not ready, in layers neither ready nor failed."""
    layers = {int(_s(k)): _s(v) for k, v in r.hgetall(keys.job_node_layers(job_id, node)).items()}
    alone = dispatch_flags(r, job_id)[1]
    bitmaps: dict[int, bytes] = {}
    out = []
    for k in range(plan.task_count):
        li, span = plan.task_at(peers.node_order(plan, k, node, alone))
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
    ids = _active_jobs(r)
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.sismember(keys.job_nodes(job_id), node)
        pipe.hget(keys.job(job_id), "cancelled")
        pipe.hgetall(keys.job_node(job_id, node))
        pipe.hvals(keys.job_node_layers(job_id, node))
    raw = pipe.execute()
    out = []
    now = time.time()
    for i, job_id in enumerate(ids):
        member, cancelled, raw_h, raw_states = raw[4 * i:4 * i + 4]
        if not member or _s(cancelled) == "1":
            continue
        h = {_s(k): _s(v) for k, v in raw_h.items()}
        if not h or int(h.get("cursor", 0)) == 0:
            continue  # nothing released yet: the node's first window is start_own_windows' work
        if now - float(h.get("updated", now)) < stall_seconds:
            continue
        states = [_s(v) for v in raw_states]
        if states and all(st in (LAYER_READY, LAYER_FAILED) for st in states):
            continue
        out.append(job_id)
    return out


def released(r: redis.Redis, job_id: str, node: str) -> int:
    """How many of the plan's tasks were handed out to ``node`` (its cursor)."""
    return int(_s(r.hget(keys.job_node(job_id, node), "cursor")) or 0)


def mark_started(r: redis.Redis, job_id: str, node: str) -> bool:
    """Claim the release of a node's first window; True for exactly one caller."""
    return bool(r.hsetnx(keys.job_node(job_id, node), "started_release", 1))


def unstarted_jobs(r: redis.Redis, node: str) -> list[str]:
    """Active, not cancelled jobs of ``node`` whose first window nobody released yet.

    Two round trips, whatever the number of active jobs (each node's worker asks every beat).
    """
    ids = _active_jobs(r)
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.sismember(keys.job_nodes(job_id), node)
        pipe.hget(keys.job(job_id), "cancelled")
        pipe.hexists(keys.job_node(job_id, node), "started_release")
    raw = pipe.execute()
    return [job_id for i, job_id in enumerate(ids)
            if raw[3 * i] and _s(raw[3 * i + 1]) != "1" and not raw[3 * i + 2]]


#: :func:`task_refusal`'s answer for a task of a cancelled job (skipped, not an attack).
CANCELLED = "the job was cancelled"


def task_refusal(r: redis.Redis, job_id: str, node: str, layer_index: int, this_node: str) -> str | None:
    """Why a task naming (job, node, layer) must not run on ``this_node``, or None if it may.

    Checked before the task writes anything: a message made by anyone who can write to
    Redis must not create job keys, account for another node or mark a layer of a real job.
    """
    if node != this_node:
        return f"addressed to node {node!r}, not this node {this_node!r}"
    if not isinstance(layer_index, int) or isinstance(layer_index, bool) or layer_index < 0:
        return f"layer index {layer_index!r} is not a non-negative integer"
    pipe = r.pipeline(transaction=False)
    pipe.exists(keys.job(job_id))
    pipe.sismember(keys.job_nodes(job_id), node)
    pipe.hget(keys.job_node(job_id, node), "tasks_total")
    pipe.hget(keys.job(job_id), "cancelled")
    exists, member, total, cancelled = pipe.execute()
    if not exists:
        return f"job {job_id!r} does not exist"
    if not member or total is None:
        return f"node {node!r} is not part of job {job_id}"
    if _s(cancelled) == "1":
        return CANCELLED
    return None


def touch(r: redis.Redis, job_id: str, node: str) -> None:
    r.hset(keys.job_node(job_id, node), "updated", time.time())


#: How long a finished job's records stay in Redis for ``prewarm status`` (seconds).
JOB_RETENTION = 7 * 24 * 3600
#: How long the wake-up tokens of a job's waiting scheduler are kept (nobody may be waiting).
WAKE_RETENTION = 600


def finish_job(r: redis.Redis, job_id: str, retention: float = JOB_RETENTION) -> None:
    """A job that ended (and is not a standing schedule) hands out no more work.

    Its records then expire after ``retention`` seconds, so Redis does not keep every job
    a fleet ever ran.
    """
    if _s(r.hget(keys.job(job_id), "keep")):
        return
    r.srem(keys.ACTIVE_JOBS, job_id)
    _expire_job(r, job_id, retention)


def _job_keys(r: redis.Redis, job_id: str) -> list[str]:
    """Every key of the job's records (its nodes' included)."""
    nodes = [_s(n) for n in r.smembers(keys.job_nodes(job_id))]
    raw = r.get(keys.job_plan(job_id))
    layers = len(ImagePlan.from_json(raw).layers) if raw else 0
    out = [keys.job(job_id), keys.job_plan(job_id), keys.job_nodes(job_id), keys.job_signed(job_id)]
    for node in nodes:
        out += [keys.job_node(job_id, node), keys.job_node_layers(job_id, node), keys.job_node_errors(job_id, node),
                keys.job_node_finished(job_id, node), keys.job_node_bad_peers(job_id, node)]
        out += [keys.job_node_spans(job_id, node, layer) for layer in range(layers)]
    return out


def _expire_job(r: redis.Redis, job_id: str, retention: float) -> None:
    ttl = max(1, int(retention))
    pipe = r.pipeline(transaction=False)
    for key in _job_keys(r, job_id):
        pipe.expire(key, ttl)
    pipe.execute()


def delete_job(r: redis.Redis, job_id: str) -> None:
    """Remove every record of a job now (``prewarm prune``)."""
    pipe = r.pipeline(transaction=False)
    pipe.delete(*_job_keys(r, job_id))
    pipe.zrem(keys.JOBS, job_id)
    pipe.srem(keys.ACTIVE_JOBS, job_id)
    pipe.execute()


def prune_jobs(r: redis.Redis, older_than: float, *, dry_run: bool = False) -> list[str]:
    """Remove the jobs created more than ``older_than`` seconds ago that are over or abandoned.

    Over: every layer on every node ready or failed, or cancelled.  Abandoned: no node
    reported anything for ``older_than`` seconds (its nodes were removed, say), which
    ``settle`` can then never end.  Standing schedules (``--keep``) stay until cancelled.
    Returns the ids removed (with ``dry_run``: that would be).
    """
    cutoff = time.time() - older_than
    out = []
    for raw in r.zrangebyscore(keys.JOBS, "-inf", cutoff):
        job_id = _s(raw)
        if not r.exists(keys.job(job_id)):  # expired already: only its entry in the list is left
            out.append(job_id)
            if not dry_run:
                delete_job(r, job_id)
            continue
        status = job_status(r, job_id)
        standing = bool(_s(r.hget(keys.job(job_id), "keep"))) and status.state != "cancelled"
        last = max([n.updated for n in status.nodes.values()] + [status.created])
        if standing or not (status.finished or last < cutoff):
            continue
        out.append(job_id)
        if not dry_run:
            delete_job(r, job_id)
    return out


def settle(r: redis.Redis, job_id: str, node: str) -> bool:
    """Called when one of ``node``'s layers reached its end: end the job if every node's did.

    A job started without ``--wait`` has nobody polling it; this is how it leaves the
    active set (and its records start to expire) once the last layer of the last node
    is ready or failed.  Costs one read unless this node is done.
    """
    states = [_s(v) for v in r.hvals(keys.job_node_layers(job_id, node))]
    if not states or any(s == LAYER_PENDING for s in states):
        return False
    # A scheduler waiting on the job (`--wait`) wakes now instead of at its next poll, which
    # is up to MAX_POLL_INTERVAL away while a layer's last span commits and no bytes move.
    pipe = r.pipeline(transaction=False)
    pipe.lpush(keys.job_wake(job_id), node)
    pipe.expire(keys.job_wake(job_id), WAKE_RETENTION)
    pipe.execute()
    if not job_status(r, job_id).finished:
        return False
    finish_job(r, job_id)
    return True


def cancel_job(r: redis.Redis, job_id: str) -> None:
    if not r.exists(keys.job(job_id)):
        raise JobNotFound(f"job {job_id} does not exist (prewarm status lists the jobs)")
    r.hset(keys.job(job_id), "cancelled", "1")
    r.srem(keys.ACTIVE_JOBS, job_id)
    _expire_job(r, job_id, JOB_RETENTION)  # a cancelled job is over: its records go like a finished one's


def node_status(r: redis.Redis, job_id: str, node: str, plan: ImagePlan, cancelled: bool) -> NodeStatus:
    pipe = r.pipeline(transaction=False)
    _queue_node_reads(pipe, job_id, node)
    return _node_status(node, plan, cancelled, *pipe.execute())


def _queue_node_reads(pipe: redis.client.Pipeline, job_id: str, node: str) -> None:
    pipe.hgetall(keys.job_node(job_id, node))
    pipe.hgetall(keys.job_node_layers(job_id, node))
    pipe.hgetall(keys.job_node_errors(job_id, node))


def _node_status(node: str, plan: ImagePlan, cancelled: bool, raw_h: dict, raw_layers: dict,
                 raw_errors: dict) -> NodeStatus:
    h = {_s(k): _s(v) for k, v in raw_h.items()}
    layers = {int(_s(k)): _s(v) for k, v in raw_layers.items()}
    errors = {int(_s(k)): _s(v) for k, v in raw_errors.items()}
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


def job_status(r: redis.Redis, job_id: str, plan: ImagePlan | None = None) -> JobStatus:
    """Read a job and derive its state from its layers, in two round trips whatever the fleet size.

    The job record and its node list come in one pipeline, every node's three hashes in a
    second; ``plan`` (it never changes) may be passed in by a caller that polls, so the
    plan's JSON is read once per wait instead of once per poll.  At 1,000 nodes this is 2
    round trips a poll, where reading node by node was 3,000.

    Raises:
        JobError: no such job.
    """
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(keys.job(job_id))
    pipe.smembers(keys.job_nodes(job_id))
    if plan is None:
        pipe.get(keys.job_plan(job_id))
    raw_job, members, *raw_plan = pipe.execute()
    h = {_s(k): _s(v) for k, v in raw_job.items()}
    if not h:
        raise JobNotFound(f"job {job_id} does not exist (prewarm status lists the jobs)")
    if plan is None:
        if raw_plan[0] is None:
            raise JobNotFound(f"job {job_id} does not exist (prewarm status lists the jobs)")
        plan = ImagePlan.from_json(raw_plan[0])
    cancelled = h.get("cancelled") == "1"
    names = sorted(_s(n) for n in members)
    pipe = r.pipeline(transaction=False)
    for name in names:
        _queue_node_reads(pipe, job_id, name)
    raw = pipe.execute()
    nodes = {name: _node_status(name, plan, cancelled, *raw[3 * i:3 * i + 3]) for i, name in enumerate(names)}
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
    """The newest jobs whose records have not expired (expired ones leave the list here)."""
    r.zremrangebyscore(keys.JOBS, "-inf", time.time() - JOB_RETENTION)
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
