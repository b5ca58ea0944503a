"""Range-fetch throughput from a local docker-registry through prewarm's RegistryClient.

Starts a private ``docker-registry`` on loopback, pushes one blob of ``--blob-mib`` MiB
(random bytes, so nothing compresses), then fetches ``--ranges`` ranges of
``--range-mib`` MiB each with ``fetch_range`` (the call span tasks make), first from
one thread and then from ``--threads`` threads, and prints MB/s for each.  Every
range is compared with the bytes pushed.

    .venv/bin/python -m bench.bench_range --blob-mib 256 --ranges 64 --range-mib 4 --threads 4
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blob-mib", type=int, default=256)
    parser.add_argument("--ranges", type=int, default=64)
    parser.add_argument("--range-mib", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from prewarm.resolve.registry.client import RegistryClient
    from tests.services import run_registry

    size = args.blob_mib << 20
    span = args.range_mib << 20
    if span > size:
        parser.error("--range-mib is larger than the blob")
    with tempfile.TemporaryDirectory(prefix="prewarm-bench-range-") as tmp:
        blob = Path(tmp) / "blob"
        with open(blob, "wb") as f:
            f.writelines(os.urandom(1 << 20) for _ in range(args.blob_mib))
        data = blob.read_bytes()
        with run_registry(Path(tmp) / "registry") as reg:
            client = RegistryClient(insecure_registries=frozenset({reg.host}), docker_config=Path(tmp))
            t0 = time.perf_counter()
            digest = client.push_blob(reg.host, "bench/range", blob)
            push_s = time.perf_counter() - t0
            rng = random.Random(1)
            starts = [rng.randrange(0, size - span + 1) for _ in range(args.ranges)]

            def fetch(start: int) -> int:
                got = client.fetch_range(reg.host, "bench/range", digest, start, start + span)
                if got != data[start:start + span]:
                    raise SystemExit(f"range at {start} came back wrong")
                return len(got)

            def timed(threads: int) -> tuple[float, float]:
                t = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
                    total = sum(pool.map(fetch, starts))
                elapsed = time.perf_counter() - t
                return total / elapsed / 1e6, elapsed

            fetch(0)  # warm the connection and the registry's file cache
            one, one_s = timed(1)
            many, many_s = timed(args.threads)
            client.close()
    print(f"blob {args.blob_mib} MiB pushed in {push_s:.2f}s ({size / push_s / 1e6:.0f} MB/s, monolithic PUT)")
    print(f"{args.ranges} x {args.range_mib} MiB ranges, 1 thread:  {one:.0f} MB/s ({one_s:.2f}s)")
    print(f"{args.ranges} x {args.range_mib} MiB ranges, {args.threads} threads: {many:.0f} MB/s ({many_s:.2f}s)")
    print("(every range compared byte for byte with the source; MB = 10^6 bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
