"""Bounded queues benchmark (issue 6 item 2): launch a 20 GB image plan on 1000 simulated nodes.

Run by hand from the repository root::

    .venv/bin/python -m bench.bench_fleet [--nodes 1000] [--layers 10] [--image-gb 20] [--span-mib 4]

Nothing is downloaded: the plan is synthesised with :func:`prewarm.fleet.plan.plan_image`
(``--layers`` layers of 4 MiB spans, about 5,000 span tasks for 20 GB) and launched with
:func:`prewarm.fleet.schedule.launch` against a private real ``redis-server``, exactly as
``prewarm schedule --all-nodes`` does once it has planned.  No worker consumes, so what
Redis holds afterwards is the bounded queue: nodes x window messages, whatever the
image size.  Reported: launch wall time (target < 5 s), Redis ``used_memory`` before and
after (target < 200 MB), and the number of queued messages counted from the node queues.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from prewarm.errors import PrewarmError
from prewarm.fleet import dispatch, keys, schedule
from prewarm.fleet.broker import wait_until_answers
from prewarm.fleet.plan import ImagePlan, plan_image

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def _digest(seed: str) -> str:
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def synthetic_plan(image_bytes: int, layers: int, span_bytes: int) -> ImagePlan:
    """A plan of ``layers`` equal gzip layers, each cut into ``span_bytes`` spans (compressed ~ 1:1)."""
    layer_size = image_bytes // layers
    spans = -(-layer_size // span_bytes)
    layer_list = [(_digest(f"layer{i}"), layer_size, GZIP) for i in range(layers)]
    span_layers = {d: (_digest(f"ztoc{i}"), spans, layer_size) for i, (d, _, _) in enumerate(layer_list)}
    return plan_image(reference="bench.invalid/ai/image:latest", manifest_digest=_digest("manifest"),
                      config_digest=_digest("config"), layers=layer_list,
                      diff_ids=[_digest(f"diff{i}") for i in range(layers)], span_layers=span_layers)


def _start_redis(data: Path) -> tuple[subprocess.Popen[bytes], redis.Redis]:
    sock = data / "redis.sock"
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                             "--dir", str(data), "--save", "", "--appendonly", "no", "--daemonize", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(unix_socket_path=str(sock))
    try:
        wait_until_answers(r, what=f"redis-server on {sock}", timeout=10.0)
    except PrewarmError as err:
        proc.kill()
        raise SystemExit(str(err)) from None
    return proc, r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--image-gb", type=float, default=20.0)
    ap.add_argument("--span-mib", type=int, default=4)
    ap.add_argument("--window", type=int, default=schedule.DEFAULT_WINDOW)
    args = ap.parse_args(argv)

    plan = synthetic_plan(int(args.image_gb * 1e9), args.layers, args.span_mib << 20)
    nodes = [f"node-{i:04d}" for i in range(args.nodes)]
    data = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    proc, r = _start_redis(data)
    try:
        before = int(r.info("memory")["used_memory"])
        url = f"unix://{data / 'redis.sock'}"
        t0 = time.perf_counter()
        job = schedule.launch(r, url, plan, plan.reference, nodes, window=args.window)
        launch_s = time.perf_counter() - t0
        after_launch = int(r.info("memory")["used_memory"])
        # Each node's worker then releases its own first window (at its next heartbeat); here
        # every node's share is done in turn, which a real fleet does in parallel.
        app = dispatch.sender(url)
        t1 = time.perf_counter()
        for node in nodes:
            schedule.start_own_windows(r, app, node)
        release_s = time.perf_counter() - t1
        after = int(r.info("memory")["used_memory"])
        queued = sum(int(r.llen(keys.node_queue(n))) for n in nodes)
        result = {
            "nodes": args.nodes, "image_bytes": plan.total_bytes, "span_tasks_per_node": plan.task_count,
            "window": args.window, "job": job, "launch_seconds": round(launch_s, 3),
            "used_memory_after_launch_mb": round(after_launch / 1e6, 1),
            "release_seconds_all_nodes_in_turn": round(release_s, 1),
            "release_seconds_per_node": round(release_s / len(nodes), 4),
            "queued_messages": queued, "used_memory_before": before, "used_memory_after": after,
            "used_memory_after_mb": round(after / 1e6, 1),
            "targets_met": launch_s < 5 and after < 200e6,
        }
        print(json.dumps(result, indent=2))
        return 0 if result["targets_met"] else 1
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
