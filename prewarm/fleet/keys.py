"""Every Redis key prewarm uses, as templates in one place (one grep finds the keyspace).

Keys follow ``prewarm:<noun>:<id>[:<facet>]``.  Nothing here ever holds a credential:
jobs name images by reference and layers by digest; each node reads its own registry
credentials.
"""

from __future__ import annotations

#: Sorted set of job ids, scored by creation time.
JOBS = "prewarm:jobs"
#: Hash: the job's spec and overall state (image, manifest digest, nodes, state, error).
JOB = "prewarm:job:{job}"
#: String (JSON): the job's plan, layers and their span counts; one per job, not per node.
JOB_PLAN = "prewarm:job:{job}:plan"
#: Set of node names the job covers.
JOB_NODES = "prewarm:job:{job}:nodes"
#: Hash: the job's task bodies signed by the scheduler, by "layer:span" (prewarm.fleet.signing).
JOB_SIGNED = "prewarm:job:{job}:signed"
#: Hash: per-node progress of a job (state, bytes_done, bytes_total, cursor, layers_ready, ...).
JOB_NODE = "prewarm:job:{job}:node:{node}"
#: Hash: per-node, per-layer state (layer index -> pending|running|ready|failed).
JOB_NODE_LAYERS = "prewarm:job:{job}:node:{node}:layers"
#: Hash: per-node, per-layer failure reason (layer index -> message).
JOB_NODE_ERRORS = "prewarm:job:{job}:node:{node}:errors"
#: Bitmap: which spans of layer ``layer`` are done on the node; SETBIT makes counting idempotent.
JOB_NODE_SPANS = "prewarm:job:{job}:node:{node}:spans:{layer}"
#: Hash: per-node count of finished (done or failed) spans per layer index.
JOB_NODE_FINISHED = "prewarm:job:{job}:node:{node}:finished"
JOB_WAKE = "prewarm:job:{job}:wake"  # a token per node that reached its end: a waiting scheduler BLPOPs it
#: Set of job ids that are still handing out work (standing schedules included).
ACTIVE_JOBS = "prewarm:jobs:active"

#: Hash: a node's registration (labels, free disk, last heartbeat, worker pid...).
NODE = "prewarm:node:{node}"
#: Set of known node names.
NODES = "prewarm:nodes"

#: Sorted set of worker instances (one ``prewarm worker`` process each, a random id), scored
#: by their last beat in Redis's own clock; see :mod:`prewarm.fleet.recovery`.
WORKERS = "prewarm:workers"
#: Hash: a worker instance's node, host and pid (for the operator's log line).
WORKER = "prewarm:worker:{instance}"
#: Set of delivery tags of the task messages a worker instance took and has not acknowledged.
WORKER_HELD = "prewarm:worker:{instance}:held"
#: Lock (redis-py ``Lock``): the one live worker restoring dead workers' messages.
RECOVERY_LOCK = "prewarm:recovery:lock"
#: kombu's Redis transport: hash delivery tag -> [message, exchange, routing key] of every
#: message taken and not acknowledged, and the zset of when each was taken.  Not ours:
#: ``workers.app`` names them in the transport options so the two cannot drift apart.
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"

#: Set of node names whose peer cache holds verified bytes of span ``span`` of ``layer``
#: (``span`` is ``blob`` for a whole layer); see :mod:`prewarm.fleet.peers`.
PEER_HOLDERS = "prewarm:peer:holders:{layer}:{span}"
#: String with a PX lease: the node that fetches span group ``group`` of ``layer`` from the registry.
PEER_CLAIM = "prewarm:peer:claim:{layer}:{group}"
#: Set of peers that sent a node wrong bytes during a job: skipped for the rest of it.
JOB_NODE_BAD_PEERS = "prewarm:job:{job}:node:{node}:badpeers"

#: Registry budget state per registry host (token bucket, concurrency).
BUDGET = "prewarm:budget:{registry}"
BUDGET_INFLIGHT = "prewarm:budget:{registry}:inflight"
BUDGET_BACKOFF = "prewarm:budget:{registry}:backoff"
BUDGET_WAKE = "prewarm:budget:{registry}:wake"  # a token per returned lease: blocked requests BLPOP it


def job(job_id: str) -> str:
    return JOB.format(job=job_id)


def job_plan(job_id: str) -> str:
    return JOB_PLAN.format(job=job_id)


def job_signed(job_id: str) -> str:
    return JOB_SIGNED.format(job=job_id)


def job_nodes(job_id: str) -> str:
    return JOB_NODES.format(job=job_id)


def job_node(job_id: str, node: str) -> str:
    return JOB_NODE.format(job=job_id, node=node)


def job_node_layers(job_id: str, node: str) -> str:
    return JOB_NODE_LAYERS.format(job=job_id, node=node)


def job_node_errors(job_id: str, node: str) -> str:
    return JOB_NODE_ERRORS.format(job=job_id, node=node)


def job_node_spans(job_id: str, node: str, layer: int) -> str:
    return JOB_NODE_SPANS.format(job=job_id, node=node, layer=layer)


def job_node_finished(job_id: str, node: str) -> str:
    return JOB_NODE_FINISHED.format(job=job_id, node=node)


def job_wake(job_id: str) -> str:
    return JOB_WAKE.format(job=job_id)


def job_node_bad_peers(job_id: str, node: str) -> str:
    return JOB_NODE_BAD_PEERS.format(job=job_id, node=node)


def peer_holders(layer: str, span: int | None) -> str:
    return PEER_HOLDERS.format(layer=layer, span="blob" if span is None else span)


def peer_claim(layer: str, group: int | None) -> str:
    return PEER_CLAIM.format(layer=layer, group="blob" if group is None else group)


def node(name: str) -> str:
    return NODE.format(node=name)


def worker(instance: str) -> str:
    return WORKER.format(instance=instance)


def worker_held(instance: str) -> str:
    return WORKER_HELD.format(instance=instance)


def node_queue(name: str) -> str:
    """The Celery queue a node's worker consumes: spans are done on the node whose store they fill."""
    return f"prewarm.node.{name}"
