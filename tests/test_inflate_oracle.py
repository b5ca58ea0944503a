"""indexed_gzip as an independent oracle for our checkpoints and span inflation (issue 13 item 16).

indexed_gzip is zran's random access over zlib, written by other people: where it and we
read the same uncompressed bytes at the same offsets of a layer, our checkpoint windows
and our span inflation are right.  Layers here are what registries really hold: pigz
output of several gzip members, and content that does not compress; spans are soci's real
4 MiB.
"""

from __future__ import annotations

import io
import itertools
import os
import random
import subprocess
import tarfile
from pathlib import Path

import indexed_gzip
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prewarm.index.inflate import inflate_span
from prewarm.index.ztoc import WINDOW_SIZE
from prewarm.index.ztoc_build import build_ztoc

SPAN = 4 << 20


def _tar(rng: random.Random, size: int) -> bytes:
    """A tar of files mixing random (incompressible) and repetitive content, ~``size`` bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        done, i = 0, 0
        while done < size:
            n = rng.choice([rng.randrange(1, 4096), rng.randrange(64 << 10, 1 << 20), rng.randrange(1 << 20, 3 << 20)])
            if rng.random() < 0.5:
                data = rng.randbytes(n)
            else:
                words = [rng.choice([b"alpha", b"beta", b"gamma", b"torch", b"cuda"]) for _ in range(n // 5 + 1)]
                data = b" ".join(words)[:n]
            info = tarfile.TarInfo(f"d{i % 7}/f{i}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            done += len(data) + 512
            i += 1
    return buf.getvalue()


def _pigz_members(tar: bytes, members: int, level: int) -> bytes:
    """pigz output of ``members`` consecutive slices of the tar, concatenated (a multi-member gzip)."""
    cuts = sorted({0, len(tar), *(len(tar) * k // members for k in range(1, members))})
    out = b""
    for a, b in itertools.pairwise(cuts):
        out += subprocess.run(["pigz", f"-{level}", "-c"], input=tar[a:b], capture_output=True, check=True).stdout
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("oracle")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), members=st.integers(1, 4), level=st.sampled_from([1, 6, 9]),
       reads=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 6 << 20)), min_size=4, max_size=12))
def test_checkpoints_and_spans_agree_with_indexed_gzip(workdir: Path, seed: int, members: int, level: int,
                                                       reads: list[tuple[float, int]]) -> None:
    rng = random.Random(seed)
    tar = _tar(rng, rng.randrange(9 << 20, 18 << 20))
    gz = _pigz_members(tar, members, level)
    path = workdir / f"layer-{seed}-{members}-{level}.tar.gz"
    path.write_bytes(gz)
    ztoc = build_ztoc([gz[i:i + (1 << 20)] for i in range(0, len(gz), 1 << 20)], span_size=SPAN,
                      build_tool_identifier="oracle")
    assert ztoc.num_spans >= 2, "the layer must span several checkpoints"
    spans = [ztoc.span(i) for i in range(ztoc.num_spans)]
    with indexed_gzip.IndexedGzipFile(str(path), spacing=1 << 20) as oracle:
        # Each checkpoint's window is the 32 KiB the oracle reads before its offset
        for s in spans:
            assert s.checkpoint is not None
            start = s.checkpoint.uncompressed_offset
            oracle.seek(max(0, start - WINDOW_SIZE))
            before = oracle.read(min(start, WINDOW_SIZE))
            assert s.checkpoint.window[WINDOW_SIZE - len(before):] == before, f"window of span {s.index}"
        # Every span inflates, from its checkpoint alone, to what the oracle reads there
        inflated = []
        for k, s in enumerate(spans):
            data = gz[s.compressed_start:s.compressed_end]
            nxt = spans[k + 1].checkpoint.window if k + 1 < len(spans) else None  # type: ignore[union-attr]
            out = inflate_span(s, data, next_window=nxt, is_last=k + 1 == len(spans))
            oracle.seek(s.uncompressed_start)
            assert out == oracle.read(s.uncompressed_end - s.uncompressed_start), f"span {s.index}"
            inflated.append(out)
        whole = b"".join(inflated)
        assert whole == tar[:len(whole)] and len(whole) >= len(tar) - 2 * 512 * 10
        # And random reads across span boundaries agree byte for byte
        for frac, n in reads:
            off = int(frac * (len(whole) - 1))
            oracle.seek(off)
            assert whole[off:off + n] == oracle.read(n)[:len(whole[off:off + n])], (off, n)
    os.unlink(path)
