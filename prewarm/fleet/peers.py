"""Fleet span sharing: who holds which verified span, and who fetches a span group from the registry.

Why: without sharing, every node of a job fetches every span from the registry, so a
20 GB image on 500 nodes is 10 TB of registry egress.  With it the registry sends each
span group about once per fleet and the nodes pass the bytes on among themselves:

* **Holders.** A node that fetched and verified a span keeps its compressed bytes in its
  peer cache and adds itself to the span's holder set (:data:`keys.PEER_HOLDERS`); it
  leaves the set when it evicts them.  Its peer server's address is in its node
  registration (field ``peer``), next to its heartbeat.
* **Claims.** The first node to need a span group that nobody holds claims it with a lease
  (``SET NX PX``) and fetches it from the registry; the others do other work first (the
  task is retried a moment later) and then take the group from a holder.  A claim is
  only a lease, renewed by its process while the fetch is under way (a fetch may queue
  behind the fleet's registry budget for longer than one lease): if its node dies, it
  expires and the next node to ask takes the group over; and a node that has waited long
  enough goes to the registry anyway, so nothing waits forever.
* **Spread.** Each node starts every layer at its own point (:func:`spread`), so the
  nodes of a job claim different groups from the start instead of queueing on the first.

Peers are untrusted: what they send is verified against the zTOC's span digest before it
is used (``prewarm.node.warm``), and a peer that sent wrong bytes is recorded here as bad
for the rest of the job (:func:`mark_bad`), so it can waste bandwidth but nothing more.
"""

from __future__ import annotations

import dataclasses
import re
import time
import zlib
from collections.abc import Iterable, Sequence

import redis

from prewarm.errors import PrewarmError, Transient
from prewarm.fleet import keys
from prewarm.fleet.nodes import NODE_TTL
from prewarm.fleet.plan import ImagePlan

#: Node registration field holding the node's peer server address (``host:port``).
ADDRESS_FIELD = "peer"
#: Holder sets outlive jobs (a later job of the same image reuses them) but not forever.
HOLDERS_TTL = 7 * 24 * 3600
#: Default lease of a registry-fetch claim: long enough for one task's group under a
#: tight registry budget; a dead claimant delays its group's other nodes at most this long.
DEFAULT_LEASE = 30.0

#: ``host:port`` (host name, IPv4, or bracketed IPv6); anything else in Redis is ignored.
_ADDRESS = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}$")

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ClaimedElsewhere(Transient, PrewarmError):
    """Another node is fetching this span group from the registry: do other work, then take it from it."""


@dataclasses.dataclass(frozen=True)
class Peer:
    """A node whose peer server may hold a span: its name (for marking it bad) and address."""

    name: str
    address: str


def valid_address(address: str) -> bool:
    return bool(_ADDRESS.match(address)) and 0 < int(address.rsplit(":", 1)[1]) < 65536


def advertise(r: redis.Redis, node: str, address: str | None) -> None:
    """Record (or, with None, withdraw) the node's peer server address in its registration."""
    if address is None:
        r.hdel(keys.node(node), ADDRESS_FIELD)
        return
    if not valid_address(address):
        raise ValueError(f"peer address {address!r} is not host:port")
    r.hset(keys.node(node), ADDRESS_FIELD, address)


def sharing_nodes(r: redis.Redis, names: Iterable[str]) -> frozenset[str]:
    """Those of ``names`` that advertise a peer server (span sharing on)."""
    names = list(names)
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.hget(keys.node(name), ADDRESS_FIELD)
    return frozenset(n for n, address in zip(names, pipe.execute()) if address)


def add_holders(r: redis.Redis, layer: str, spans: Sequence[int | None], node: str) -> None:
    """The node holds verified bytes of ``spans`` of ``layer`` (None: the whole layer blob)."""
    pipe = r.pipeline(transaction=False)
    for span in spans:
        key = keys.peer_holders(layer, span)
        pipe.sadd(key, node)
        pipe.expire(key, HOLDERS_TTL)
    pipe.execute()


def remove_holders(r: redis.Redis, node: str, items: Iterable[tuple[str, int | None]]) -> None:
    """The node no longer holds these (layer, span) items (evicted from its cache)."""
    pipe = r.pipeline(transaction=False)
    for layer, span in items:
        pipe.srem(keys.peer_holders(layer, span), node)
    pipe.execute()


def holders(r: redis.Redis, layer: str, spans: Sequence[int | None], *, me: str,
            skip: frozenset[str] = frozenset()) -> dict[int | None, list[Peer]]:
    """Live peers holding each of ``spans`` of ``layer``: not ``me``, not in ``skip``, heartbeat fresh,
    with a well-formed address.  Spans nobody holds are absent from the result."""
    pipe = r.pipeline(transaction=False)
    for span in spans:
        pipe.smembers(keys.peer_holders(layer, span))
    sets = pipe.execute()
    names = sorted({_s(n) for members in sets for n in members} - {me} - skip)
    if not names:
        return {}
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.hmget(keys.node(name), [ADDRESS_FIELD, "heartbeat"])
    now = time.time()
    live: dict[str, Peer] = {}
    for name, (address, beat) in zip(names, pipe.execute()):
        if address is None or beat is None:
            continue
        address = _s(address)
        try:
            fresh = now - float(_s(beat)) < NODE_TTL
        except ValueError:
            continue
        if fresh and valid_address(address):
            live[name] = Peer(name, address)
    out: dict[int | None, list[Peer]] = {}
    for span, members in zip(spans, sets):
        peers = [live[n] for n in sorted(_s(m) for m in members) if n in live]
        if peers:
            out[span] = peers
    return out


def claim(r: redis.Redis, layer: str, group: int | None, node: str, lease: float) -> str:
    """Claim the registry fetch of a span group for ``lease`` seconds; returns the claim's owner
    (``node`` when this call or an earlier one by the same ``node`` value won it).  Workers
    claim as ``node#<process token>``, so each process is its own claimant."""
    key = keys.peer_claim(layer, group)
    ms = max(1, int(lease * 1000))
    if r.set(key, node, nx=True, px=ms):
        return node
    owner = r.get(key)
    if owner is None:  # expired between the two calls: try once more
        return node if r.set(key, node, nx=True, px=ms) else _s(r.get(key) or b"")
    return _s(owner)


def renew(r: redis.Redis, claims: Sequence[tuple[str, int | None]], node: str, lease: float) -> list[bool]:
    """Extend the node's claims by ``lease`` seconds (its fetch is still under way); False
    for a claim the node no longer holds (it expired and another node took it over)."""
    ms = str(max(1, int(lease * 1000)))
    pipe = r.pipeline(transaction=False)
    for layer, group in claims:
        pipe.eval(_RENEW, 1, keys.peer_claim(layer, group), node, ms)
    return [bool(int(x)) for x in pipe.execute()]


def release(r: redis.Redis, layer: str, group: int | None, node: str) -> None:
    """Give up the node's claim (its group is now held, or its fetch failed): another may take it."""
    r.eval(_RELEASE, 1, keys.peer_claim(layer, group), node)


def mark_bad(r: redis.Redis, job: str, node: str, peer: str) -> None:
    """``peer`` sent ``node`` bytes that failed verification: skip it for the rest of the job."""
    key = keys.job_node_bad_peers(job, node)
    pipe = r.pipeline(transaction=False)
    pipe.sadd(key, peer)
    pipe.expire(key, HOLDERS_TTL)
    pipe.hincrby(keys.job_node(job, node), "peer_bad", 1)
    pipe.execute()


def bad_peers(r: redis.Redis, job: str, node: str) -> frozenset[str]:
    return frozenset(_s(m) for m in r.smembers(keys.job_node_bad_peers(job, node)))


def count_bytes(r: redis.Redis, job: str, node: str, *, registry: int = 0, peers: int = 0) -> None:
    """Add to the node's per-job tally of compressed bytes taken from the registry and from peers."""
    pipe = r.pipeline(transaction=False)
    if registry:
        pipe.hincrby(keys.job_node(job, node), "bytes_registry", registry)
    if peers:
        pipe.hincrby(keys.job_node(job, node), "bytes_peers", peers)
    pipe.execute()


_inverse: dict[int, tuple[ImagePlan, dict[tuple[int, int], int]]] = {}


def node_order(plan: ImagePlan, k: int, node: str, alone: bool) -> int:
    """The task index the node does k-th: the plan's order for a node alone, else :func:`spread`.

    Why a node alone keeps the plan's order: it has nobody to spread over, and in plan
    order each layer's spans land in stream order, so its in-order hashes advance as they
    land.  Rotated, every span before the node's starting point landed last, the hashed
    front waited at span 0 the whole job, and every later span was spooled and inflated a
    second time (325 of 352 spans of the bench's single-layer image, most of them by one
    process, under the layer lock).
    """
    return k if alone else spread(plan, k, node)


def spread(plan: ImagePlan, k: int, node: str) -> int:
    """The task index the node does k-th: the plan's order, each layer started at a node's own point.

    Why: with the same order everywhere, every node would need the first group of a layer
    first, one would claim it and all others would wait; rotated by a hash of (node,
    layer), they claim different groups and pass them on.  A bijection on task indexes,
    so every task is still done exactly once per node.
    """
    li, first = plan.task_at(k)
    layer = plan.layers[li]
    count = layer.task_count
    if count <= 1:
        return k
    t = first // layer.spans_per_task
    rotated = (t + zlib.crc32(f"{node}\0{layer.digest}".encode()) % count) % count
    cached = _inverse.get(id(plan))
    if cached is None or cached[0] is not plan:
        if len(_inverse) > 16:
            _inverse.clear()
        index = {}
        for j in range(plan.task_count):
            lj, fj = plan.task_at(j)
            index[(lj, fj // plan.layers[lj].spans_per_task)] = j
        cached = _inverse[id(plan)] = (plan, index)
    return cached[1][(li, rotated)]


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
