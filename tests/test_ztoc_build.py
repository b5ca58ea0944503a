"""The one-pass zTOC builder: checkpoints, digests and TOC checked against the layer itself."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import random
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prewarm.errors import BadTarHeader, ConfigError, CorruptContent
from prewarm.index import zran
from prewarm.index.tarindex import TarIndexer
from prewarm.index.ztoc import WINDOW_SIZE, parse_ztoc, serialize_ztoc
from prewarm.index.ztoc_build import (
    build_tar_ztoc,
    build_ztoc,
    build_ztoc_from_file,
    detect_compression,
    read_chunks,
)


def make_tar(seed: int, files: int = 30) -> bytes:
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(files):
            kind = rng.random()
            if kind < 0.3:
                data = rng.randbytes(rng.randrange(0, 40_000))
            else:
                words = [bytes(rng.choices(b"etaoinshr", k=rng.randrange(1, 8))) for _ in range(50)]
                data = b" ".join(rng.choice(words) for _ in range(rng.randrange(0, 20_000)))
            ti = tarfile.TarInfo(f"dir{i % 4}/file-{i}")
            ti.size = len(data)
            ti.mtime = 1_700_000_000 + i
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def check_against_layer(comp: bytes, span_size: int) -> None:
    """Every claim of the built zTOC, checked against the layer and gzip -d."""
    z = build_ztoc([comp[i:i + 65_536] for i in range(0, len(comp), 65_536)],
                   span_size=span_size, build_tool_identifier="test")
    full = subprocess.run(["gzip", "-dc"], input=comp, check=True, capture_output=True).stdout
    assert z.compressed_archive_size == len(comp)
    cps = z.checkpoint_offsets()
    for i, (cin, cout, bits) in enumerate(cps):
        window = z.checkpoint(i).window
        # the window is the 32 KiB of output before the checkpoint, zero-filled at the start
        expect = full[max(0, cout - WINDOW_SIZE):cout]
        assert window == bytes(WINDOW_SIZE - len(expect)) + expect
        assert 0 <= bits <= 7
        if i:
            # every span holds more than span_size uncompressed bytes
            assert cout - cps[i - 1][1] > span_size
    for s in z.spans():
        assert s.digest == "sha256:" + hashlib.sha256(comp[s.compressed_start:s.compressed_end]).hexdigest()
    # the TOC is the tar's, from the same stream
    ix = TarIndexer()
    assert list(z.files) == ix.feed(full) + ix.finish()
    assert z.uncompressed_archive_size == ix.ended_at
    # and it survives the trip through soci's format
    assert parse_ztoc(serialize_ztoc(z)).checkpoint_offsets() == cps


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_checkpoints_digests_and_toc_match_the_layer(level: int) -> None:
    comp = gzip.compress(make_tar(level), compresslevel=level, mtime=0)
    check_against_layer(comp, span_size=64 * 1024)


def test_pigz_and_concatenated_members(tmp_path: Path) -> None:
    # Given a layer compressed by pigz, and one made of three concatenated gzip members
    tar = make_tar(11, files=60)
    (tmp_path / "l.tar").write_bytes(tar)
    pigz = subprocess.run(["pigz", "-6", "-b", "32", "-c", str(tmp_path / "l.tar")], check=True,
                          capture_output=True).stdout
    third = len(tar) // 3
    multi = b"".join(gzip.compress(tar[a:b], compresslevel=6, mtime=0)
                     for a, b in ((0, third), (third, 2 * third), (2 * third, len(tar))))
    # Then checkpoints continue across members and everything matches the layer
    check_against_layer(pigz, span_size=32 * 1024)
    check_against_layer(multi, span_size=32 * 1024)


def test_gzip_header_with_file_name(tmp_path: Path) -> None:
    # `gzip file` stores the name (FNAME): checkpoint 0 moves past it
    (tmp_path / "layer.tar").write_bytes(make_tar(3, files=5))
    subprocess.run(["gzip", "-6", str(tmp_path / "layer.tar")], check=True)
    comp = (tmp_path / "layer.tar.gz").read_bytes()
    z = build_ztoc_from_file(tmp_path / "layer.tar.gz", span_size=4096,
                             build_tool_identifier="t")
    assert z.checkpoint_offsets()[0] == (10 + len(b"layer.tar\0"), 0, 0)
    check_against_layer(comp, span_size=4096)


def test_chunk_boundaries_do_not_change_the_result() -> None:
    comp = gzip.compress(make_tar(5, files=6), compresslevel=6, mtime=0)
    want = serialize_ztoc(build_ztoc([comp], span_size=16_384, build_tool_identifier="t"))
    assert parse_ztoc(want).num_spans > 3
    for size in (1, 2, 3, 511, 4096, 100_003):
        chunks = [comp[i:i + size] for i in range(0, len(comp), size)]
        assert serialize_ztoc(build_ztoc(chunks, span_size=16_384, build_tool_identifier="t")) == want


def test_uncompressed_tar_gets_the_tarzinfo_form(tmp_path: Path) -> None:
    tar = make_tar(8, files=10)
    path = tmp_path / "layer.tar"
    path.write_bytes(tar)
    z = build_ztoc_from_file(path, span_size=10_000, build_tool_identifier="t")
    assert z.compression == "uncompressed" and z.span_size == 10_000
    assert z.num_spans == -(-len(tar) // 10_000)
    for s in z.spans():
        assert s.digest == "sha256:" + hashlib.sha256(tar[s.compressed_start:s.compressed_end]).hexdigest()
    back = parse_ztoc(serialize_ztoc(z))
    assert back.files == z.files and back.span_digests == z.span_digests
    gz = build_ztoc([gzip.compress(tar, mtime=0)], span_size=10_000, build_tool_identifier="t")
    assert gz.files == z.files
    assert build_tar_ztoc(read_chunks(path, 777), span_size=10_000,
                          build_tool_identifier="t").span_digests == z.span_digests


def test_detect_compression() -> None:
    assert detect_compression(b"\x1f\x8b\x08\x00") == "gzip"
    assert detect_compression(b"\x28\xb5\x2f\xfd") == "zstd"
    assert detect_compression(b"usr/") == "uncompressed"
    assert detect_compression(b"") == "uncompressed"


def test_bad_layers_are_refused_clearly(tmp_path: Path) -> None:
    comp = gzip.compress(make_tar(2, files=3), mtime=0)
    with pytest.raises(CorruptContent, match="ends early"):
        build_ztoc([comp[:-20]], span_size=4096, build_tool_identifier="t")
    with pytest.raises(CorruptContent, match="not valid gzip"):
        build_ztoc([comp[:30] + bytes(100) + comp[130:]], span_size=4096,
                   build_tool_identifier="t")
    with pytest.raises(CorruptContent, match="not valid gzip"):
        build_ztoc([comp + b"trailing garbage"], span_size=4096, build_tool_identifier="t")
    with pytest.raises(BadTarHeader):
        build_ztoc([gzip.compress(b"\x01" * 2048, mtime=0)], span_size=4096,
                   build_tool_identifier="t")
    with pytest.raises(ConfigError, match="span size"):
        build_ztoc([comp], span_size=0, build_tool_identifier="t")
    (tmp_path / "z.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(20))
    with pytest.raises(ConfigError, match="zstd"):
        build_ztoc_from_file(tmp_path / "z.zst", span_size=4096, build_tool_identifier="t")
    with pytest.raises(ConfigError, match="cannot read"):
        build_ztoc_from_file(tmp_path / "missing.tar.gz", span_size=4096,
                             build_tool_identifier="t")


# ==== the `prewarm ztoc` commands ========================================================

FIXTURES = "fixtures/soci-ztoc"


def run_cli(*args: str):  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from prewarm.cli import main

    return CliRunner().invoke(main, list(args))


def test_cli_build_writes_soci_bytes_and_verify_accepts_them(shared_dir: Path, tmp_path: Path) -> None:
    d = shared_dir / FIXTURES
    out = tmp_path / "meta.ztoc"
    # When `prewarm ztoc build` indexes the golden input with soci's parameters
    result = run_cli("ztoc", "build", str(d / "meta.tar.gz"), "--span-size", "4096",
                     "--build-tool-identifier", "soci-oracle", "-o", str(out))
    # Then it writes soci's zTOC and says what it wrote
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (d / "meta.ztoc").read_bytes()
    assert "2 spans, 11 files" in result.output
    # And verify accepts soci's own zTOC for that layer
    result = run_cli("ztoc", "verify", str(d / "meta.ztoc"), str(d / "meta.tar.gz"))
    assert result.exit_code == 0 and "OK" in result.output


def test_cli_info_shows_spans_checkpoints_and_files(shared_dir: Path) -> None:
    d = shared_dir / FIXTURES
    result = run_cli("ztoc", "info", str(d / "basic-l9.ztoc"), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["num_spans"] == 2 and info["span_size"] == 4096
    assert info["build_tool"] == "soci-oracle" and info["compression"] == "gzip"
    assert info["spans"][1]["checkpoint"] == {"compressed_offset": 186,
                                              "uncompressed_offset": 5120, "bits": 5}
    assert info["spans"][1]["compressed_start"] == 185
    assert [f["filename"] for f in info["files"]][:2] == ["etc/", "etc/hostname"]
    text = run_cli("ztoc", "info", str(d / "basic-l9.ztoc"))
    assert text.exit_code == 0 and "usr/bin/true" in text.output and "num_spans: 2" in text.output


def test_cli_verify_names_the_first_mismatch(shared_dir: Path, tmp_path: Path) -> None:
    d = shared_dir / FIXTURES
    z = parse_ztoc((d / "text-l6-s4096.ztoc").read_bytes())
    # a span digest that does not match the layer
    forged = tmp_path / "digest.ztoc"
    copy = build_ztoc([(d / "text-l6.tar.gz").read_bytes()], span_size=4096,
                      build_tool_identifier="soci-oracle")
    object.__setattr__(copy, "span_digests", (z.span_digests[0], "sha256:" + "ab" * 32))
    forged.write_bytes(serialize_ztoc(copy))
    result = run_cli("ztoc", "verify", str(forged), str(d / "text-l6.tar.gz"))
    assert result.exit_code == 6 and "span 1" in result.output
    assert "Traceback" not in result.output
    # a TOC entry that the layer does not have
    import dataclasses
    copy = build_ztoc([(d / "text-l6.tar.gz").read_bytes()], span_size=4096,
                      build_tool_identifier="soci-oracle")
    entry = dataclasses.replace(copy.files[0], mode=0o777)
    object.__setattr__(copy, "files", (entry,) + copy.files[1:])
    forged.write_bytes(serialize_ztoc(copy))
    result = run_cli("ztoc", "verify", str(forged), str(d / "text-l6.tar.gz"))
    assert result.exit_code == 6 and "TOC entry 0" in result.output and "mode" in result.output
    # the zTOC of another layer
    result = run_cli("ztoc", "verify", str(d / "meta.ztoc"), str(d / "text-l6.tar.gz"))
    assert result.exit_code == 6 and "bytes but the zTOC is for" in result.output


def test_cli_bad_input_gives_one_clear_line(shared_dir: Path, tmp_path: Path) -> None:
    d = shared_dir / FIXTURES
    garbage = tmp_path / "garbage.ztoc"
    garbage.write_bytes(b"this is not a ztoc" * 10)
    (tmp_path / "l.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(16))
    cases = [
        (("ztoc", "info", str(tmp_path / "missing.ztoc")), 2, "cannot read zTOC"),
        (("ztoc", "info", str(garbage)), 6, "is not a valid zTOC"),
        (("ztoc", "verify", str(garbage), str(d / "meta.tar.gz")), 6, "is not a valid zTOC"),
        (("ztoc", "verify", str(d / "meta.ztoc"), str(tmp_path / "nope.tar.gz")), 2,
         "cannot read layer"),
        (("ztoc", "build", str(tmp_path / "nope.tar.gz"), "-o", str(tmp_path / "o")), 2,
         "cannot read layer"),
        (("ztoc", "build", str(tmp_path / "l.zst"), "-o", str(tmp_path / "o")), 2, "zstd"),
        (("ztoc", "build", str(d / "meta.tar.gz"), "-o", str(tmp_path / "no" / "dir" / "o")), 2,
         "cannot write"),
    ]
    for args, code, message in cases:
        result = run_cli(*args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output
        assert result.output.startswith("prewarm: error:")


def test_cli_builds_and_verifies_an_uncompressed_gnu_tar(tmp_path: Path) -> None:
    # Given a layer written by GNU tar (10 KiB records: zero padding after the end marker)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(bytes([i]) * (i * 997))
    subprocess.run(["tar", "-cf", str(tmp_path / "layer.tar"), "-C", str(src), "."], check=True)
    out = tmp_path / "layer.ztoc"
    # When it is indexed and verified
    result = run_cli("ztoc", "build", str(tmp_path / "layer.tar"), "--span-size", "8192",
                     "-o", str(out))
    assert result.exit_code == 0, result.output
    result = run_cli("ztoc", "verify", str(out), str(tmp_path / "layer.tar"))
    # Then the TarZinfo zTOC checks out, its archive size stopping at the end marker
    assert result.exit_code == 0, result.output
    z = parse_ztoc(out.read_bytes())
    assert z.compression == "uncompressed" and len(z.files) == 21
    assert z.uncompressed_archive_size < z.compressed_archive_size == (tmp_path / "layer.tar").stat().st_size


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), level=st.integers(0, 9), span_size=st.integers(1_000, 200_000),
       members=st.integers(1, 3))
def test_zlib_ng_and_libz_place_the_same_checkpoints(seed: int, level: int, span_size: int,
                                                     members: int) -> None:
    # Given a random tar, gzipped at any level, maybe as several concatenated members
    tar = make_tar(seed, files=12)
    cut = [len(tar) * k // members for k in range(members + 1)]
    comp = b"".join(gzip.compress(tar[a:b], compresslevel=level, mtime=0) for a, b in itertools.pairwise(cut))
    # When the zTOC is built with each inflater
    built = {}
    for name in ("zlib-ng", "zlib"):
        os.environ["PREWARM_ZRAN"] = name
        zran.backend.cache_clear()
        try:
            built[name] = serialize_ztoc(build_ztoc([comp], span_size=span_size, build_tool_identifier="t"))
        finally:
            del os.environ["PREWARM_ZRAN"]
            zran.backend.cache_clear()
    # Then the bytes are the same: block boundaries belong to the stream, not the decoder
    assert built["zlib-ng"] == built["zlib"]
