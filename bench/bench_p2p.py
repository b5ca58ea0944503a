"""Fleet span sharing benchmark (issue 14): registry egress and time per node, with peers and without.

Run by hand from the repository root::

    .venv/bin/python -m bench.bench_p2p --nodes 8 [--budget-mb 0] [--processes 1]

Everything is real and on loopback: one redis-server, one docker-registry holding the odd
test image (~47 MB of layers, two of them indexed into 256 KiB spans) with its SOCI index,
and ``--nodes`` ``prewarm worker`` processes, each with its own PREWARM_ROOT, node name
and peer port.  The image is scheduled on all nodes twice: with span sharing
(``PREWARM_PEER_PORT`` set) and without (``PREWARM_PEER_PORT=0``), each time on empty
stores.  Reported per mode: the layer bytes the registry logged sending divided by the
image's compressed size, the wall time of the job, and each node's time from its start
to its last finished task.  ``--budget-mb`` sets a fleet registry budget (MB/s) first.
One run each; a shared machine is noisy, read the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20)}


def run_mode(tmp: Path, registry, redis_url: str, ref: str, layers: dict[str, int], *,  # type: ignore[no-untyped-def]
             nodes: int, peers: bool, processes: int, budget_mb: float, tag: str) -> dict:
    import redis

    from prewarm.fleet import jobs
    from tests.pipeline_helpers import clean_env, prewarm, start_worker, wait_job
    from tests.services import free_port

    r = redis.Redis.from_url(redis_url)
    r.flushall()
    names = [f"b{i}" for i in range(nodes)]
    envs = {n: clean_env(tmp / f"{tag}-{n}", PREWARM_BROKER_URL=redis_url,
                         PREWARM_INSECURE_REGISTRIES=registry.host, PREWARM_NODE_NAME=n,
                         PREWARM_PEER_PORT=str(free_port()) if peers else "0", PREWARM_PEER_BIND="127.0.0.1",
                         PREWARM_TASK_EVENTS="0", **SPANS) for n in names}
    env = envs[names[0]]
    if budget_mb:
        prewarm("budget", registry.host, "--rate", f"{budget_mb}MB", "--burst", "2MB", env=env, check=True)
    workers = [start_worker(envs[n], tmp / f"{tag}-{n}.log", "-c", str(processes),
                            "--hostname", f"w@{n}") for n in names]
    try:
        deadline = time.monotonic() + 120
        while len(json.loads(prewarm("nodes", "--json", env=env, check=True).stdout)) < nodes:
            if time.monotonic() > deadline:
                raise SystemExit("the workers did not register")
            time.sleep(0.2)
        if peers:
            while not all(r.hget(f"prewarm:node:{n}", "peer") for n in names):
                time.sleep(0.2)
        before = sum(registry.bytes_served(f"/blobs/{d}") for d in layers)
        started = time.monotonic()
        job = prewarm("schedule", ref, "--all-nodes", env=env, check=True).stdout.strip()
        final = wait_job(job, env, timeout=1800)
        wall = time.monotonic() - started
        sent = sum(registry.bytes_served(f"/blobs/{d}") for d in layers) - before
        status = jobs.job_status(r, job)
    finally:
        for w in workers:
            w.stop()
    if final["state"] != "succeeded":
        raise SystemExit(f"job {job} ended {final['state']}: {final}")
    per_node = sorted(s.updated - s.started for s in status.nodes.values())
    return {"egress_ratio": sent / sum(layers.values()), "wall_s": wall, "node_s_median": statistics.median(per_node),
            "node_s_max": per_node[-1], "from_peers": sum(s.bytes_peers for s in status.nodes.values()),
            "from_registry": sum(s.bytes_registry for s in status.nodes.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--processes", type=int, default=1, help="worker processes per node")
    parser.add_argument("--budget-mb", type=float, default=0.0, help="fleet registry budget in MB/s (0: none)")
    parser.add_argument("--workdir", type=Path, help="keep the stores and worker logs here (default: a temp folder)")
    parser.add_argument("--modes", default="peers,no peers,one node", help="comma-separated subset of the modes")
    args = parser.parse_args(argv)

    from tests.images import odd_image
    from tests.pipeline_helpers import clean_env, prewarm, push
    from tests.services import run_redis, run_registry

    with tempfile.TemporaryDirectory(prefix="prewarm-bench-p2p-") as d:
        tmp = Path(d)
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
        with run_redis(tmp / "redis") as redis_server, run_registry(tmp / "registry") as registry:
            image = odd_image(tmp / "oci")
            ref = push(image, registry, "bench/p2p")
            prewarm("index", ref, "--push", env=clean_env(tmp / "indexer", PREWARM_INSECURE_REGISTRIES=registry.host,
                                                           **SPANS), check=True)
            layers = {layer.digest: layer.size for layer in image.layers}
            size = sum(layers.values())
            print(f"image {ref}: {len(layers)} layers, {size / 1e6:.1f} MB compressed; {args.nodes} nodes x "
                  f"{args.processes} process(es); registry budget "
                  f"{f'{args.budget_mb} MB/s' if args.budget_mb else 'none'}", flush=True)
            print(f"{'mode':<10} {'egress/image':>12} {'job wall s':>10} {'node s med':>10} {'node s max':>10} "
                  f"{'MB registry':>11} {'MB peers':>9}")
            modes = [("peers", args.nodes, True), ("no peers", args.nodes, False), ("one node", 1, True)]
            for tag, (label, nodes, peers) in enumerate(modes):
                if label not in args.modes.split(","):
                    continue
                res = run_mode(tmp, registry, redis_server.url, ref, layers, nodes=nodes, peers=peers,
                               processes=args.processes, budget_mb=args.budget_mb, tag=f"m{tag}")
                print(f"{label:<10} {res['egress_ratio']:>12.2f} {res['wall_s']:>10.1f} "
                      f"{res['node_s_median']:>10.1f} {res['node_s_max']:>10.1f} "
                      f"{res['from_registry'] / 1e6:>11.1f} {res['from_peers'] / 1e6:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
