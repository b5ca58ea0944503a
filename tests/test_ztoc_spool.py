"""zTOCs built on disk (build_ztoc_file, TocSpool): serialize_ztoc's bytes, in memory that stays flat.

The in-memory path (:func:`build_ztoc` + :func:`serialize_ztoc`) is the reference: it
reproduces soci's golden vectors.  The spooled path must give the same bytes for any
TOC (names, xattrs, links, devices, long names, enough entries that vtables repeat and
the buffer passes 64 KiB, where Go's vtable comparison changes), with its batches,
spills and chunks forced small so that every boundary is crossed; and it must keep its
memory flat on a layer of 200,000 files, measured in a child process.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prewarm.errors import BadZtoc, ConfigError, CorruptContent, DigestMismatch
from prewarm.imagebuild import TarEntry, write_layer_tar
from prewarm.index import ztoc_spool
from prewarm.index.ztoc import ENTRY_TYPES, FileEntry, Ztoc, parse_ztoc, serialize_ztoc
from prewarm.index.ztoc_build import (
    build_tar_ztoc,
    build_ztoc,
    build_ztoc_file,
    build_ztoc_file_from_file,
    read_chunks,
)
from prewarm.index.ztoc_spool import TocSpool
from prewarm.resolve.digest import sha256_digest
from prewarm.store.layout import Layout
from prewarm.store.ztoc_cache import ZtocCache

FIXTURES = "fixtures/soci-ztoc"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_spool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 3 entries, 4 KiB spills and chunks, 5 table positions per read."""
    monkeypatch.setattr(ztoc_spool, "BATCH_ENTRIES", 3)
    monkeypatch.setattr(ztoc_spool, "SPILL_BYTES", 4096)
    monkeypatch.setattr(ztoc_spool, "OFFSETS_BATCH", 5)


def _layer(entries: list[TarEntry]) -> bytes:
    buf = io.BytesIO()
    write_layer_tar(entries, buf)
    return buf.getvalue()


def _gzip_layer(entries: list[TarEntry]) -> bytes:
    return gzip.compress(_layer(entries), compresslevel=6, mtime=0)


def _spooled(chunks: list[bytes], folder: Path, span_size: int, compression: str = "gzip") -> bytes:
    out = folder / "z.ztoc"
    made = build_ztoc_file(chunks, out, span_size=span_size, build_tool_identifier="t", compression=compression)
    data = out.read_bytes()
    assert made.digest == sha256_digest(data) and made.size == len(data)
    # and nothing but the zTOC is left in the folder
    assert sorted(p.name for p in folder.iterdir()) == ["z.ztoc"]
    out.unlink()
    return data


# === the same bytes as serialize_ztoc =================================================

_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
_raw_text = st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape"))
_name = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=150, max_size=400),  # PAX path
    _raw_text.filter(bool),
)
_entry = st.builds(
    FileEntry,
    name=_name,
    type=st.sampled_from(ENTRY_TYPES),
    uncompressed_offset=st.integers(0, (1 << 63) - 1),
    uncompressed_size=st.one_of(st.just(0), st.integers(0, (1 << 63) - 1)),
    linkname=st.one_of(st.just(""), _name),
    mode=st.one_of(st.just(0), st.just(0o644), st.integers(0, 0o7777)),
    uid=st.one_of(st.just(0), st.integers(-(1 << 31), (1 << 32) - 1)),
    gid=st.one_of(st.just(0), st.integers(0, (1 << 32) - 1)),
    uname=st.one_of(st.just(""), _text),
    gname=st.one_of(st.just(""), _raw_text),
    mod_time=st.one_of(st.just(""), st.just("2023-11-14T22:13:20Z")),
    devmajor=st.one_of(st.just(0), st.integers(0, 1 << 40)),
    devminor=st.one_of(st.just(0), st.integers(0, 1 << 40)),
    xattrs=st.lists(st.tuples(_text, _raw_text), max_size=3).map(lambda x: tuple(sorted(x))),
)


@pytest.fixture(scope="module")
def small_gzip_ztoc() -> Ztoc:
    """A real zTOC (checkpoints, digests) whose TOC the tests below replace."""
    comp = _gzip_layer([TarEntry(f"f{i}", data=bytes(range(256)) * 40 * (i + 1)) for i in range(8)])
    return build_ztoc([comp], span_size=16_384, build_tool_identifier="t")


def _write_spooled(z: Ztoc, folder: Path) -> bytes:
    with TocSpool(folder) as spool:
        spool.add_files(z.files[:len(z.files) // 2])
        spool.add_files(z.files[len(z.files) // 2:])
        spool.extend_checkpoints(bytes(z.checkpoints_blob))
        made = spool.write(folder / "z.ztoc", version=z.version, build_tool_identifier=z.build_tool_identifier,
                           compressed_archive_size=z.compressed_archive_size,
                           uncompressed_archive_size=z.uncompressed_archive_size, compression=z.compression,
                           span_digests=z.span_digests)
    assert made.num_files == len(z.files) and made.num_spans == z.num_spans
    data = (folder / "z.ztoc").read_bytes()
    (folder / "z.ztoc").unlink()
    return data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(entries=st.one_of(st.lists(_entry, max_size=12),
                         # enough entries that the buffer passes 64 KiB: Go's vtable match becomes exact
                         st.lists(_entry, min_size=1, max_size=3).map(lambda few: few * 150)))
def test_any_toc_is_written_as_serialize_ztoc_writes_it(entries: list[FileEntry], small_gzip_ztoc: Ztoc,
                                                        tmp_path_factory: pytest.TempPathFactory,
                                                        tiny_spool: None) -> None:
    # Given a zTOC with any TOC at all (values at their limits, surrogates, long names, xattrs)
    base = small_gzip_ztoc
    z = Ztoc(version=base.version, build_tool_identifier=base.build_tool_identifier,
             compressed_archive_size=base.compressed_archive_size,
             uncompressed_archive_size=base.uncompressed_archive_size, files=entries, compression="gzip",
             span_digests=base.span_digests, checkpoints_blob=base.checkpoints_blob)
    # When it is written through the spool, in batches of 3 and 4 KiB spills
    data = _write_spooled(z, tmp_path_factory.mktemp("spool"))
    # Then the bytes are serialize_ztoc's
    assert data == serialize_ztoc(z)


_member = st.one_of(
    st.builds(TarEntry, name=st.sampled_from(["a", "d/b.txt", "d/" + "n" * 120, "e/" + "é" * 70]),
              data=st.binary(max_size=3000), mode=st.sampled_from([0o644, 0o755, 0o4755]),
              uid=st.sampled_from([0, 1000, 70000]), uname=st.sampled_from(["", "root", "ünï"]),
              xattrs=st.dictionaries(st.sampled_from(["user.a", "user.long" * 10, "security.capability"]),
                                     st.sampled_from([b"", b"v", "välue".encode()]), max_size=2)),
    st.builds(TarEntry, name=st.just("d"), type=st.just("dir"), mode=st.just(0o755)),
    st.builds(TarEntry, name=st.just("s"), type=st.just("symlink"), linkname=st.sampled_from(["a", "x" * 200])),
    st.builds(TarEntry, name=st.just("h"), type=st.just("hardlink"), linkname=st.just("a")),
    st.builds(TarEntry, name=st.just("c"), type=st.just("chardev"), devmajor=st.integers(0, 255),
              devminor=st.integers(0, 255)),
    st.builds(TarEntry, name=st.just("p"), type=st.just("fifo")),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(members=st.lists(_member, min_size=1, max_size=40), repeat=st.sampled_from([1, 40]),
       span_size=st.sampled_from([4096, 65_536]), chunk=st.sampled_from([997, 1 << 20]))
def test_a_layer_builds_to_the_same_bytes_on_disk_and_in_memory(members: list[TarEntry], repeat: int,
                                                                span_size: int, chunk: int,
                                                                tmp_path_factory: pytest.TempPathFactory,
                                                                tiny_spool: None) -> None:
    # Given a gzip layer and the same tar uncompressed: names, xattrs, links, devices, repeats
    entries = [TarEntry(f"r{k}/{m.name}", m.type, m.data, m.mode, m.uid, m.gid, m.uname, m.gname,
                        m.linkname and f"r{k}/{m.linkname}", m.devmajor, m.devminor, m.xattrs)
               for k in range(repeat) for m in members]
    tar = _layer(entries)
    comp = gzip.compress(tar, compresslevel=6, mtime=0)
    folder = tmp_path_factory.mktemp("spool")
    for layer, build, compression in ((comp, build_ztoc, "gzip"), (tar, build_tar_ztoc, "uncompressed")):
        chunks = [layer[i:i + chunk] for i in range(0, len(layer), chunk)]
        # When it is built in memory and on disk
        want = serialize_ztoc(build(chunks, span_size=span_size, build_tool_identifier="t"))
        # Then the zTOC file is the in-memory zTOC byte for byte
        assert _spooled(chunks, folder, span_size, compression) == want


def _vectors(shared_dir: Path) -> list[dict]:
    return json.loads((shared_dir / FIXTURES / "manifest.json").read_text())


def test_every_golden_vector_is_built_on_disk_byte_for_byte(shared_dir: Path, tmp_path: Path,
                                                            tiny_spool: None) -> None:
    for v in _vectors(shared_dir):
        # Given the layer soci indexed and soci's zTOC of it
        want = (shared_dir / FIXTURES / f"{v['name']}.ztoc").read_bytes()
        # When it is built to a file (small batches and spills)
        made = build_ztoc_file_from_file(shared_dir / FIXTURES / v["input"], tmp_path / "z",
                                         span_size=v["span"], build_tool_identifier="soci-oracle")
        # Then the file is soci's zTOC
        assert (tmp_path / "z").read_bytes() == want, v["name"]
        assert made.digest == sha256_digest(want) and made.num_files == len(parse_ztoc(want).files)


# === whole or absent ===================================================================

def test_a_failed_build_leaves_the_old_output_and_no_temporary_file(tmp_path: Path) -> None:
    # Given an output that exists, and a gzip layer cut short
    comp = _gzip_layer([TarEntry(f"f{i}", data=os.urandom(5000)) for i in range(20)])
    out = tmp_path / "z.ztoc"
    out.write_bytes(b"old")
    # When its zTOC is built over the output
    with pytest.raises(CorruptContent, match="ends early"):
        build_ztoc_file([comp[:len(comp) // 2]], out, span_size=4096, build_tool_identifier="t")
    # Then the output is as it was and nothing else is in its folder
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["z.ztoc"]


def test_an_output_folder_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    comp = _gzip_layer([TarEntry("a", data=b"x")])
    with pytest.raises(ConfigError, match=r"cannot write zTOC .*missing/z\.ztoc"):
        build_ztoc_file([comp], tmp_path / "missing" / "z.ztoc", span_size=4096, build_tool_identifier="t")
    with pytest.raises(ConfigError, match="compression 'zstd'"):
        build_ztoc_file([comp], tmp_path / "z.ztoc", span_size=4096, build_tool_identifier="t", compression="zstd")
    assert list(tmp_path.iterdir()) == []


def test_a_layer_whose_stream_goes_on_past_its_tar_is_refused_as_in_memory(tmp_path: Path) -> None:
    # Given a gzip layer whose stream runs 3 MiB past its tar's end marker (checkpoints there
    # lie past the archive plus any tar padding: parse_ztoc would refuse the zTOC)
    tar = _layer([TarEntry("a", data=b"x" * 1000)])
    comp = gzip.compress(tar + os.urandom(3 << 20), compresslevel=1, mtime=0)
    # When its zTOC is built in memory and to a file, Then both refuse it the same way
    with pytest.raises(CorruptContent, match="built zTOC is inconsistent: .*past the uncompressed size"):
        build_ztoc([comp], span_size=65_536, build_tool_identifier="t")
    with pytest.raises(CorruptContent, match="built zTOC .*z.ztoc is inconsistent: .*past the uncompressed size"):
        build_ztoc_file([comp], tmp_path / "z.ztoc", span_size=65_536, build_tool_identifier="t")
    # And nothing is left
    assert list(tmp_path.iterdir()) == []


def test_a_ztoc_past_the_flatbuffer_limit_is_refused_and_nothing_is_left(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a FlatBuffers limit (2 GiB) scaled down to 64 KiB, and spills of 4 KiB
    monkeypatch.setattr(ztoc_spool, "MAX_FLATBUFFER_BYTES", 64 << 10)
    monkeypatch.setattr(ztoc_spool, "SPILL_BYTES", 4096)
    comp = _gzip_layer([TarEntry(f"file-{i:05d}", data=b"x") for i in range(2000)])
    # When a layer whose zTOC is larger is indexed
    with pytest.raises(BadZtoc, match="2 GiB limit: no zTOC can index it"):
        build_ztoc_file([comp], tmp_path / "z.ztoc", span_size=1 << 20, build_tool_identifier="t")
    # Then no output and no temporary file is left
    assert list(tmp_path.iterdir()) == []


def test_a_built_ztoc_file_is_cached_verified(tmp_path: Path) -> None:
    # Given a zTOC built to a file
    comp = _gzip_layer([TarEntry(f"f{i}", data=bytes(3000)) for i in range(10)])
    made = build_ztoc_file([comp], tmp_path / "z.ztoc", span_size=4096, build_tool_identifier="t")
    cache = ZtocCache(Layout(tmp_path / "root"))
    # When it is put in the node cache with a wrong digest, Then nothing is stored, no temp is left
    with pytest.raises(DigestMismatch, match="expected sha256:0000"):
        cache.put_file(made.path, "sha256:" + "0" * 64)
    assert not cache.has(made.digest)
    assert list(cache.path(made.digest).parent.iterdir()) == []
    # (nor when the file is missing, and no descriptor stays open)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        cache.put_file(tmp_path / "missing.ztoc")
    assert list(cache.path(made.digest).parent.iterdir()) == []
    assert len(os.listdir("/proc/self/fd")) == fds
    # When it is put with its own digest (or none), Then the cache holds its bytes and parses them
    assert cache.put_file(made.path, made.digest) == made.digest
    assert cache.put_file(made.path) == made.digest
    assert cache.path(made.digest).read_bytes() == made.path.read_bytes()
    assert cache.get(made.digest).num_spans == made.num_spans
    assert [p.name for p in cache.path(made.digest).parent.iterdir()] == [made.digest[7:]]


# === memory that does not grow with the file count =====================================

#: TOC entries of the layer the memory test builds (issue 20: at least 200,000).
MANY = 200_000
#: What the spooled build may add per entry, and regardless of entries (buffers, zlib,
#: the interpreter's arenas): the in-memory path takes about 1,500 B per entry.
BYTES_PER_ENTRY = 150
FIXED_ALLOWANCE = 32 << 20

_CHILD = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    from prewarm.index.ztoc import serialize_ztoc
    from prewarm.index.ztoc_build import build_ztoc_file_from_file, build_ztoc_from_file

    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    layer, out, mode, warm = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    # everything loaded and touched once (inflater library, buffers) before the baseline
    build_ztoc_file_from_file(warm, out, span_size=1 << 22, build_tool_identifier="t")
    serialize_ztoc(build_ztoc_from_file(warm, span_size=1 << 22, build_tool_identifier="t"))
    before = status()
    if mode == "file":
        made = build_ztoc_file_from_file(layer, out, span_size=1 << 22, build_tool_identifier="t")
        digest, files = made.digest, made.num_files
    else:
        z = build_ztoc_from_file(layer, span_size=1 << 22, build_tool_identifier="t")
        digest, files = "sha256:" + hashlib.sha256(serialize_ztoc(z)).hexdigest(), len(z.files)
    after = status()
    print(json.dumps({"before": before, "after": after, "digest": digest, "files": files}))
""")


def _measure(layer: Path, out: Path, mode: str, warm: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(layer), str(out), mode, str(warm)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_200k_file_layer_is_indexed_in_flat_memory(tmp_path: Path) -> None:
    # Given a gzip layer of 200,000 small files (issue 20's many-file workload)
    from isal import igzip

    from bench.manyfiles import entries

    layer = tmp_path / "many.tar.gz"
    with open(layer, "wb") as f, igzip.IGzipFile(fileobj=f, mode="wb", compresslevel=1, mtime=0) as gz:
        write_layer_tar(entries(MANY), gz)  # type: ignore[arg-type]  # a generator: streamed
    warm = tmp_path / "warm.tar.gz"
    warm.write_bytes(_gzip_layer([TarEntry(f"w{i}", data=bytes(i)) for i in range(50)]))
    # When its zTOC is built to a file in one child process, and in memory in another
    on_disk = _measure(layer, tmp_path / "z.ztoc", "file", warm)
    in_memory = _measure(layer, tmp_path / "unused", "memory", warm)
    # Then the zTOC file is the in-memory zTOC, byte for byte
    assert on_disk["files"] == in_memory["files"] > MANY
    assert on_disk["digest"] == in_memory["digest"] == sha256_digest((tmp_path / "z.ztoc").read_bytes())
    # And the build's peak memory grew by at most BYTES_PER_ENTRY per entry plus a fixed allowance
    bound = BYTES_PER_ENTRY * on_disk["files"] + FIXED_ALLOWANCE
    grew = on_disk["after"]["VmHWM"] - on_disk["before"]["VmRSS"]
    assert grew < bound, f"the spooled build grew by {grew} bytes (bound {bound})"
    assert on_disk["after"]["RssAnon"] - on_disk["before"]["RssAnon"] < bound
    # (the in-memory path does not stay under it: the bound measures what it claims)
    assert in_memory["after"]["VmHWM"] - in_memory["before"]["VmRSS"] > bound


def test_read_chunks_is_what_the_file_builds_from(tmp_path: Path) -> None:
    """build_ztoc_file_from_file and build_ztoc_file over read_chunks agree (uncompressed too)."""
    tar = _layer([TarEntry(f"t{i}", data=bytes(700)) for i in range(30)])
    (tmp_path / "l.tar").write_bytes(tar)
    a = build_ztoc_file_from_file(tmp_path / "l.tar", tmp_path / "a", span_size=4096, build_tool_identifier="t")
    b = build_ztoc_file(read_chunks(tmp_path / "l.tar"), tmp_path / "b", span_size=4096,
                        build_tool_identifier="t", compression="uncompressed")
    assert a.digest == b.digest == sha256_digest(serialize_ztoc(build_tar_ztoc([tar], span_size=4096,
                                                                               build_tool_identifier="t")))
