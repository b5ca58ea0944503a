"""Reading zTOCs: span geometry, the legacy checkpoint layout, validation, hostile input."""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prewarm.errors import BadZtoc
from prewarm.index import ztoc as ztoc_module
from prewarm.index.inflate import inflate_span
from prewarm.index.ztoc import (
    CHECKPOINT_RECORD_SIZE,
    WINDOW_SIZE,
    ZINFO_HEADER_SIZE,
    Ztoc,
    parse_ztoc,
    serialize_ztoc,
    tar_zinfo_bytes,
)

FIXTURES = "fixtures/soci-ztoc"


def golden(shared_dir: Path, name: str) -> bytes:
    return (shared_dir / FIXTURES / f"{name}.ztoc").read_bytes()


def layer(shared_dir: Path, name: str) -> bytes:
    return (shared_dir / FIXTURES / f"{name}.tar.gz").read_bytes()


def tampered(z: Ztoc, **changes: object) -> bytes:
    """Serialise ``z`` with some fields replaced, bypassing every check (as an attacker would)."""
    copy = object.__new__(Ztoc)
    for slot in Ztoc.__slots__:
        object.__setattr__(copy, slot, getattr(z, slot))
    for k, v in changes.items():
        object.__setattr__(copy, k, v)
    return serialize_ztoc(copy)


def test_span_geometry_follows_the_checkpoints(shared_dir: Path) -> None:
    # Given soci's zTOC of a layer whose second checkpoint has 5 leftover bits
    z = parse_ztoc(golden(shared_dir, "basic-l9"))
    assert z.checkpoint_offsets() == [(10, 0, 0), (186, 5120, 5)]
    # Then span 0 ends at the next checkpoint's byte (shared byte included) ...
    s0, s1 = z.spans()
    assert (s0.compressed_start, s0.compressed_end) == (10, 186)
    # ... and span 1 starts one byte earlier, at the byte holding the leftover bits
    assert (s1.compressed_start, s1.compressed_end) == (185, 198)
    assert (s0.uncompressed_start, s0.uncompressed_end, s1.uncompressed_end) == (0, 5120, 5120)
    assert s0.checkpoint is not None and s0.checkpoint.window == bytes(WINDOW_SIZE)
    comp = layer(shared_dir, "basic-l9")
    assert s1.digest == "sha256:" + hashlib.sha256(comp[185:198]).hexdigest()
    assert z.span_for_offset(0) == 0 and z.span_for_offset(5119) == 0
    with pytest.raises(IndexError):
        z.span_for_offset(5120)
    with pytest.raises(IndexError):
        z.span(2)


def test_span_for_offset_picks_the_last_checkpoint_at_or_before(shared_dir: Path) -> None:
    z = parse_ztoc(golden(shared_dir, "incompressible-l0-s16384"))
    outs = [o for _, o, _ in z.checkpoint_offsets()]
    assert outs == [0, 65535, 131070]
    assert [z.span_for_offset(x) for x in (0, 65534, 65535, 131069, 131070, 132607)] == [
        0, 0, 1, 1, 2, 2]


def test_parse_reads_windows_lazily_from_an_mmap(shared_dir: Path, tmp_path: Path) -> None:
    # Given a cached zTOC mapped into memory
    path = tmp_path / "z"
    path.write_bytes(golden(shared_dir, "incompressible-l0-s16384"))
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    # When it is parsed
    z = parse_ztoc(buf)
    # Then the checkpoint blob is a view of the mapping, not a copy
    assert isinstance(z.checkpoints_blob, memoryview) and z.checkpoints_blob.obj is buf
    comp = layer(shared_dir, "incompressible-l0")
    s = z.span(1)
    out = inflate_span(s, comp[s.compressed_start:s.compressed_end],
                       next_window=z.checkpoint(2).window)
    assert len(out) == 65535
    del z, s, out


def test_legacy_layout_without_checkpoint_0_is_read(shared_dir: Path) -> None:
    # Given a zTOC in the pre-v0.1 layout: checkpoint 0 not stored, count still includes it
    z = parse_ztoc(golden(shared_dir, "basic-l0"))
    blob = bytes(z.checkpoints_blob)
    legacy_blob = blob[:ZINFO_HEADER_SIZE] + blob[ZINFO_HEADER_SIZE + CHECKPOINT_RECORD_SIZE:]
    raw = tampered(z, checkpoints_blob=legacy_blob)
    # When it is parsed
    legacy = parse_ztoc(raw)
    # Then checkpoint 0 is the implied one and the spans are the same
    assert legacy.legacy_checkpoints and legacy.num_spans == 2
    assert legacy.checkpoint(0).window == bytes(WINDOW_SIZE)
    assert legacy.checkpoint_offsets() == z.checkpoint_offsets()
    assert legacy.spans() == z.spans()
    assert serialize_ztoc(legacy) == raw
    comp = layer(shared_dir, "basic-l0")
    s = legacy.span(0)
    assert len(inflate_span(s, comp[s.compressed_start:s.compressed_end],
                            next_window=legacy.checkpoint(1).window)) == 5120


def test_uncompressed_tar_ztoc_round_trips() -> None:
    z = Ztoc(version="0.9", build_tool_identifier="t", compressed_archive_size=10_000,
             uncompressed_archive_size=10_000, files=(), compression="uncompressed",
             span_digests=["sha256:" + "0" * 64] * 3, checkpoints_blob=tar_zinfo_bytes(4096, 10_000))
    back = parse_ztoc(serialize_ztoc(z))
    assert back.compression == "uncompressed" and back.span_size == 4096
    assert [(s.compressed_start, s.compressed_end) for s in back.spans()] == [
        (0, 4096), (4096, 8192), (8192, 10_000)]
    assert back.span(2).checkpoint is None and back.span_for_offset(9999) == 2
    # soci's older raw 20-byte TarZinfo is read too
    raw = tampered(z, checkpoints_blob=struct.pack("<iqq", 2, 4096, 10_000))
    assert parse_ztoc(raw).span_size == 4096


@pytest.mark.parametrize(("change", "message"), [
    (lambda z: {"files": (dataclasses.replace(z.files[1], uncompressed_size=10**9),)
                + z.files[2:]}, "outside"),
    (lambda z: {"files": (z.files[1], dataclasses.replace(z.files[2],
                                                          uncompressed_offset=1100))},
     "overlaps"),
    (lambda z: {"files": (dataclasses.replace(z.files[1], name="../../etc/passwd"),)},
     "'..'"),
    (lambda z: {"files": (dataclasses.replace(z.files[1], name="a\x00b"),)}, "NUL"),
    (lambda z: {"files": (dataclasses.replace(z.files[1], type="socket"),)}, "unknown type"),
    (lambda z: {"files": (dataclasses.replace(z.files[1], uncompressed_offset=-5),)},
     "outside"),
    (lambda z: {"span_digests": z.span_digests + z.span_digests[:1]}, "span digests"),
    (lambda z: {"span_digests": ("md5:abc", z.span_digests[1])}, "not sha256"),
    (lambda z: {"uncompressed_archive_size": -1}, "negative"),
    (lambda z: {"checkpoints_blob": bytes(z.checkpoints_blob)[:-1]}, "checkpoint blob"),
    (lambda z: {"checkpoints_blob": struct.pack("<iq", 1 << 30, 4096)}, "cannot hold"),
    (lambda z: {"checkpoints_blob": struct.pack("<iq", 2, 0)
                + bytes(z.checkpoints_blob)[12:]}, "span size"),
    (lambda z: {"checkpoints_blob": _patch_checkpoint(z, 1, cin=5)}, "reversed|not in order"),
    (lambda z: {"checkpoints_blob": _patch_checkpoint(z, 1, cin=10**9)}, "outside"),
    (lambda z: {"checkpoints_blob": _patch_checkpoint(z, 1, bits=9)}, "leftover bits"),
    (lambda z: {"checkpoints_blob": _patch_checkpoint(z, 0, cout=7)}, "not 0"),
    (lambda z: {"checkpoints_blob": _patch_checkpoint(z, 1, cout=10**12)}, "past the"),
    (lambda z: {"compression": "uncompressed"}, "uncompressed layer"),
])
def test_malformed_ztocs_are_rejected_with_a_clear_message(shared_dir: Path, change, message) -> None:
    # Given soci's zTOC with one thing changed as an attacker might
    z = parse_ztoc(golden(shared_dir, "meta"))
    raw = tampered(z, **change(z))
    # Then parsing refuses it, saying what is wrong
    with pytest.raises(BadZtoc, match=message):
        parse_ztoc(raw)


def _patch_checkpoint(z: Ztoc, i: int, *, cin: int | None = None, cout: int | None = None,
                      bits: int | None = None) -> bytes:
    blob = bytearray(z.checkpoints_blob)
    at = ZINFO_HEADER_SIZE + i * CHECKPOINT_RECORD_SIZE
    a, b, c = struct.unpack_from("<qqB", blob, at)
    struct.pack_into("<qqB", blob, at, a if cin is None else cin, b if cout is None else cout,
                     c if bits is None else bits)
    return bytes(blob)


def test_huge_counts_are_rejected_before_allocating(shared_dir: Path) -> None:
    # Given a zTOC whose TOC vector claims two billion entries
    raw = bytearray(golden(shared_dir, "single"))
    z = parse_ztoc(bytes(raw))
    assert len(z.files) == 1
    needle = struct.pack("<I", 1)
    # the metadata vector length is the u32 just before the first entry's uoffset
    root = struct.unpack_from("<I", raw, 0)[0]
    vt = root - struct.unpack_from("<i", raw, root)[0]
    toc_field = struct.unpack_from("<H", raw, vt + 4 + 2 * 4)[0]
    toc = root + toc_field + struct.unpack_from("<I", raw, root + toc_field)[0]
    tvt = toc - struct.unpack_from("<i", raw, toc)[0]
    mfield = struct.unpack_from("<H", raw, tvt + 4)[0]
    vec = toc + mfield + struct.unpack_from("<I", raw, toc + mfield)[0]
    assert raw[vec:vec + 4] == needle
    raw[vec:vec + 4] = struct.pack("<I", 2_000_000_000)
    # Then it is refused as not fitting the buffer
    with pytest.raises(BadZtoc, match="runs past the buffer"):
        parse_ztoc(bytes(raw))


@pytest.mark.parametrize("raw", [b"", b"\x00" * 7, b"\x00" * 64, b"\xff" * 64,
                                 b"not a ztoc at all, just some text..."])
def test_garbage_is_rejected(raw: bytes) -> None:
    with pytest.raises(BadZtoc):
        parse_ztoc(raw)


def _exercise(z: Ztoc) -> None:
    """Use a zTOC that parsed: every accessor must work without surprises."""
    for i in range(z.num_spans):
        s = z.span(i)
        assert s.compressed_start <= s.compressed_end <= z.compressed_archive_size
        assert s.uncompressed_start <= s.uncompressed_end
    if z.uncompressed_archive_size:
        z.span_for_offset(z.uncompressed_archive_size - 1)
    for f in z.files:  # only a regular file's size is data (a symlink keeps its tar size)
        data = f.uncompressed_size if f.type == "reg" else 0
        assert 0 <= f.uncompressed_offset and 0 <= f.uncompressed_size
        assert f.uncompressed_offset + data <= z.uncompressed_archive_size
    serialize_ztoc(z)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_raise_only_bad_ztoc(raw: bytes) -> None:
    try:
        z = parse_ztoc(raw)
    except BadZtoc:
        return
    _exercise(z)


# Truncated and mutated golden zTOCs: tests/test_ztoc_hostile.py


# ==== serialisation against the flatbuffers package ======================================

def reference_serialize(z: Ztoc) -> bytes:
    """soci's ztocToFlatbuffer written with the `flatbuffers` package's Builder (a port of
    Go's), as an independent reference for our faster writer."""
    import flatbuffers

    raw = lambda s: s.encode("utf-8", "surrogateescape")
    b = flatbuffers.Builder(0)
    version, tool = b.CreateString(raw(z.version)), b.CreateString(raw(z.build_tool_identifier))
    offs = [0] * len(z.files)
    for k in range(len(z.files) - 1, -1, -1):
        f = z.files[k]
        strs = [b.CreateString(raw(x)) for x in (f.name, f.type, f.linkname, f.uname, f.gname,
                                                 f.mod_time)]
        xs = []
        for key, value in sorted(f.xattrs):
            ko, vo = b.CreateString(raw(key)), b.CreateString(raw(value))
            b.StartObject(2)
            b.PrependUOffsetTRelativeSlot(0, ko, 0)
            b.PrependUOffsetTRelativeSlot(1, vo, 0)
            xs.append(b.EndObject())
        b.StartVector(4, len(xs), 4)
        for x in reversed(xs):
            b.PrependUOffsetTRelative(x)
        xv = b.EndVector()
        b.StartObject(14)
        b.PrependUOffsetTRelativeSlot(0, strs[0], 0)
        b.PrependUOffsetTRelativeSlot(1, strs[1], 0)
        b.PrependInt64Slot(2, f.uncompressed_offset, 0)
        b.PrependInt64Slot(3, f.uncompressed_size, 0)
        b.PrependUOffsetTRelativeSlot(4, strs[2], 0)
        b.PrependInt64Slot(5, f.mode, 0)
        b.PrependUint32Slot(6, f.uid, 0)
        b.PrependUint32Slot(7, f.gid, 0)
        b.PrependUOffsetTRelativeSlot(8, strs[3], 0)
        b.PrependUOffsetTRelativeSlot(9, strs[4], 0)
        b.PrependUOffsetTRelativeSlot(10, strs[5], 0)
        b.PrependInt64Slot(11, f.devmajor, 0)
        b.PrependInt64Slot(12, f.devminor, 0)
        b.PrependUOffsetTRelativeSlot(13, xv, 0)
        offs[k] = b.EndObject()
    b.StartVector(4, len(offs), 4)
    for o in reversed(offs):
        b.PrependUOffsetTRelative(o)
    md = b.EndVector()
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, md, 0)
    toc = b.EndObject()
    cps = b.CreateByteVector(bytes(z.checkpoints_blob))
    ds = [b.CreateString(d.encode()) for d in z.span_digests]
    b.StartVector(4, len(ds), 4)
    for d in reversed(ds):
        b.PrependUOffsetTRelative(d)
    dv = b.EndVector()
    b.StartObject(4)
    b.PrependInt32Slot(1, z.num_spans - 1, 0)
    b.PrependUOffsetTRelativeSlot(2, dv, 0)
    b.PrependUOffsetTRelativeSlot(3, cps, 0)
    b.PrependInt8Slot(0, 1 if z.compression == "gzip" else 2, 1)
    info = b.EndObject()
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(0, version, 0)
    b.PrependUOffsetTRelativeSlot(1, tool, 0)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.PrependInt64Slot(2, z.compressed_archive_size, 0)
    b.PrependInt64Slot(3, z.uncompressed_archive_size, 0)
    b.PrependUOffsetTRelativeSlot(5, info, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


# "." and ".." are refused as names by the parser (a ".." component could escape a layer)
_names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="/\x00"),
                 min_size=1, max_size=40).filter(lambda name: name not in (".", ".."))


@st.composite
def random_ztocs(draw: st.DrawFn, shared_dir: Path) -> Ztoc:
    base = parse_ztoc(golden(shared_dir, "incompressible-l0-s16384"))
    files = []
    offset = 0
    for _ in range(draw(st.integers(0, 25))):
        size = draw(st.sampled_from([0, 0, 1, 7, 512, 4096]))
        offset += 512
        files.append(dataclasses.replace(
            base.files[0] if base.files else None,  # type: ignore[arg-type]
            name=draw(_names), type=draw(st.sampled_from(["reg", "dir", "symlink", "fifo"])),
            uncompressed_offset=offset, uncompressed_size=size,
            linkname=draw(st.sampled_from(["", "target"])), mode=draw(st.sampled_from([0, 0o644])),
            uid=draw(st.sampled_from([0, 1000, 2**32 - 1])), gid=draw(st.sampled_from([0, 5])),
            uname=draw(st.sampled_from(["", "root"])), gname=draw(st.sampled_from(["", "g"])),
            mod_time=draw(st.sampled_from(["", "2023-11-14T22:13:20Z"])),
            devmajor=draw(st.sampled_from([0, 8])), devminor=draw(st.sampled_from([0, 1])),
            xattrs=tuple(sorted(draw(st.dictionaries(_names, _names, max_size=3)).items()))))
        offset += size + (-size & 511)
    return tampered_ztoc(base, files=tuple(files), uncompressed_archive_size=max(
        offset + 1024, base.uncompressed_archive_size),
        build_tool_identifier=draw(st.sampled_from(["", "soci", "prewarm-ü"])))


def tampered_ztoc(z: Ztoc, **changes: object) -> Ztoc:
    copy = object.__new__(Ztoc)
    for slot in Ztoc.__slots__:
        object.__setattr__(copy, slot, getattr(z, slot))
    for k, v in changes.items():
        object.__setattr__(copy, k, v)
    return copy


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_serialiser_matches_the_flatbuffers_builder(shared_dir: Path, data: st.DataObject) -> None:
    # Given a random zTOC (entries with every mix of default and set fields)
    z = data.draw(random_ztocs(shared_dir))
    # When it is serialised by our writer and by the flatbuffers package's Builder
    ours = serialize_ztoc(z)
    # Then the bytes are the same, and they parse back to the same zTOC
    assert ours == reference_serialize(z)
    back = parse_ztoc(ours)
    assert back.files == z.files and back.build_tool_identifier == z.build_tool_identifier


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(name=st.sampled_from(["meta", "single", "multi-basic", "hdr-name"]),
       edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6),
       allowance=st.none() | st.integers(0, 4000))
def test_the_c_entry_decoder_agrees_with_the_python_one(shared_dir: Path, name: str,
                                                        edits: list[tuple[int, int]],
                                                        allowance: int | None) -> None:
    # Given soci's zTOC (entries with xattrs, long names, every type), maybe with bytes
    # changed in its FlatBuffers tables, and maybe a small decoding allowance
    c_decode = ztoc_module._decode_entries
    assert c_decode is not None, "the C decoder is not built (setup.py build_ext --inplace)"
    raw = bytearray(golden(shared_dir, name))
    n = len(raw)
    for pos, value in edits:
        raw[n - 1 - pos % min(n, 4096)] = value
    try:
        z = parse_ztoc(bytes(raw), lazy_files=True)
    except BadZtoc:
        return
    files = z.files
    r, start = files._reader, files._start  # type: ignore[attr-defined]
    budget = ztoc_module.decode_budget(n) if allowance is None else allowance
    # When every entry is decoded in C (which may pass: None) and in Python
    in_c, spent_c = c_decode(r.buf, start, len(files), ztoc_module.FileEntry,
                             ztoc_module._TYPE_BY_RAW, budget)
    if not edits and allowance is None:
        assert None not in in_c  # soci's own entries are all well-formed
    spent_py = 0
    for k in range(len(files)):
        at = start + 4 * k
        try:
            entry, cost = ztoc_module._read_entry(r, at + struct.unpack_from("<I", r.buf, at)[0], k,
                                                  budget - spent_py)
        except BadZtoc:
            # Then an entry Python refuses is one C passes on (for Python to name) ...
            assert in_c[k] is None, (name, k)
            continue
        # ... and C decodes every entry Python accepts, to the same entry at the same cost
        assert in_c[k] == entry, (name, k)
        spent_py += cost
    assert spent_c == spent_py


@pytest.mark.parametrize("field", range(14))
def test_a_field_ending_past_its_table_is_refused_by_both_decoders(shared_dir: Path,
                                                                   field: int) -> None:
    # Given soci's one-entry zTOC with one field of the entry moved so that it starts
    # inside the table but ends one byte past it (inside the buffer)
    c_decode = ztoc_module._decode_entries
    assert c_decode is not None, "the C decoder is not built (setup.py build_ext --inplace)"
    raw = bytearray(golden(shared_dir, "single"))
    files = parse_ztoc(bytes(raw), lazy_files=True).files
    start = files._start  # type: ignore[attr-defined]
    t = start + struct.unpack_from("<I", raw, start)[0]
    vt = t - struct.unpack_from("<i", raw, t)[0]
    vsize, tsize = struct.unpack_from("<HH", raw, vt)
    assert vsize == 4 + 2 * 14 and t + tsize + 8 <= len(raw)
    width = ztoc_module._ENTRY_WIDTHS[field]
    struct.pack_into("<H", raw, vt + 4 + 2 * field, tsize - width + 1)
    r = ztoc_module._Reader(memoryview(bytes(raw)), "zTOC")
    # Then C passes on it and Python refuses it, naming the field
    budget = ztoc_module.decode_budget(len(raw))
    (in_c,), spent = c_decode(r.buf, start, 1, ztoc_module.FileEntry, ztoc_module._TYPE_BY_RAW,
                              budget)
    assert in_c is None and spent == 0
    with pytest.raises(BadZtoc, match=f"field {field} of the table at {t} runs past its end"):
        ztoc_module._read_entry(r, t, 0, budget)
    with pytest.raises(BadZtoc, match="runs past its end"):
        parse_ztoc(bytes(raw))
