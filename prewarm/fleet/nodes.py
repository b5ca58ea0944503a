"""Fleet membership: each worker registers its node in Redis and keeps a heartbeat.

A node is *up* while its heartbeat is younger than :data:`NODE_TTL`; the registration
carries its labels (for ``--selector``), its free disk (for ``--dry-run`` and the space
check) and the layers its store holds ready (for "bytes already present").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from prewarm.fleet import keys

if TYPE_CHECKING:
    from prewarm.fleet.recovery import WorkerInstance

log = logging.getLogger(__name__)

#: Seconds between heartbeats.
HEARTBEAT_INTERVAL = 5.0
#: A node whose last heartbeat is older than this is reported down.
NODE_TTL = 30.0
#: A node record nobody refreshed for this long is forgotten (a node removed from the fleet).
NODE_RECORD_RETENTION = 7 * 24 * 3600


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: dict[str, str]
    free_bytes: int
    layers: frozenset[str]
    heartbeat: float
    root: str
    #: the node's workers run only signed tasks (PREWARM_TRUSTED_CERTS)
    signed_only: bool = False

    @property
    def up(self) -> bool:
        return time.time() - self.heartbeat < NODE_TTL


def parse_labels(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["zone=a", "gpu=true"]`` -> dict; a pair without ``=`` is an error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            from prewarm.errors import ConfigError

            raise ConfigError(f"label {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def worker_identity(root: Path) -> str:
    """Who runs a node's workers: host name, kernel boot and store.

    Workers of one node (several processes, a restart, the same pod again) share it; two
    hosts that fell back to the same host name, or two stores, do not.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()} {boot} {root}"


def check_name_free(r: redis.Redis, name: str, identity: str) -> None:
    """Refuse to run as ``name`` while a live worker elsewhere holds it.

    Two hosts under one name would share a queue and a job record, and each could mark the
    other's layers ready.

    Raises:
        ConfigError: a worker of another host or store heartbeats under ``name``.
    """
    h = {k.decode(): v.decode() for k, v in r.hgetall(keys.node(name)).items()}
    other = h.get("identity")
    if other and other != identity and time.time() - float(h.get("heartbeat", 0)) < NODE_TTL:
        from prewarm.errors import ConfigError

        raise ConfigError(f"node name {name!r} is in use by a live worker ({other}); give each node its own "
                          "PREWARM_NODE_NAME (the Kubernetes node name, from the downward API)")


def heartbeat(r: redis.Redis, name: str, *, labels: Mapping[str, str], root: Path,
              layers: frozenset[str] | None, identity: str | None = None, signed_only: bool = False) -> bool:
    """Register the node and refresh its heartbeat: one round trip of constant size.

    ``layers`` None leaves the recorded layer set as it is: the set grows with every image
    the node ever held, so :class:`Heartbeat` sends it only when it changed.

    Returns:
        False if ``layers`` was None and the record had to be made anew (it expired, or
        Redis lost it): the caller must send the layer set now.
    """
    free = shutil.disk_usage(root).free if root.exists() else 0
    fields: dict[str, str | int | float] = {
        "labels": json.dumps(dict(labels), sort_keys=True), "free_bytes": free,
        "heartbeat": time.time(), "root": str(root),
        "identity": identity or worker_identity(root), "signed_only": int(signed_only),
    }
    if layers is not None:
        fields["layers"] = json.dumps(sorted(layers))
    pipe = r.pipeline(transaction=True)
    pipe.sadd(keys.NODES, name)
    pipe.hset(keys.node(name), mapping=fields)
    pipe.expire(keys.node(name), NODE_RECORD_RETENTION)
    _, added, _ = pipe.execute()
    return layers is not None or not added  # HSET counts the fields it created: all of them, if it was gone


def list_nodes(r: redis.Redis) -> list[NodeInfo]:
    """Every registered node, in two round trips whatever the fleet size."""
    out = []
    names = sorted(raw.decode() if isinstance(raw, bytes) else raw for raw in r.smembers(keys.NODES))
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.node(name))
    for name, raw_h in zip(names, pipe.execute()):
        h = {k.decode(): v.decode() for k, v in raw_h.items()}
        if not h:  # its record expired: a node gone from the fleet for NODE_RECORD_RETENTION
            r.srem(keys.NODES, name)
            continue
        out.append(NodeInfo(name, json.loads(h.get("labels", "{}")), int(h.get("free_bytes", 0)),
                            frozenset(json.loads(h.get("layers", "[]"))), float(h.get("heartbeat", 0)),
                            h.get("root", ""), h.get("signed_only") == "1"))
    return out


def prune_nodes(r: redis.Redis, older_than: float, *, dry_run: bool = False) -> list[str]:
    """Forget the nodes whose last heartbeat is more than ``older_than`` seconds old.

    A node gone from the fleet (scaled down, renamed) is otherwise listed as down until its
    record expires, :data:`NODE_RECORD_RETENTION` after its last beat.  A node that beats
    again registers again.  Returns the names removed (with ``dry_run``: that would be).
    """
    cutoff = time.time() - older_than
    gone = [n.name for n in list_nodes(r) if n.heartbeat < cutoff]
    if gone and not dry_run:
        pipe = r.pipeline(transaction=False)
        for name in gone:
            pipe.delete(keys.node(name))
            pipe.srem(keys.NODES, name)
        pipe.execute()
    return gone


def select_nodes(nodes: list[NodeInfo], selector: Mapping[str, str]) -> list[NodeInfo]:
    return [n for n in nodes if n.up and all(n.labels.get(k) == v for k, v in selector.items())]


class Heartbeat(threading.Thread):
    """Background thread of a worker's main process: registers the node every few seconds.

    Each beat costs Redis the same whatever the node holds or the fleet ran before: the
    node's record without its layer set (sent only when it changed), and with ``instance``
    the worker instance's beat (:mod:`prewarm.fleet.recovery`), which also says when some
    worker of the fleet died; only then does this thread try to restore its messages.
    """

    def __init__(self, r: redis.Redis, name: str, labels: Mapping[str, str], root: Path,
                 layers: Callable[[], frozenset[str]], interval: float = HEARTBEAT_INTERVAL,
                 on_beat: Callable[[], object] | None = None, signed_only: bool = False,
                 instance: WorkerInstance | None = None) -> None:
        super().__init__(name="prewarm-heartbeat", daemon=True)
        self.r, self.node, self.labels, self.root = r, name, dict(labels), root
        self.layers, self.interval, self.on_beat = layers, interval, on_beat
        self.identity = worker_identity(root)
        self.signed_only = signed_only
        self.instance = instance
        self._sent: frozenset[str] | None = None  # the layer set Redis holds, as this thread wrote it
        self._halt = threading.Event()

    def start(self) -> None:
        """Claim the node's name (refused while another host's worker holds it), then beat.

        Raises:
            ConfigError: the name is held by a live worker of another host or store.
        """
        check_name_free(self.r, self.node, self.identity)
        if self.instance is not None:
            self.instance.register()
        super().start()

    def beat(self) -> None:
        """One beat: the node's record, the instance's beat, a recovery if someone died."""
        current = self.layers()
        changed = current != self._sent
        whole = heartbeat(self.r, self.node, labels=self.labels, root=self.root,
                          layers=current if changed else None, identity=self.identity,
                          signed_only=self.signed_only)
        if not whole:
            heartbeat(self.r, self.node, labels=self.labels, root=self.root, layers=current,
                      identity=self.identity, signed_only=self.signed_only)
        self._sent = current
        if self.instance is not None and self.instance.beat():
            from prewarm.fleet.recovery import recover

            recover(self.r)

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.beat()
                if self.on_beat is not None:
                    self.on_beat()
            except redis.exceptions.RedisError:
                self._sent = None  # Redis restarting: the next beat registers again, layers and all
            except Exception:  # the heartbeat must outlive any one bad beat
                self._sent = None
                log.exception("heartbeat of node %s failed; beating again in %.0fs", self.node, self.interval)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
