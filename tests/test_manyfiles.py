"""The many-file benchmark image (bench.manyfiles) and what the bench measures of processes (bench.probes)."""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from bench import manyfiles
from bench.probes import POOL_KIND, TreeSampler, process_kind, run_measured
from prewarm.imagebuild import blob_path, write_layer_tar


def _tar(n: int, seed: int = manyfiles.SEED) -> bytes:
    out = io.BytesIO()
    write_layer_tar(manyfiles.entries(n, seed), out)  # type: ignore[arg-type]  # a generator, streamed
    return out.getvalue()


def test_same_seed_gives_the_same_tar_bytes_and_another_seed_other_bytes() -> None:
    # Given 1,500 files (two directories' worth)
    # When the layer tar is generated twice with the same seed, once with another
    first, second, other = _tar(1500), _tar(1500), _tar(1500, seed=manyfiles.SEED + 1)
    # Then the same seed gives the same bytes, another seed different ones
    assert first == second
    assert first != other


def test_files_are_text_of_the_issue_sizes_a_thousand_to_a_directory() -> None:
    # Given the tar of 3,000 files
    with tarfile.open(fileobj=io.BytesIO(_tar(3000))) as tar:
        members = tar.getmembers()
        files = [m for m in members if m.isreg()]
        contents = [tar.extractfile(m).read() for m in files]  # type: ignore[union-attr]
    # Then there are 3,000 files, sized 200 B to 8 KiB, 2.2 KB on average (log-uniform: 2.15 KB)
    assert len(files) == 3000
    sizes = [m.size for m in files]
    assert min(sizes) >= manyfiles.MIN_SIZE and max(sizes) < manyfiles.MAX_SIZE
    assert 1900 <= statistics.mean(sizes) <= 2400, statistics.mean(sizes)
    assert abs(manyfiles.mean_size() - 2153) < 1
    # and a thousand to a directory, every directory before the files in it, all paths distinct
    by_dir: dict[str, int] = {}
    seen_dirs: set[str] = set()
    for m in members:
        if m.isdir():
            seen_dirs.add(m.name)
        else:
            parent = m.name.rsplit("/", 1)[0]
            assert parent in seen_dirs, m.name
            by_dir[parent] = by_dir.get(parent, 0) + 1
    assert sorted(by_dir.values()) == [1000, 1000, 1000]
    assert len({m.name for m in members}) == len(members)
    assert all(m.name.startswith(manyfiles.ROOT) for m in files)
    # and the content is text that gzip shrinks as it shrinks source code (3x to 4x), not 10x or 1x
    text_bytes = set(range(32, 127)) | {10}
    assert all(set(c) <= text_bytes for c in contents)
    raw = b"".join(contents)
    ratio = len(raw) / len(zlib.compress(raw, 6))
    assert 2.5 <= ratio <= 5, ratio
    # and every file names itself on its first line, so no two files are the same
    assert len(set(contents)) == len(contents)


def test_an_image_is_built_once_per_count_and_reused(tmp_path: Path) -> None:
    # Given an empty cache
    # When the 300-file image is asked for twice
    layout = manyfiles.build_many_files(tmp_path, 300)
    manifest = (layout / "complete").read_text()
    blobs = sorted(os.listdir(layout / "blobs" / "sha256"))
    stamp = (layout / "complete").stat().st_mtime_ns
    again = manyfiles.build_many_files(tmp_path, 300)
    # Then the second call returns the cached layout untouched
    assert again == layout and (layout / "complete").stat().st_mtime_ns == stamp
    assert sorted(os.listdir(layout / "blobs" / "sha256")) == blobs
    # and it holds one gzip layer whose tar is the generator's
    from isal import igzip

    from bench.images import layer_list

    (digest, _, media_type), = layer_list(layout)
    assert media_type.endswith("tar+gzip")
    with igzip.open(blob_path(layout, digest)) as src:
        assert src.read() == _tar(300)
    assert manifest.startswith("sha256:")


def test_a_count_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one file"):
        manyfiles.build_many_files(tmp_path, 0)


def test_process_kinds_tell_the_cli_the_worker_and_its_pool_apart() -> None:
    py = sys.executable
    assert process_kind([py, "-m", "prewarm", "schedule", "ref", "--wait"], None) == "prewarm schedule"
    assert process_kind([py, "-m", "prewarm", "worker", "-c", "4"], "prewarm schedule") == "prewarm worker"
    # a pool process is forked by the worker without exec: the same command line, a worker parent
    assert process_kind([py, "-m", "prewarm", "worker", "-c", "4"], "prewarm worker") == POOL_KIND
    assert process_kind(["/usr/bin/pigz", "-d"], "bash") == "pigz"
    assert process_kind([], None) == "?"
    # redis-server rewrites its title into one argument with spaces
    assert process_kind(["/usr/bin/redis-server unixsocket:/tmp/x/redis.sock", "", ""], "prewarm schedule") \
        == "redis-server"


def test_tree_sampler_counts_distinct_processes_and_their_peak_rss() -> None:
    # Given a child shell running two sleeps one after the other (two distinct processes)
    sampler = TreeSampler("prewarm worker")
    proc = subprocess.Popen(["sh", "-c", "sleep 0.6; sleep 0.6"])
    try:
        # When the tree is sampled through both
        sampler.start()
        proc.wait(timeout=10)
    finally:
        peak, _ = sampler.stop()
    # Then both sleeps were seen, each with a resident size, and the shell once
    assert len(sampler.kinds["sleep"].pids) == 2
    assert sampler.kinds["sleep"].peak > 0
    assert len(sampler.kinds["sh"].pids) == 1
    # and no process matched the worker needle
    assert peak == 0


_MEASURING_PARENT = """
import json, sys
from bench.probes import run_measured
held = bytearray(b"x") * (300 << 20)  # every page touched: the parent's peak is past 300 MB
del held
child = "held = bytearray(b'x') * (40 << 20)"
_, peak = run_measured([sys.executable, "-c", child], {})
print(json.dumps({"peak": peak}))
"""


def test_a_measured_command_is_charged_its_own_peak_not_the_benchmarks() -> None:
    # Given a benchmark process whose own peak passed 300 MB (it built an image, say)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # When it measures a command that holds 40 MB
    run = subprocess.run([sys.executable, "-c", _MEASURING_PARENT], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    peak = json.loads(run.stdout)["peak"]
    # Then the peak is the command's (40 MB and an interpreter), not the 300 MB the caller
    # once held (wait4's ru_maxrss of a command started by vfork starts at its caller's peak)
    assert 40 << 20 <= peak < 120 << 20, peak


def test_a_measured_command_that_fails_says_how() -> None:
    # When a measured command exits non-zero, or cannot be started at all
    with pytest.raises(RuntimeError, match=r"failed \(exit 3\): boom"):
        run_measured(["sh", "-c", "echo boom >&2; exit 3"], dict(os.environ))
    with pytest.raises(RuntimeError, match="could not be started: .*FileNotFoundError"):
        run_measured(["/nonexistent/command"], dict(os.environ))
