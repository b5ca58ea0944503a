"""DirectWriter: the bytes land exactly where asked, direct or buffered, alone or in parallel."""

from __future__ import annotations

import errno
import itertools
import multiprocessing
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prewarm.store.directio import ALIGN, DirectWriter


def _supports_direct(d: Path) -> bool:
    probe = d / ".direct-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    probe.unlink()
    return True


def _pieces(size: int, rng: random.Random) -> list[tuple[int, int]]:
    cuts = sorted({0, size, *(rng.randrange(size) for _ in range(rng.randrange(1, 8)))})
    return list(itertools.pairwise(cuts))


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 3 << 20), seed=st.integers(0, 2**32), min_direct=st.sampled_from([ALIGN, 64 << 10]))
def test_pieces_in_any_order_make_the_file(tmp_path_factory: pytest.TempPathFactory, size: int, seed: int,
                                           min_direct: int) -> None:
    # Given a pre-sized file and its content cut into pieces at arbitrary offsets
    rng = random.Random(seed)
    data = rng.randbytes(size)
    path = tmp_path_factory.mktemp("dio") / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    pieces = _pieces(size, rng)
    rng.shuffle(pieces)
    writer = DirectWriter(min_direct=min_direct)
    # When each piece is written where it belongs, in random order
    try:
        for lo, hi in pieces:
            writer.pwrite(fd, memoryview(data)[lo:hi], lo)
    finally:
        os.close(fd)
    # Then the file is the content, byte for byte, and keeps its size
    assert path.read_bytes() == data


def test_large_aligned_middles_go_direct_and_small_writes_do_not(tmp_path: Path) -> None:
    if not _supports_direct(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT (the writer falls back; tested below)")
    data = os.urandom(1 << 20)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    os.ftruncate(fd, len(data) + 100)
    writer = DirectWriter()
    try:
        # a small write stays buffered
        writer.pwrite(fd, memoryview(data)[:1000], 100)
        assert writer.direct_bytes == 0
        # a large unaligned one sends its page-aligned middle direct, the rest buffered
        writer.pwrite(fd, memoryview(data), 100)
        assert writer.direct_bytes == (len(data) + 100) // ALIGN * ALIGN - ALIGN
        assert writer.enabled
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == bytes(100) + data


def test_disabled_writer_writes_everything_buffered(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    writer = DirectWriter(enabled=False)
    try:
        writer.pwrite(fd, memoryview(data), 3)
    finally:
        os.close(fd)
    assert writer.direct_bytes == 0
    assert (tmp_path / "f").read_bytes() == bytes(3) + data


def _land(path: str, data: bytes, pieces: list[tuple[int, int]]) -> None:
    writer = DirectWriter(min_direct=ALIGN)
    fd = os.open(path, os.O_WRONLY)
    try:
        for lo, hi in pieces:
            writer.pwrite(fd, memoryview(data)[lo:hi], lo)
    finally:
        os.close(fd)


def test_processes_writing_neighbouring_pieces_of_one_file_at_once(tmp_path: Path) -> None:
    # Given a file whose pieces share pages at their edges (as spans of one big file do)
    rng = random.Random(7)
    size = 24 << 20
    data = rng.randbytes(size)
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.truncate(size)
    cuts = sorted({0, size, *(rng.randrange(size) for _ in range(200))})
    pieces = list(itertools.pairwise(cuts))
    rng.shuffle(pieces)
    # When four processes write every other piece concurrently (direct middles, buffered edges)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_land, args=(str(path), data, pieces[i::4])) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    # Then the file is exactly the content: no page lost between the two paths
    os.sync()
    assert path.read_bytes() == data
