"""zTOC build throughput next to plain single-core zlib inflate of the same layer (issue 3).

Run by hand from the repository root (not a test)::

    .venv/bin/python -m bench.bench_ztoc [--cache DIR] [--size-mb 400] [--runs 3] [--pax]

It makes (once, cached) a realistic gzip -6 layer of 100+ MB compressed: a tar of the
virtualenv's site-packages and ``/usr/lib`` (tens of thousands of small files and some
big shared libraries, as in AI images).  Then, in the same run, each measurement in a fresh child
process so that its peak RSS is its own:

  zlib     ``zlib.decompressobj(31)`` over the file in 1 MiB chunks (the baseline)
  zlib-ng  the same with zlib-ng, the inflater the build drives (for reference)
  isal     the same with ISA-L (what workers use for spans; for reference)
  build    ``build_ztoc`` (4 MiB spans): checkpoints + span digests + TOC, one pass
  file     ``build_ztoc_file``: the same pass, the TOC spooled to disk and the zTOC
           written to a file, as ``prewarm index`` does (serialising included; its peak
           RSS should not grow with the layer's file count)

and prints MB/s of compressed input, the ratio build/zlib (target >= 0.8) in wall-clock
and in CPU time, the build's own overhead over its inflater (build / zlib-ng), and peak
RSS.  ``PREWARM_ZRAN=zlib`` makes the build use the system libz instead.
The build is also run on a layer half the size: peak RSS should not depend on the
layer's size (only the zTOC itself grows, 33 KB per 4 MiB span plus the file list).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
PAX = "--pax" in sys.argv
SOURCES = (str(Path(sys.prefix) / "lib"), "/usr/lib")


def make_layer(cache: Path, size_mb: int) -> Path:
    """A gzip -6 GNU tar of real files, about ``size_mb`` MB uncompressed (cached).

    Half the budget goes to the virtualenv (small Python files), half to /usr/lib
    (shared libraries).  GNU tar writes one header per file (plus long-name headers),
    as Docker's layer writer does (it truncates mtimes to seconds, so no PAX record per
    file); ``--pax`` makes a layer with a PAX header on every file instead.
    """
    cache.mkdir(parents=True, exist_ok=True)
    fmt = "pax" if PAX else "gnu"
    out = cache / f"layer-{size_mb}mb-{fmt}.tar.gz"
    if out.exists():
        return out
    budget = (size_mb << 20) // len(SOURCES)
    listing = cache / f"files-{size_mb}.txt"
    with open(listing, "w") as lst:
        for root in SOURCES:
            total = 0
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    p = os.path.join(dirpath, name)
                    try:
                        st = os.lstat(p)
                    except OSError:
                        continue
                    lst.write(p.lstrip("/") + "\n")
                    total += st.st_size + 512
                    if total >= budget:
                        break
                if total >= budget:
                    break
    tar_cmd = ["tar", "--no-recursion", "-C", "/", "-cf", "-", "-T", str(listing)]
    if PAX:
        tar_cmd.insert(1, "--format=pax")
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        tar = subprocess.Popen(tar_cmd, stdout=subprocess.PIPE)
        subprocess.run(["gzip", "-6", "-n", "-c"], stdin=tar.stdout, stdout=f, check=True)
        if tar.wait() not in (0, 1):  # 1: a file changed while being read
            raise SystemExit("tar failed")
    tmp.rename(out)
    listing.unlink()
    return out


def _chunks(paths: list[str]):  # type: ignore[no-untyped-def]
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk


def measure(kind: str, paths: list[str]) -> dict[str, Any]:
    """Run one measurement in this process; returns seconds and peak RSS."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    if kind in ("zlib", "zlib-ng", "isal"):
        if kind == "zlib":
            import zlib as mod
        elif kind == "zlib-ng":
            from zlib_ng import zlib_ng as mod  # type: ignore[no-redef]
        else:
            from isal import isal_zlib as mod  # type: ignore[no-redef]
        d = mod.decompressobj(31)
        out = 0
        for chunk in _chunks(paths):
            while chunk:
                out += len(d.decompress(chunk))
                chunk = d.unused_data
                if d.eof and chunk:
                    d = mod.decompressobj(31)
        result: dict[str, Any] = {"uncompressed": out}
    elif kind == "file":
        import tempfile

        from prewarm.index.ztoc_build import build_ztoc_file

        with tempfile.TemporaryDirectory(prefix="bench-ztoc-") as folder:
            made = build_ztoc_file(_chunks(paths), Path(folder) / "ztoc", span_size=4 << 20,
                                   build_tool_identifier="bench")
        result = {"spans": made.num_spans, "files": made.num_files, "ztoc_bytes": made.size}
    else:
        from prewarm.index.zran import backend
        from prewarm.index.ztoc import serialize_ztoc
        from prewarm.index.ztoc_build import build_ztoc

        z = build_ztoc(_chunks(paths), span_size=4 << 20, build_tool_identifier="bench")
        t1, c1 = time.perf_counter(), time.process_time()
        size = len(serialize_ztoc(z))
        result = {"inflater": backend().name, "spans": z.num_spans, "files": len(z.files), "ztoc_bytes": size,
                  "serialize_seconds": time.perf_counter() - t1}
        t0 += time.perf_counter() - t1  # report the build alone
        c0 += time.process_time() - c1
    result["seconds"] = time.perf_counter() - t0
    result["cpu_seconds"] = time.process_time() - c0
    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def in_child(kind: str, paths: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.bench_ztoc", "--measure", kind, *paths],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/prewarm-bench-ztoc"))
    ap.add_argument("--size-mb", type=int, default=400, help="uncompressed size of the layer")
    ap.add_argument("--runs", type=int, default=3, help="best of N for each measurement")
    ap.add_argument("--pax", action="store_true", help="a PAX header on every file (harder)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.paths)))
        return
    layer = make_layer(args.cache, args.size_mb)
    csize = layer.stat().st_size
    print(f"layer: {layer} ({csize / 1e6:.1f} MB compressed)")
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.runs):
        for kind in ("zlib", "zlib-ng", "isal", "build", "file"):
            r = in_child(kind, [str(layer)])
            if kind not in best or r["seconds"] < best[kind]["seconds"]:
                best[kind] = r
    for kind, r in best.items():
        print(f"{kind:8} {csize / 1e6 / r['seconds']:8.1f} MB/s compressed  "
              f"({r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU, "
              f"peak RSS {r['maxrss_mb']:.0f} MB)")
    b = best["build"]
    print(f"build (inflater: {b['inflater']}): {b['spans']:.0f} spans, {b['files']:.0f} files, zTOC {b['ztoc_bytes'] / 1e6:.1f} MB "
          f"(serialised in {b['serialize_seconds']:.2f} s, not counted)")
    print(f"ratio build / zlib inflate: {best['zlib']['seconds'] / b['seconds']:.2f} wall-clock "
          f"(target >= 0.8); {best['zlib']['cpu_seconds'] / b['cpu_seconds']:.2f} in CPU time")
    print(f"ratio build / zlib-ng inflate: {best['zlib-ng']['seconds'] / b['seconds']:.2f} wall-clock "
          f"(what checkpoints, span digests and the TOC cost on top of the inflate)")
    f = best["file"]
    print(f"build to a file (serialised, written): {f['seconds']:.2f} s, peak RSS {f['maxrss_mb']:.0f} MB, "
          f"zTOC {f['ztoc_bytes'] / 1e6:.1f} MB (in memory: build + serialize_ztoc "
          f"{b['seconds'] + b['serialize_seconds']:.2f} s, peak RSS {b['maxrss_mb']:.0f} MB)")
    half = make_layer(args.cache, args.size_mb // 2)
    small = in_child("build", [str(half)])
    print(f"build of a layer half the size ({half.stat().st_size / 1e6:.0f} MB): peak RSS "
          f"{small['maxrss_mb']:.0f} MB (full size: {b['maxrss_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
