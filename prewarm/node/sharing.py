"""A worker's side of fleet span sharing: take spans from peers, keep and announce what it verified.

:mod:`prewarm.node.warm` calls this around its registry fetch (see
:mod:`prewarm.fleet.peers` for the scheme).  For each span it still needs, it asks the
live holders in random order (spreading the load), skipping peers that sent this node
wrong bytes during the job; each answer is bounded (length, stall, floor rate) by
:func:`peerserver.fetch` and verified against the zTOC's span digest here, before the
caller inflates or lands anything.  Wrong bytes mark the peer bad for the rest of the job
and are counted (``prewarm_peer_failures_total{kind="corrupt"}`` and the job's
``peer_bad``); any other failure just moves on to the next holder, then the registry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis
import requests
from redis import Redis

from prewarm.config import Settings
from prewarm.errors import ConfigError, DigestMismatch
from prewarm.fleet import peers
from prewarm.fleet.budget import RegistryBudget, clear_budget, set_budget
from prewarm.index.ztoc import Ztoc
from prewarm.node.metrics import PEER_BYTES, PEER_CACHE_BYTES, PEER_FAILURES
from prewarm.node.peercache import Item, PeerCache
from prewarm.node.peerserver import PeerFailure, PeerServer, fetch
from prewarm.resolve.digest import parse_digest, verify

log = logging.getLogger(__name__)

#: Seconds a peer that stalled, erred or refused is not asked again by this process: a
#: stalled peer costs the asker its stall timeout per request; a refused connection is
#: usually a worker restarting, back within seconds with its cache; busy peers rest briefly.
COOLDOWN = {"stalled": 30.0, "error": 10.0, "refused": 5.0, "busy": 1.0}

#: Whole layers up to this share of the cache are kept for peers (small layers, as soci
#: leaves without a zTOC); larger ones would push out many spans for one item.
BLOB_SHARE = 8


@dataclasses.dataclass
class Sharing:
    """One worker process's handle on span sharing (None in the context when it is off)."""

    node: str
    redis: Redis
    cache: PeerCache
    token: str | None
    lease: float
    session: requests.Session = dataclasses.field(default_factory=requests.Session)
    #: The node's download limit from peers (PREWARM_PEER_RATE, shared by its processes
    #: through a token bucket in Redis); None: unlimited.
    download: RegistryBudget | None = None
    #: peer name -> monotonic time until which this process does not ask it (see COOLDOWN)
    _resting: dict[str, float] = dataclasses.field(default_factory=dict)
    #: small blobs from elsewhere on the node already offered to peers by this process
    _offered: set[str] = dataclasses.field(default_factory=set)
    #: registry-fetch claims this process holds (renewed by ``_keeper`` until released)
    _held: set[tuple[str, int | None]] = dataclasses.field(default_factory=set)
    _claims_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _keeper: threading.Thread | None = None
    #: what this process writes into the claims it wins: ``node#<random>``
    claimant: str = ""

    def __post_init__(self) -> None:
        if not self.claimant:
            self.claimant = f"{self.node}#{uuid.uuid4().hex[:16]}"

    @classmethod
    def from_settings(cls, settings: Settings, r: Redis) -> Sharing | None:
        if not settings.peer_port:
            return None
        session = requests.Session()
        session.trust_env = False  # peers are on the cluster network, never behind an HTTP proxy
        return cls(settings.node_name, r, PeerCache(settings.root, settings.peer_cache), settings.peer_token,
                   settings.peer_lease, session, RegistryBudget(r) if settings.peer_rate else None)

    # === taking from peers ===

    def take_spans(self, job: str, layer: str, z: Ztoc, spans: list[int]) -> dict[int, bytes]:
        """Verified compressed bytes (``compressed_start`` to ``compressed_end``) of those of
        ``spans`` that some peer holds and delivers; the others are absent."""
        bad = set(peers.bad_peers(self.redis, job, self.node))
        held = peers.holders(self.redis, layer, spans, me=self.node, skip=frozenset(bad) | self._rested())
        out: dict[int, bytes] = {}
        for i in spans:
            candidates = held.get(i, [])
            random.shuffle(candidates)
            s = z.span(i)
            for peer in candidates:
                if peer.name in bad or self._is_resting(peer.name):
                    continue
                data = self._from(job, peer, f"spans/{layer}/{i}", s.compressed_end - s.compressed_start,
                                  s.digest, bad, f"span {i} of layer {layer}")
                if data is not None:
                    out[i] = data
                    break
        return out

    def take_blob(self, job: str, layer: str, size: int) -> Path | None:
        """A whole layer from a peer, verified against its digest, staged in the cache folder
        (the caller ingests it, then :meth:`keep_blob`); None if no peer delivered it."""
        bad = set(peers.bad_peers(self.redis, job, self.node))
        candidates = peers.holders(self.redis, layer, [None], me=self.node,
                                   skip=frozenset(bad) | self._rested()).get(None, [])
        random.shuffle(candidates)
        algo, expected = parse_digest(layer)
        for peer in candidates:
            if self._is_resting(peer.name):
                continue
            staged = self.cache.staging(layer)
            try:
                self._pace(size)
                with open(staged, "wb") as f:
                    fetch(self.session, peer.address, f"blobs/{layer}", size, token=self.token, sink=f)
                h = hashlib.new(algo)
                with open(staged, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            except PeerFailure as err:
                staged.unlink(missing_ok=True)
                self._failed(job, peer, err.kind, str(err), bad)
                continue
            if h.hexdigest() != expected:
                staged.unlink(missing_ok=True)
                self._failed(job, peer, "corrupt", f"peer {peer.name} sent wrong bytes for layer {layer}", bad)
                continue
            PEER_BYTES.labels("in").inc(size)
            return staged
        return None

    def take_small_blob(self, job: str, digest: str, size: int, *, what: str) -> bytes | None:
        """A small blob (a zTOC) from a peer, in memory, verified against ``digest``; None if
        no peer delivered it."""
        bad = set(peers.bad_peers(self.redis, job, self.node))
        candidates = peers.holders(self.redis, digest, [None], me=self.node,
                                   skip=frozenset(bad) | self._rested()).get(None, [])
        random.shuffle(candidates)
        for peer in candidates:
            if peer.name in bad or self._is_resting(peer.name):
                continue
            data = self._from(job, peer, f"blobs/{digest}", size, digest, bad, what)
            if data is not None:
                return data
        return None

    def _from(self, job: str, peer: peers.Peer, what: str, expected: int, digest: str, bad: set[str],
              label: str) -> bytes | None:
        try:
            self._pace(expected)
            data = fetch(self.session, peer.address, what, expected, token=self.token)
            verify(data, digest, what=f"{label} from peer {peer.name}")
        except PeerFailure as err:
            self._failed(job, peer, err.kind, str(err), bad)
            return None
        except DigestMismatch as err:
            self._failed(job, peer, "corrupt", str(err), bad)
            return None
        PEER_BYTES.labels("in").inc(len(data))
        return data

    def _pace(self, nbytes: int) -> None:
        if self.download is not None:
            self.download.take(download_budget(self.node), nbytes)

    def _rested(self) -> frozenset[str]:
        now = time.monotonic()
        for name in [n for n, until in self._resting.items() if until <= now]:
            del self._resting[name]
        return frozenset(self._resting)

    def _is_resting(self, name: str) -> bool:
        return self._resting.get(name, 0.0) > time.monotonic()

    def _failed(self, job: str, peer: peers.Peer, kind: str, message: str, bad: set[str]) -> None:
        PEER_FAILURES.labels(kind).inc()
        if kind in COOLDOWN:
            self._resting[peer.name] = time.monotonic() + COOLDOWN[kind]
        if kind == "corrupt":
            log.warning("%s; peer %s is skipped for the rest of job %s", message, peer.name, job)
            peers.mark_bad(self.redis, job, self.node, peer.name)
            bad.add(peer.name)
        else:
            log.info("%s; trying the next holder", message)

    # === claims ===

    def claim(self, layer: str, group: int | None) -> tuple[bool, str]:
        """Claim the registry fetch of a group: (won by this process, the owning node).

        The claim names this process, not just its node: a task redelivered to another
        process of the node while the first still fetches (a visibility timeout passing
        during a long wait for the fleet budget) waits for that fetch instead of making a
        second one.  A claim won is renewed every third of its lease by a thread of this
        process until :meth:`release`: the fetch may wait behind the fleet's registry
        budget for longer than a lease, and a claim lost meanwhile would send a second
        node to the registry.
        """
        owner = peers.claim(self.redis, layer, group, self.claimant, self.lease)
        if owner != self.claimant:
            return False, owner.rpartition("#")[0] or owner
        with self._claims_lock:
            self._held.add((layer, group))
            if self._keeper is None or not self._keeper.is_alive():
                self._keeper = threading.Thread(target=self._keep_claims, name="prewarm-claims", daemon=True)
                self._keeper.start()
        return True, self.node

    def release(self, layer: str, group: int | None) -> None:
        with self._claims_lock:
            self._held.discard((layer, group))
        peers.release(self.redis, layer, group, self.claimant)

    def _keep_claims(self) -> None:
        """Renew the claims this process holds; ends when it holds none (a new claim restarts it)."""
        while True:
            time.sleep(self.lease / 3)
            with self._claims_lock:
                held = sorted(self._held, key=lambda c: (c[0], -1 if c[1] is None else c[1]))
                if not held:
                    self._keeper = None
                    return
            try:
                kept = peers.renew(self.redis, held, self.claimant, self.lease)
            except Exception as err:  # noqa: BLE001 - Redis away: the claims may lapse, which is safe
                log.info("could not renew span group claims (%s); they may lapse", err)
                continue
            lost = [c for c, ok in zip(held, kept) if not ok]
            if lost:
                with self._claims_lock:
                    self._held.difference_update(lost)

    # === keeping and announcing ===

    def keep_spans(self, layer: str, bodies: dict[int, memoryview]) -> None:
        """Keep spans' verified bytes for peers and announce them in one round trip (a full
        disk only skips them)."""
        kept = []
        for index, body in bodies.items():
            ok, evicted = self.cache.put(layer, index, body)
            self._forget(evicted)
            if ok:
                kept.append(index)
        if kept:
            peers.add_holders(self.redis, layer, kept, self.node)

    def blob_fits(self, size: int) -> bool:
        return size <= self.cache.limit // BLOB_SHARE

    def keep_blob(self, layer: str, staged: Path) -> None:
        """Adopt a staged whole layer, verified by the store's ingest, and announce it."""
        kept, evicted = self.cache.adopt(layer, staged)
        self._forget(evicted)
        if kept:
            peers.add_holders(self.redis, layer, [None], self.node)

    def keep_small_blob(self, digest: str, data: bytes) -> None:
        """Keep a verified small blob (a zTOC) for peers and announce it."""
        if not self.blob_fits(len(data)):
            return
        kept, evicted = self.cache.put(digest, None, data)
        self._forget(evicted)
        if kept:
            peers.add_holders(self.redis, digest, [None], self.node)

    def offer_cached(self, digest: str, path: Path) -> None:
        """Keep and announce a small blob this node already holds elsewhere (a zTOC in its
        cache, trusted: written only after its digest was verified), once per process."""
        if digest in self._offered:
            return
        self._offered.add(digest)
        if self.cache.lookup(digest, None) is None:
            try:
                size = path.stat().st_size
                if not self.blob_fits(size):
                    return
                data = path.read_bytes()
            except OSError:
                return
            self.keep_small_blob(digest, data)
        else:
            peers.add_holders(self.redis, digest, [None], self.node)

    def give_back(self, nbytes: int) -> None:
        """Before landing ``nbytes``: evict from the peer cache if the store would run short."""
        self._forget(self.cache.give_back(nbytes))

    def announce_all(self) -> int:
        """Announce everything in the cache (a worker starting with a cache from before)."""
        items = self.cache.items()
        by_layer: dict[str, list[int | None]] = {}
        for item in items:
            by_layer.setdefault(item.layer, []).append(item.span)
        for layer, spans in by_layer.items():
            peers.add_holders(self.redis, layer, spans, self.node)
        PEER_CACHE_BYTES.set(self.cache.recount())
        return len(items)

    def _forget(self, evicted: list[Item]) -> None:
        if evicted:
            peers.remove_holders(self.redis, self.node, [(e.layer, e.span) for e in evicted])


def download_budget(node: str) -> str:
    """The budget key of a node's downloads from peers (the registry budget's token bucket, reused)."""
    return f"peers-in@{node}"


def serve_peers(settings: Settings, r: Redis) -> Callable[[], None] | None:
    """Start the worker's peer server (when ``PREWARM_PEER_PORT`` is set); returns what each
    heartbeat calls: advertise the address (again, after a Redis restart) and report the cache.

    Raises:
        ConfigError: no address to advertise, or the port cannot be bound.
    """
    if not settings.peer_port:
        return None
    address = settings.peer_advertised()
    assert address is not None
    cache = PeerCache(settings.root, settings.peer_cache)
    server = PeerServer(cache.dir, bind=settings.peer_bind, port=settings.peer_port, token=settings.peer_token,
                        rate=settings.peer_rate, max_uploads=settings.peer_uploads)
    try:
        server.start()
    except OSError as err:
        raise ConfigError(f"cannot serve peers on {settings.peer_bind}:{settings.peer_port}: {err}; "
                          "set PREWARM_PEER_PORT to a free port (0 turns span sharing off)") from None
    log.info("serving verified spans to peers on %s:%d, advertised as %s (cache limit %d bytes)",
             settings.peer_bind, server.port, address, cache.limit)
    sharing = Sharing(settings.node_name, r, cache, settings.peer_token, settings.peer_lease)
    announced: list[bool] = []

    def beat() -> None:
        peers.advertise(r, settings.node_name, address)
        if not announced:
            if settings.peer_rate:  # downloads: one token bucket for all of the node's processes
                set_budget(r, download_budget(settings.node_name), rate=settings.peer_rate,
                           burst=max(settings.peer_rate, 8 << 20), concurrency=1 << 16)
            else:
                clear_budget(r, download_budget(settings.node_name))
            sharing.announce_all()
            announced.append(True)
        else:
            PEER_CACHE_BYTES.set(cache.size())

    return beat


def withdraw_peers(r: Redis, node: str) -> None:
    """The worker is stopping: take its peer address out of its registration, so that other
    nodes stop asking it for what it holds (best effort: a dead Redis cannot be told)."""
    try:
        peers.advertise(r, node, None)
    except redis.exceptions.RedisError as err:
        log.info("could not withdraw node %s's peer address (%s); peers skip it once its heartbeat is old",
                 node, err)
