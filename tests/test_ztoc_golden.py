"""Golden vectors: zTOCs written by soci's own builder, with their inputs.

Every vector must parse and re-serialise to the same bytes, our builder must produce
the same bytes from the input (span size from ``manifest.json``, identifier
``soci-oracle``), and every span must inflate to the right slice of ``gzip -d``.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from prewarm.errors import ConfigError
from prewarm.index import zran
from prewarm.index.inflate import inflate_span
from prewarm.index.ztoc import parse_ztoc, serialize_ztoc
from prewarm.index.ztoc_build import build_ztoc, build_ztoc_from_file, read_chunks, verify_ztoc

FIXTURES = "fixtures/soci-ztoc"


def _vectors(shared_dir: Path) -> list[dict]:
    return json.loads((shared_dir / FIXTURES / "manifest.json").read_text())


def test_there_are_golden_vectors(shared_dir: Path) -> None:
    names = {v["name"] for v in _vectors(shared_dir)}
    assert len(names) >= 11
    assert {"multi-basic", "hdr-name", "meta", "empty", "incompressible-l0-s16384"} <= names


def test_every_vector_parses_and_reserialises_byte_for_byte(shared_dir: Path) -> None:
    for v in _vectors(shared_dir):
        # Given soci's zTOC
        raw = (shared_dir / FIXTURES / f"{v['name']}.ztoc").read_bytes()
        # When it is parsed and written again
        z = parse_ztoc(raw)
        # Then the bytes are identical and the fields are what soci wrote
        assert serialize_ztoc(z) == raw, v["name"]
        assert z.version == "0.9" and z.build_tool_identifier == "soci-oracle"
        assert z.span_size == v["span"] and z.compression == "gzip"
        assert z.compressed_archive_size == (shared_dir / FIXTURES / v["input"]).stat().st_size


@pytest.fixture(params=["zlib-ng", "zlib"])
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each zTOC-building inflater in turn (zran.backend is chosen once per process)."""
    monkeypatch.setenv("PREWARM_ZRAN", request.param)
    zran.backend.cache_clear()
    request.addfinalizer(zran.backend.cache_clear)
    name = zran.backend().name
    assert name.startswith(request.param + " "), name
    return name


def test_an_unknown_inflater_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREWARM_ZRAN", "gzip9000")
    zran.backend.cache_clear()
    try:
        with pytest.raises(ConfigError, match="PREWARM_ZRAN='gzip9000' is not an inflater"):
            zran.BlockInflater()
    finally:
        monkeypatch.delenv("PREWARM_ZRAN")
        zran.backend.cache_clear()


@pytest.mark.parametrize("chunk", [1 << 20, 4093])
def test_builder_reproduces_every_vector(shared_dir: Path, chunk: int, inflater: str) -> None:
    """Block boundaries are the stream's, not the decoder's: zlib-ng and libz agree."""
    for v in _vectors(shared_dir):
        # Given the layer soci indexed, its span size and identifier
        layer = shared_dir / FIXTURES / v["input"]
        want = (shared_dir / FIXTURES / f"{v['name']}.ztoc").read_bytes()
        # When we build the zTOC from it in one pass, in chunks of any size
        z = build_ztoc(read_chunks(layer, chunk), span_size=v["span"],
                       build_tool_identifier="soci-oracle")
        # Then it is soci's zTOC byte for byte
        assert serialize_ztoc(z) == want, v["name"]


def test_build_from_file_reproduces_a_vector(shared_dir: Path) -> None:
    v = next(x for x in _vectors(shared_dir) if x["name"] == "meta")
    z = build_ztoc_from_file(shared_dir / FIXTURES / v["input"], span_size=v["span"],
                             build_tool_identifier="soci-oracle")
    assert serialize_ztoc(z) == (shared_dir / FIXTURES / "meta.ztoc").read_bytes()


def test_every_span_of_every_vector_inflates_to_gzip_d(shared_dir: Path) -> None:
    for v in _vectors(shared_dir):
        layer = shared_dir / FIXTURES / v["input"]
        comp = layer.read_bytes()
        # gzip -d is the reference (the system tool, not our code)
        full = subprocess.run(["gzip", "-dc", str(layer)], check=True,
                              capture_output=True).stdout
        assert full == gzip.decompress(comp)
        z = parse_ztoc((shared_dir / FIXTURES / f"{v['name']}.ztoc").read_bytes())
        out = []
        for i in range(z.num_spans):
            s = z.span(i)
            nxt = z.checkpoint(i + 1).window if i + 1 < z.num_spans else None
            out.append(inflate_span(s, comp[s.compressed_start:s.compressed_end],
                                    next_window=nxt, is_last=i == z.num_spans - 1))
            # every span starts where the file says it does
            assert s.uncompressed_start == z.checkpoint(i).uncompressed_offset
        joined = b"".join(out)
        assert joined == full[:len(joined)], v["name"]
        assert len(joined) == z.uncompressed_archive_size == len(full), v["name"]


def test_meta_vector_toc_has_every_entry_kind(shared_dir: Path) -> None:
    z = parse_ztoc((shared_dir / FIXTURES / "meta.ztoc").read_bytes())
    by_name = {f.name: f for f in z.files}
    assert {f.type for f in z.files} == {"dir", "reg", "symlink", "hardlink", "char", "block",
                                         "fifo"}
    assert by_name["d/regular"].mode == 0o4755 and by_name["d/regular"].uname == "alice"
    assert by_name["d/chardev"].devmajor == 1 and by_name["d/chardev"].devminor == 3
    assert by_name["d/withxattrs"].real_xattrs == {"security.selinux": "unconfined_u",
                                                   "user.comment": "hi"}
    assert by_name["d/"].mod_time == "2023-11-14T22:13:20Z"
    assert len(by_name["d/longlink"].linkname) > 100


def tar_with_sized_symlink() -> bytes:
    """A tar whose symlink header says size 4096 (no data follows: a symlink has none).

    Go's tar reader, soci's builder and ours keep that size field in the TOC; the tar
    stream holds the next header right after the symlink's.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in (("a", b"first\n"), ("link", None), ("b", b"second\n" * 100)):
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if data is None:
                ti.type, ti.linkname = tarfile.SYMTYPE, "a"
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    at = 1024  # the symlink's header follows "a"'s header and its one data block
    assert raw[at:at + 4] == b"link" and raw[at + 156:at + 157] == tarfile.SYMTYPE
    raw[at + 124:at + 136] = b"%011o\0" % 4096
    raw[at + 148:at + 156] = b"        "
    raw[at + 148:at + 156] = b"%06o\0 " % sum(raw[at:at + 512])
    return bytes(raw)


def test_a_symlink_whose_header_has_a_size_builds_and_parses(tmp_path: Path) -> None:
    # Given a gzip layer holding a symlink whose tar header claims 4096 bytes
    tar = tar_with_sized_symlink()
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(gzip.compress(tar, mtime=0))
    # When our builder indexes it (keeping the size field, as soci does)
    z = build_ztoc_from_file(layer, span_size=4096, build_tool_identifier="soci-oracle")
    link = next(f for f in z.files if f.name == "link")
    assert (link.type, link.uncompressed_size, link.linkname) == ("symlink", 4096, "a")
    after = next(f for f in z.files if f.name == "b")
    assert after.uncompressed_offset == link.uncompressed_offset + 512  # no data between
    # Then the reader accepts that zTOC (the symlink's size is not data), eagerly and lazily
    raw = serialize_ztoc(z)
    for lazy in (False, True):
        back = parse_ztoc(raw, lazy_files=lazy)
        assert tuple(back.files) == tuple(z.files)
    assert serialize_ztoc(parse_ztoc(raw)) == raw
    # and verifying it against the layer passes
    assert verify_ztoc(parse_ztoc(raw), layer) == z.num_spans
