"""Redis load of a busy fleet (issue 15 item 4): simulated nodes heartbeat, wait on the budget, report spans.

Run by hand from the repository root, for the code on PYTHONPATH (compare two checkouts)::

    .venv/bin/python -m bench.bench_fleet_load [--nodes 1000] [--workers 200] [--seconds 60]

A private real ``redis-server`` holds one job of a synthetic 20 GB plan on ``--nodes``
nodes.  For ``--seconds``:

* every node heartbeats every 5 s as a worker's heartbeat thread does: its node record
  (the node holds ``--layers-held`` layers from past jobs), its worker instance's beat
  (:mod:`prewarm.fleet.recovery`), and the worker's checks for jobs to start, standing
  schedules to join and stalled jobs, over ``--past-jobs`` finished jobs besides the live one;
* ``--workers`` threads stand for pool processes: each takes a registry request from a
  fleet budget of ``--concurrency`` slots, holds it ``--hold`` seconds, records the message
  as held by its node's worker (as ``workers.app.track_deliveries`` does) and reports a span;
* one scheduler follows the job with ``schedule --wait``'s own loop.

Printed: Redis commands per second (INFO commandstats) by command, Redis CPU seconds per
second (INFO cpu), and both per span reported, over the measured window.  No timed
assertion: it is run by hand.  With an older checkout on PYTHONPATH (run this file by path
from elsewhere) the parts it lacks are left out, so before and after compare like for like.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

try:  # the stage packages (this checkout) or the flat modules (before the layout)
    from prewarm.fleet import budget, jobs, nodes, schedule
except ImportError:  # pragma: no cover - an older checkout on PYTHONPATH
    from prewarm import budget, jobs, nodes, schedule  # type: ignore[no-redef, attr-defined]
try:
    from prewarm.fleet.recovery import WorkerInstance
except ImportError:  # pragma: no cover - a checkout before heartbeat recovery
    WorkerInstance = None  # type: ignore[assignment, misc]

from bench.bench_fleet import _start_redis, synthetic_plan

REGISTRY = "registry.bench.invalid"
#: Threads sharing the nodes' heartbeats (one alone falls behind 200 beats/s in Python).
BEAT_THREADS = 8


def _redis_counters(r) -> tuple[dict[str, int], float]:  # type: ignore[no-untyped-def]
    stats = r.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    cpu = r.info("cpu")
    return calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def _heartbeats(sock: Path, names: list[str], instance_ids: dict[str, str], layers_held: int, root: Path,
                halt, count) -> None:  # type: ignore[no-untyped-def]
    """Every node's heartbeat thread, as a worker runs it, each node every 5 s (a process of its own)."""
    import redis

    r = redis.Redis(unix_socket_path=str(sock))
    held = frozenset(f"sha256:{i:064x}" for i in range(layers_held))
    if hasattr(nodes.Heartbeat, "beat"):  # the worker's own heartbeat (the layer set sent when it changes)
        one_beat = {name: nodes.Heartbeat(r, name, {"pool": "gpu"}, root, lambda: held,
                                          instance=WorkerInstance(r, name, instance_ids[name])
                                          if name in instance_ids else None).beat for name in names}
    else:  # pragma: no cover - an older checkout: the whole record every beat
        one_beat = {name: (lambda name=name: nodes.heartbeat(r, name, labels={"pool": "gpu"}, root=root,
                                                             layers=held)) for name in names}

    def beat(mine: list[str]) -> None:
        i = 0
        start = time.monotonic()
        while not halt.is_set():
            name = mine[i % len(mine)]
            one_beat[name]()
            # what the worker's on_beat asks (prewarm.cli.node): jobs to start, to join, stalled
            jobs.unstarted_jobs(r, name)
            jobs.standing_jobs_for(r, {"pool": "gpu", jobs.NODE_NAME_LABEL: name})
            jobs.stalled_jobs(r, name, 1800)
            i += 1
            with count.get_lock():
                count.value += 1
            halt.wait(max(0.0, start + i * 5.0 / len(mine) - time.monotonic()))  # every node every 5 s

    threads = [threading.Thread(target=beat, args=(names[i::BEAT_THREADS],), daemon=True)
               for i in range(BEAT_THREADS)]
    for t in threads:
        t.start()
    halt.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=200, help="threads standing for pool processes")
    ap.add_argument("--concurrency", type=int, default=64, help="fleet budget: registry requests at once")
    ap.add_argument("--hold", type=float, default=0.2, help="seconds a registry request takes")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--layers-held", type=int, default=500, help="layers each node holds from past jobs")
    ap.add_argument("--past-jobs", type=int, default=200, help="finished jobs in Redis besides the live one")
    args = ap.parse_args(argv)

    plan = synthetic_plan(20 * 10**9, 10, 4 << 20)
    names = [f"node-{i:04d}" for i in range(args.nodes)]
    data = Path(tempfile.mkdtemp(prefix="bench-fleet-load-"))
    proc, r = _start_redis(data)
    stop = threading.Event()
    try:
        url = f"unix://{data / 'redis.sock'}"
        # more nodes than the eager release limit: the nodes release their own windows
        job = schedule.launch(r, url, plan, plan.reference, names, window=schedule.DEFAULT_WINDOW)
        budget.set_budget(r, REGISTRY, rate=0, burst=None, concurrency=args.concurrency)
        for i in range(args.past_jobs):  # over: settled, out of the active set, expiring
            past = jobs.create_job(r, plan, names[:10], window=2, image=f"bench.invalid/past:{i}")
            jobs.finish_job(r, past)
        root = data / "root"
        root.mkdir()
        instances = {name: WorkerInstance(r, name) for name in names} if WorkerInstance is not None else {}
        for instance in instances.values():
            instance.register()
        # the heartbeats in a process of their own: among 200 busy threads they fell behind
        beats = multiprocessing.get_context("fork").Value("q", 0)
        halt = multiprocessing.get_context("fork").Event()
        beater = multiprocessing.get_context("fork").Process(
            target=_heartbeats, args=(data / "redis.sock", names, {n: i.id for n, i in instances.items()},
                                      args.layers_held, root, halt, beats), daemon=True)
        beater.start()

        spans = [0]

        def work(n: int) -> None:
            b = budget.RegistryBudget(r)
            k = n
            node = names[n % len(names)]
            while not stop.is_set():
                with b.request(REGISTRY, 1 << 20):
                    stop.wait(args.hold)
                if node in instances:
                    instances[node].hold(f"tag-{n}-{k}")
                layer, span = plan.task_at(k % plan.task_count)
                jobs.record_span(r, job, node, layer, span, 1 << 20)
                spans[0] += 1
                k += args.workers

        def follow() -> None:
            with contextlib.suppress(Exception):  # the wait ends by its timeout here
                schedule.wait_for_job(r, job, timeout=args.seconds + 5)

        threads = [threading.Thread(target=follow, daemon=True)]
        threads += [threading.Thread(target=work, args=(n,), daemon=True) for n in range(args.workers)]
        for t in threads:
            t.start()
        time.sleep(min(5.0, args.seconds / 4))  # everyone started
        calls0, cpu0 = _redis_counters(r)
        spans0, beats0 = spans[0], beats.value
        t0 = time.monotonic()
        time.sleep(args.seconds)
        calls1, cpu1 = _redis_counters(r)
        elapsed = time.monotonic() - t0
        reported, beaten = spans[0] - spans0, beats.value - beats0
        stop.set()
        halt.set()
        beater.join(10)
        per_second = {c: round((calls1.get(c, 0) - calls0.get(c, 0)) / elapsed) for c in calls1}
        per_second = {c: v for c, v in sorted(per_second.items(), key=lambda kv: -kv[1]) if v}
        print(json.dumps({
            "nodes": args.nodes, "workers": args.workers, "concurrency": args.concurrency, "hold": args.hold,
            "seconds": round(elapsed, 1),
            "redis_commands_per_second": sum(per_second.values()),
            "redis_cpu_seconds_per_second": round((cpu1 - cpu0) / elapsed, 3),
            "spans_per_second": round(reported / elapsed, 1),
            "heartbeats_per_second": round(beaten / elapsed, 1),  # 1,000 nodes every 5 s: 200
            "redis_commands_per_span": round(sum(per_second.values()) * elapsed / max(1, reported), 1),
            "redis_cpu_ms_per_span": round(1000 * (cpu1 - cpu0) / max(1, reported), 3),
            "layers_held": args.layers_held, "past_jobs": args.past_jobs,
            "heartbeat_recovery": bool(instances),
            "by_command": per_second,
        }, indent=2))
        return 0
    finally:
        stop.set()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
