"""Hostile zTOCs: whatever the bytes, parsing gives a zTOC or BadZtoc, within a memory budget.

A zTOC comes from a registry (or a peer), so it is untrusted input: no traceback, no
read past the buffer, and no decoding that multiplies memory because FlatBuffers lets
many references share one long string.  ``prewarm ztoc info`` must say so in one line
and exit with BadZtoc's code.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import flatbuffers
import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prewarm.errors import BadZtoc
from prewarm.index import ztoc as ztoc_module
from prewarm.index.ztoc import (
    DECODE_BUDGET_BASE,
    DECODE_BUDGET_PER_BYTE,
    WINDOW_SIZE,
    Ztoc,
    decode_budget,
    parse_ztoc,
    serialize_ztoc,
)

FIXTURES = "fixtures/soci-ztoc"
GOLDEN = ["meta", "single", "empty", "multi-basic", "hdr-name", "text-l6-s4096", "basic-l9"]


def golden(shared_dir: Path, name: str) -> bytes:
    return (shared_dir / FIXTURES / f"{name}.ztoc").read_bytes()


def ztoc_info(path: Path) -> Result:
    from prewarm.cli import main

    return CliRunner().invoke(main, ["ztoc", "info", str(path)])


def assert_refused_in_one_line(result: Result) -> None:
    assert result.exit_code == BadZtoc.exit_code, (result.exit_code, result.output, result.exception)
    assert result.output.startswith("prewarm: error:") and "is not a valid zTOC" in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


# ==== building zTOCs with the flatbuffers package =========================================

def entry(b: flatbuffers.Builder, name: int, type_: int, *, offset: int = 512, size: int = 0,
          xattrs: int = 0) -> int:
    """A FileMetadata table from strings (and an xattr vector) already in ``b``."""
    b.StartObject(14)
    b.PrependUOffsetTRelativeSlot(0, name, 0)
    b.PrependUOffsetTRelativeSlot(1, type_, 0)
    b.PrependInt64Slot(2, offset, 0)
    b.PrependInt64Slot(3, size, 0)
    b.PrependUOffsetTRelativeSlot(13, xattrs, 0)
    return b.EndObject()


def offsets(b: flatbuffers.Builder, refs: list[int]) -> int:
    b.StartVector(4, len(refs), 4)
    for ref in reversed(refs):
        b.PrependUOffsetTRelative(ref)
    return b.EndVector()


def ztoc_around(make_toc: Callable[[flatbuffers.Builder], int], *, digests: int = 1,
                shared_digest: bool = False, compression_info: bool = True,
                size: int = 1 << 20) -> bytes:
    """A gzip zTOC of one span of ``size`` bytes whose TOC vector is what ``make_toc`` builds.

    With ``shared_digest`` every span digest reference points at one string.
    """
    b = flatbuffers.Builder(0)
    version, tool = b.CreateString("0.9"), b.CreateString("hostile")
    toc_vector = make_toc(b)
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, toc_vector, 0)
    toc = b.EndObject()
    info = 0
    if compression_info:
        blob = struct.pack("<iq", 1, 4096) + struct.pack("<qqB", 10, 0, 0) + bytes(WINDOW_SIZE)
        checkpoints = b.CreateByteVector(blob)
        one = b.CreateString("sha256:" + "0" * 64)
        refs = [one if shared_digest else b.CreateString("sha256:" + "0" * 64)
                for _ in range(digests)]
        digest_vector = offsets(b, refs)
        b.StartObject(4)
        b.PrependInt32Slot(1, digests - 1, 0)
        b.PrependUOffsetTRelativeSlot(2, digest_vector, 0)
        b.PrependUOffsetTRelativeSlot(3, checkpoints, 0)
        info = b.EndObject()
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(0, version, 0)
    b.PrependUOffsetTRelativeSlot(1, tool, 0)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.PrependInt64Slot(2, size, 0)
    b.PrependInt64Slot(3, size, 0)
    if info:
        b.PrependUOffsetTRelativeSlot(5, info, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


def test_a_well_formed_crafted_ztoc_parses() -> None:
    # The builder above makes zTOCs the parser accepts, so the refusals below are for
    # what each test changes, not for the scaffolding.
    def toc(b: flatbuffers.Builder) -> int:
        refs = [entry(b, b.CreateString(f"f{i}"), b.CreateString("reg"), offset=512 + 1024 * i,
                      size=512) for i in range(3)]
        return offsets(b, refs)

    z = parse_ztoc(ztoc_around(toc))
    assert [f.name for f in z.files] == ["f0", "f1", "f2"] and z.num_spans == 1


# ==== reading past the buffer ============================================================

def overreading_ztoc() -> bytes:
    """A small zTOC whose one entry says its int64 size lies 1 byte before the end of its
    table, and whose table ends 4 bytes before the end of the buffer: reading the size
    would take 3 bytes past the buffer."""
    def toc(b: flatbuffers.Builder) -> int:
        return offsets(b, [entry(b, b.CreateString("f"), b.CreateString("reg"), size=7)])

    raw = bytearray(ztoc_around(toc, compression_info=False))
    n = len(raw)
    root = struct.unpack_from("<I", raw, 0)[0]

    def field(t: int, i: int) -> int:
        vt = t - struct.unpack_from("<i", raw, t)[0]
        return t + struct.unpack_from("<H", raw, vt + 4 + 2 * i)[0]

    def deref(at: int) -> int:
        return at + struct.unpack_from("<I", raw, at)[0]

    vector = deref(field(deref(field(root, 4)), 0))
    t = deref(vector + 4)
    vt = t - struct.unpack_from("<i", raw, t)[0]
    tsize = n - 4 - t
    struct.pack_into("<H", raw, vt + 2, tsize)             # the table "ends" 4 bytes early
    struct.pack_into("<H", raw, vt + 4 + 2 * 3, tsize - 1)  # and the size field starts in its last byte
    return bytes(raw)


def test_a_field_reaching_past_the_buffer_is_bad_ztoc_not_struct_error(tmp_path: Path) -> None:
    # Given a zTOC of about a hundred bytes whose entry's size field runs past the buffer
    raw = overreading_ztoc()
    assert len(raw) < 200
    # Then parsing refuses it as BadZtoc (it used to raise struct.error) ...
    with pytest.raises(BadZtoc, match="runs past its end"):
        parse_ztoc(raw)
    # ... and the CLI says so in one line with BadZtoc's exit code, no traceback
    path = tmp_path / "overread.ztoc"
    path.write_bytes(raw)
    assert_refused_in_one_line(ztoc_info(path))
    proc = subprocess.run([sys.executable, "-m", "prewarm", "ztoc", "info", str(path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == BadZtoc.exit_code, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ==== fuzzing golden zTOCs ================================================================

def _mutate(raw: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    """``raw`` with bytes changed (two thirds of them in the FlatBuffers tables at the end,
    after the big checkpoint blob) and maybe cut short."""
    out = bytearray(raw)
    n = len(out)
    for pos, value in edits:
        out[n - 1 - pos % min(n, 4096) if pos % 3 else pos % n] = value
    if cut is not None:
        out = out[:cut % (n + 1)]
    return bytes(out)


def _use(z: Ztoc) -> None:
    """Use a zTOC that parsed: every accessor must work without surprises, as `ztoc info`
    and a node use them."""
    from prewarm.cli.ztoc import _info

    for i in range(z.num_spans):
        s = z.span(i)
        assert s.compressed_start <= s.compressed_end <= z.compressed_archive_size
        assert s.uncompressed_start <= s.uncompressed_end
    for f in z.files:  # only a regular file's size is data (a symlink keeps its tar size)
        data = f.uncompressed_size if f.type == "reg" else 0
        assert 0 <= f.uncompressed_offset and 0 <= f.uncompressed_size
        assert f.uncompressed_offset + data <= z.uncompressed_archive_size
    _info(z, 0)
    serialize_ztoc(z)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(name=st.sampled_from(GOLDEN),
       edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
       cut=st.none() | st.integers(0, 1 << 20), lazy=st.booleans())
def test_truncated_and_mutated_golden_ztocs_parse_or_raise_bad_ztoc(
        shared_dir: Path, name: str, edits: list[tuple[int, int]], cut: int | None,
        lazy: bool) -> None:
    # Given soci's zTOC with bytes changed and maybe cut short
    raw = _mutate(golden(shared_dir, name), edits, cut)
    # Then it parses into something usable, or is refused with BadZtoc (nothing else)
    try:
        z = parse_ztoc(raw, lazy_files=lazy)
        _use(z)
    except BadZtoc:
        return


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(name=st.sampled_from(GOLDEN),
       edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
       cut=st.none() | st.integers(0, 1 << 20))
def test_ztoc_info_on_a_corrupt_ztoc_exits_with_one_line(shared_dir: Path, name: str,
                                                          edits: list[tuple[int, int]],
                                                          cut: int | None) -> None:
    # Given a truncated or mutated golden zTOC on disk
    raw = _mutate(golden(shared_dir, name), edits, cut)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "z.ztoc"
        path.write_bytes(raw)
        # When `prewarm ztoc info` reads it
        result = ztoc_info(path)
    # Then it prints the zTOC, or refuses it in one line with BadZtoc's exit code
    try:
        parse_ztoc(raw)
    except BadZtoc:
        assert_refused_in_one_line(result)
    else:
        assert result.exit_code == 0, (result.output, result.exception)


# ==== the decoding budget =================================================================

def _peak_while(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
    except BadZtoc:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


LONG = 65_536  # the longest name or xattr value an entry may have


def many_entries_one_name(count: int) -> bytes:
    """``count`` entries at their own offsets, all naming one 64 KiB name."""
    def toc(b: flatbuffers.Builder) -> int:
        name, type_ = b.CreateString("n" * LONG), b.CreateString("reg")
        return offsets(b, [entry(b, name, type_, offset=512 * (i + 1)) for i in range(count)])

    return ztoc_around(toc)


def many_xattrs_one_value(entries: int, xattrs: int) -> bytes:
    """``entries`` entries sharing one xattr vector of ``xattrs`` references to one pair
    whose value is 64 KiB: entries x xattrs copies of the value."""
    def toc(b: flatbuffers.Builder) -> int:
        key, value = b.CreateString("SCHILY.xattr.user.x"), b.CreateString("v" * LONG)
        b.StartObject(2)
        b.PrependUOffsetTRelativeSlot(0, key, 0)
        b.PrependUOffsetTRelativeSlot(1, value, 0)
        pair = b.EndObject()
        vector = offsets(b, [pair] * xattrs)
        name, type_ = b.CreateString("f"), b.CreateString("reg")
        return offsets(b, [entry(b, name, type_, offset=512 * (i + 1), xattrs=vector)
                           for i in range(entries)])

    return ztoc_around(toc)


@pytest.mark.parametrize(("make", "multiplied"), [
    (lambda: many_entries_one_name(2000), 2000 * LONG),
    (lambda: many_xattrs_one_value(1, 2000), 2000 * LONG),
    (lambda: many_xattrs_one_value(200, 10), 2000 * LONG),
], ids=["entries-share-a-name", "xattrs-share-a-value", "entries-share-xattrs"])
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("decoder", ["C", "Python"])
def test_shared_strings_cannot_multiply_memory(make: Callable[[], bytes], multiplied: int,
                                               lazy: bool, decoder: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if decoder == "Python":  # as when the C decoder is not built
        monkeypatch.setattr(ztoc_module, "_decode_entries", None)
    else:
        assert ztoc_module._decode_entries is not None, "the C decoder is not built"
    # Given a zTOC of under 160 KB whose references repeat one 64 KiB string 2,000 times
    # (about 131 MB once decoded)
    raw = make()
    assert len(raw) < 160_000 and multiplied > 800 * len(raw)
    budget = decode_budget(len(raw))
    assert budget == DECODE_BUDGET_PER_BYTE * len(raw) + DECODE_BUDGET_BASE

    def decode() -> None:
        z = parse_ztoc(raw, lazy_files=lazy)
        for k in range(len(z.files)):  # lazily, entry by entry, as a worker reads them
            z.files[k]
        list(z.files)

    # Then decoding it is refused, naming the budget ...
    with pytest.raises(BadZtoc, match=f"past {budget} bytes"):
        decode()
    # ... before it allocates more than the budget (and a little for the buffer itself)
    peak = _peak_while(decode)
    assert peak < budget + 2 * len(raw), (peak, budget)


def test_shared_span_digests_count_against_the_budget() -> None:
    # Given a zTOC whose 30,000 span digest references all point at one string
    raw = ztoc_around(lambda b: offsets(b, []), digests=30_000, shared_digest=True)
    assert len(raw) < 200_000
    # Then it is refused before the digests are decoded
    with pytest.raises(BadZtoc, match="span digests .* past"):
        parse_ztoc(raw)
    assert _peak_while(lambda: parse_ztoc(raw)) < 500_000


def test_the_budget_leaves_room_for_every_golden_ztoc_and_a_large_toc(shared_dir: Path) -> None:
    # Given TOCs as builders write them (every string stored once), even one of 20,000
    # entries with one-letter names and nothing else, the least bytes per entry possible
    for name in GOLDEN:
        parse_ztoc(golden(shared_dir, name))

    def toc(b: flatbuffers.Builder) -> int:
        refs = []
        for i in range(20_000):
            refs.append(entry(b, b.CreateString("a"), b.CreateString("dir"), offset=512 * (i + 1)))
        return offsets(b, refs)

    raw = ztoc_around(toc, size=512 * 20_002)
    # Then they parse
    assert len(parse_ztoc(raw).files) == 20_000


def test_ztoc_info_shows_strings_that_are_not_utf8(shared_dir: Path, tmp_path: Path) -> None:
    # Given a zTOC whose version and one file name hold bytes that are not UTF-8 (they come
    # from the image as they are)
    raw = bytearray(golden(shared_dir, "meta"))
    assert raw[-4:] == b"0.9\0"
    raw[-2] = 0x80

    def toc(b: flatbuffers.Builder) -> int:
        return offsets(b, [entry(b, b.CreateString(b"caf\xe9"), b.CreateString("reg"))])

    for name, data in (("version", bytes(raw)), ("name", ztoc_around(toc))):
        path = tmp_path / f"{name}.ztoc"
        path.write_bytes(data)
        # When `prewarm ztoc info` shows it, as text and as JSON
        from prewarm.cli import main

        text = CliRunner().invoke(main, ["ztoc", "info", str(path)])
        as_json = CliRunner().invoke(main, ["ztoc", "info", "--json", str(path)])
        # Then those bytes are shown escaped instead of stopping the command
        for result in (text, as_json):
            assert result.exit_code == 0, (result.output, result.exception)
        info = json.loads(as_json.output)
        if name == "version":
            assert info["version"] == "0.\\x80" and "version: 0.\\x80" in text.output
        else:
            assert info["files"][0]["filename"] == "caf\\xe9" and "caf\\xe9" in text.output
