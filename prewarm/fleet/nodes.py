"""Fleet membership: each worker registers its node in Redis and keeps a heartbeat.

A node is *up* while its heartbeat is younger than :data:`NODE_TTL`; the registration
carries its labels (for ``--selector``), its free disk (for ``--dry-run`` and the space
check) and the layers its store holds ready (for "bytes already present").
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import redis

from prewarm.fleet import keys

#: Seconds between heartbeats.
HEARTBEAT_INTERVAL = 5.0
#: A node whose last heartbeat is older than this is reported down.
NODE_TTL = 30.0


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: dict[str, str]
    free_bytes: int
    layers: frozenset[str]
    heartbeat: float
    root: str

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


def heartbeat(r: redis.Redis, name: str, *, labels: Mapping[str, str], root: Path,
              layers: frozenset[str]) -> None:
    free = shutil.disk_usage(root).free if root.exists() else 0
    pipe = r.pipeline(transaction=True)
    pipe.sadd(keys.NODES, name)
    pipe.hset(keys.node(name), mapping={
        "labels": json.dumps(dict(labels), sort_keys=True), "free_bytes": free,
        "layers": json.dumps(sorted(layers)), "heartbeat": time.time(), "root": str(root),
    })
    pipe.execute()


def list_nodes(r: redis.Redis) -> list[NodeInfo]:
    out = []
    for raw in sorted(r.smembers(keys.NODES)):
        name = raw.decode() if isinstance(raw, bytes) else raw
        h = {k.decode(): v.decode() for k, v in r.hgetall(keys.node(name)).items()}
        if not h:
            continue
        out.append(NodeInfo(name, json.loads(h.get("labels", "{}")), int(h.get("free_bytes", 0)),
                            frozenset(json.loads(h.get("layers", "[]"))), float(h.get("heartbeat", 0)),
                            h.get("root", "")))
    return out


def select_nodes(nodes: list[NodeInfo], selector: Mapping[str, str]) -> list[NodeInfo]:
    return [n for n in nodes if n.up and all(n.labels.get(k) == v for k, v in selector.items())]


class Heartbeat(threading.Thread):
    """Background thread of a worker's main process: registers the node every few seconds."""

    def __init__(self, r: redis.Redis, name: str, labels: Mapping[str, str], root: Path,
                 layers: Callable[[], frozenset[str]], interval: float = HEARTBEAT_INTERVAL,
                 on_beat: Callable[[], object] | None = None) -> None:
        super().__init__(name="prewarm-heartbeat", daemon=True)
        self.r, self.node, self.labels, self.root = r, name, dict(labels), root
        self.layers, self.interval, self.on_beat = layers, interval, on_beat
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                heartbeat(self.r, self.node, labels=self.labels, root=self.root, layers=self.layers())
                if self.on_beat is not None:
                    self.on_beat()
            except redis.exceptions.RedisError:
                pass  # Redis restarting: the next beat registers again
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
