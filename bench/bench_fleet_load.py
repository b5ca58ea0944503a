"""Redis load of a busy fleet (issue 15 item 4): simulated nodes heartbeat, wait on the budget, report spans.

Run by hand from the repository root, for the code on PYTHONPATH (compare two checkouts)::

    .venv/bin/python -m bench.bench_fleet_load [--nodes 1000] [--workers 200] [--seconds 60]

A private real ``redis-server`` holds one job of a synthetic 20 GB plan on ``--nodes``
nodes.  For ``--seconds``:

* every node heartbeats every 5 s (and looks for jobs to start, as a worker does);
* ``--workers`` threads stand for pool processes: each takes a registry request from a
  fleet budget of ``--concurrency`` slots, holds it ``--hold`` seconds, and reports a span;
* one scheduler follows the job with ``schedule --wait``'s own loop.

Printed: Redis commands per second (INFO commandstats) by command, and Redis CPU seconds
per second (INFO cpu), over the measured window.  No timed assertion: it is run by hand.
"""

from __future__ import annotations

import argparse
import json
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

from bench.bench_fleet import _start_redis, synthetic_plan

REGISTRY = "registry.bench.invalid"


def _redis_counters(r) -> tuple[dict[str, int], float]:  # type: ignore[no-untyped-def]
    stats = r.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    cpu = r.info("cpu")
    return calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=200, help="threads standing for pool processes")
    ap.add_argument("--concurrency", type=int, default=64, help="fleet budget: registry requests at once")
    ap.add_argument("--hold", type=float, default=0.2, help="seconds a registry request takes")
    ap.add_argument("--seconds", type=float, default=60.0)
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
        root = data / "root"
        root.mkdir()

        def beat() -> None:
            i = 0
            while not stop.is_set():
                name = names[i % len(names)]
                nodes.heartbeat(r, name, labels={"pool": "gpu"}, root=root, layers=frozenset())
                jobs.unstarted_jobs(r, name)
                i += 1
                stop.wait(5.0 / len(names))

        def work(n: int) -> None:
            b = budget.RegistryBudget(r)
            k = n
            while not stop.is_set():
                with b.request(REGISTRY, 1 << 20):
                    stop.wait(args.hold)
                layer, span = plan.task_at(k % plan.task_count)
                jobs.record_span(r, job, names[n % len(names)], layer, span, 1 << 20)
                k += args.workers

        def follow() -> None:
            try:
                schedule.wait_for_job(r, job, timeout=args.seconds + 5)
            except Exception:  # noqa: BLE001 - the wait ends by its timeout here
                pass

        threads = [threading.Thread(target=beat, daemon=True), threading.Thread(target=follow, daemon=True)]
        threads += [threading.Thread(target=work, args=(n,), daemon=True) for n in range(args.workers)]
        for t in threads:
            t.start()
        time.sleep(min(5.0, args.seconds / 4))  # everyone started
        calls0, cpu0 = _redis_counters(r)
        t0 = time.monotonic()
        time.sleep(args.seconds)
        calls1, cpu1 = _redis_counters(r)
        elapsed = time.monotonic() - t0
        stop.set()
        per_second = {c: round((calls1.get(c, 0) - calls0.get(c, 0)) / elapsed) for c in calls1}
        per_second = {c: v for c, v in sorted(per_second.items(), key=lambda kv: -kv[1]) if v}
        print(json.dumps({
            "nodes": args.nodes, "workers": args.workers, "concurrency": args.concurrency, "hold": args.hold,
            "seconds": round(elapsed, 1),
            "redis_commands_per_second": sum(per_second.values()),
            "redis_cpu_seconds_per_second": round((cpu1 - cpu0) / elapsed, 3),
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
