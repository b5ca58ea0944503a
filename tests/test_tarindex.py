"""TarIndexer and friends against Go's archive/tar, the reader soci's TOC comes from.

A small Go program (Go's standard library only) plays soci's ``metadataFromTarReader``:
for every entry ``tar.Reader.Next()`` returns it prints the header fields and the
stream position right after the header chain, and the position where reading stopped.
Our TOC must match it entry for entry, for random archives in every format, for
archives with corrupted header fields and for truncated ones.
"""

from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prewarm.errors import BadTarHeader
from prewarm.index import tarindex
from prewarm.index.tarindex import (
    BLOCK,
    TarIndexer,
    format_mod_time,
    is_end_of_archive,
    parse_header_run,
)
from prewarm.index.ztoc import FileEntry

GO_ORACLE = r"""package main

import (
	"archive/tar"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
)

type pos struct {
	r io.Reader
	n int64
}

func (p *pos) Read(b []byte) (int, error) { n, err := p.r.Read(b); p.n += int64(n); return n, err }

func main() {
	out := json.NewEncoder(os.Stdout)
	for _, path := range os.Args[1:] {
		f, err := os.Open(path)
		if err != nil {
			panic(err)
		}
		p := &pos{r: f}
		tr := tar.NewReader(p)
		var entries [][]interface{}
		result := map[string]interface{}{"path": path}
		for {
			hdr, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				result["error"] = err.Error()
				break
			}
			var typ string
			switch hdr.Typeflag {
			case tar.TypeLink:
				typ = "hardlink"
			case tar.TypeSymlink:
				typ = "symlink"
			case tar.TypeDir:
				typ = "dir"
			case tar.TypeReg:
				typ = "reg"
			case tar.TypeChar:
				typ = "char"
			case tar.TypeBlock:
				typ = "block"
			case tar.TypeFifo:
				typ = "fifo"
			case tar.TypeXGlobalHeader:
				continue
			default:
				result["error"] = fmt.Sprintf("unsupported %q", hdr.Typeflag)
			}
			if result["error"] != nil {
				break
			}
			mt, _ := hdr.ModTime.UTC().MarshalText()
			keys := make([]string, 0)
			for k := range hdr.PAXRecords {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			var recs [][]string
			for _, k := range keys {
				recs = append(recs, []string{k, hdr.PAXRecords[k]})
			}
			entries = append(entries, []interface{}{[]byte(hdr.Name), typ, p.n, hdr.Size, []byte(hdr.Linkname), hdr.Mode,
				uint32(hdr.Uid), uint32(hdr.Gid), []byte(hdr.Uname), []byte(hdr.Gname), string(mt), hdr.Devmajor, hdr.Devminor, recs})
		}
		result["entries"] = entries
		result["end"] = p.n
		out.Encode(result)
	}
}
"""


@pytest.fixture(scope="module")
def go_toc(tmp_path_factory: pytest.TempPathFactory):
    """A function: list of tar byte strings -> Go's view of each (entries, end, error)."""
    work = tmp_path_factory.mktemp("go-tar-oracle")
    (work / "main.go").write_text(GO_ORACLE)
    env = {"GO111MODULE": "off", "GOCACHE": str(work / "cache"), "HOME": str(work),
           "PATH": "/usr/bin:/bin:/usr/local/bin", "TZ": "UTC"}
    subprocess.run(["go", "build", "-o", str(work / "oracle"), str(work / "main.go")],
                   check=True, env=env, cwd=work, capture_output=True)

    def run(archives: list[bytes]) -> list[dict]:
        paths = []
        for i, data in enumerate(archives):
            p = work / f"a{i}.tar"
            p.write_bytes(data)
            paths.append(str(p))
        out = subprocess.run([str(work / "oracle"), *paths], check=True, env=env,
                             capture_output=True).stdout.decode()
        return [json.loads(line) for line in out.splitlines()]

    return run


def _go_entry(e: list) -> FileEntry:
    b = lambda s: base64.b64decode(s).decode("utf-8", "surrogateescape") if s else ""
    return FileEntry(
        name=b(e[0]), type=e[1], uncompressed_offset=e[2], uncompressed_size=e[3],
        linkname=b(e[4]), mode=e[5], uid=e[6], gid=e[7], uname=b(e[8]), gname=b(e[9]),
        mod_time=e[10], devmajor=e[11], devminor=e[12],
        xattrs=tuple((k, v) for k, v in (e[13] or [])),
    )


def index_all(data: bytes, chunk: int) -> tuple[list[FileEntry], int]:
    """Our TOC and where we stop (soci's uncompressed size), feeding ``chunk`` bytes at a time."""
    ix = TarIndexer()
    out: list[FileEntry] = []
    for i in range(0, len(data), chunk):
        out += ix.feed(data[i:i + chunk])
    out += ix.finish()
    return out, (ix.ended_at if ix.ended_at is not None else ix.offset)


def random_tar(rng: random.Random) -> bytes:
    fmt = rng.choice([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as tf:
        for i in range(rng.randrange(0, 9)):
            long = fmt != tarfile.USTAR_FORMAT and rng.random() < 0.3
            name = f"dir{i % 3}/" + ("n" * rng.choice([120, 300]) if long else f"f{i}")
            if rng.random() < 0.2:
                name = f"pre{'x' * 90}/{'y' * 60}/e{i}"  # ustar prefix split
            if fmt == tarfile.PAX_FORMAT and rng.random() < 0.2:
                name += "-ünï"
            ti = tarfile.TarInfo(name)
            kind = rng.choice("rrrdslcbf")
            data = b""
            ti.type = {"r": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "s": tarfile.SYMTYPE,
                       "l": tarfile.LNKTYPE, "c": tarfile.CHRTYPE, "b": tarfile.BLKTYPE,
                       "f": tarfile.FIFOTYPE}[kind]
            if kind == "r":
                data = rng.randbytes(rng.choice([0, 1, 511, 512, 513, 3000]))
                ti.size = len(data)
            if kind in "sl":
                ti.linkname = "t" * (rng.choice([10, 150]) if fmt != tarfile.USTAR_FORMAT else 10)
            if kind in "cb":
                ti.devmajor, ti.devminor = rng.randrange(300), rng.randrange(300)
            ti.mode = rng.choice([0o644, 0o755, 0o4755, 0o1777])
            ti.uid = rng.choice([0, 1000, 65534] + ([3_000_000] if fmt != tarfile.USTAR_FORMAT else []))
            ti.gid = rng.choice([0, 100])
            ti.uname, ti.gname = rng.choice([("", ""), ("alice", "staff")])
            ti.mtime = rng.choice([0, 1_700_000_000, 1_234_567_890])
            if fmt == tarfile.PAX_FORMAT:
                if rng.random() < 0.5:
                    ti.mtime += rng.choice([0.5, 0.123456789, 0.000001])
                if rng.random() < 0.4:
                    ti.pax_headers = {"SCHILY.xattr.user.k": "v" * rng.randrange(1, 40),
                                      "SCHILY.xattr.security.selinux": "unconfined_u"}
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def corrupt(rng: random.Random, data: bytes) -> bytes:
    """Change one header field of a random header (checksum fixed up) or cut the stream."""
    raw = bytearray(data)
    if rng.random() < 0.4:
        return bytes(raw[:rng.randrange(0, len(raw) + 1)])
    headers = [i for i in range(0, len(raw) - BLOCK + 1, BLOCK)
               if raw[i + 257:i + 262] == b"ustar"]
    if not headers:
        return bytes(raw)
    at = rng.choice(headers)
    blk = raw[at:at + BLOCK]
    field = rng.choice([(100, 108), (108, 116), (124, 136), (136, 148), (156, 157),
                        (329, 337), (345, 500), (0, 100)])
    pos = rng.randrange(*field)
    blk[pos] = rng.choice([0, 0x20, ord("0"), ord("7"), ord("9"), 0x80, 0xFF, ord("x"),
                           ord("g"), ord("S"), ord("L")])
    blk[148:156] = b" " * 8
    blk[148:156] = b"%06o\0 " % sum(blk)
    raw[at:at + BLOCK] = blk
    return bytes(raw)


def compare(go: dict, data: bytes) -> None:
    chunk = 1 + len(data) % 997
    if "error" in go:
        with pytest.raises(BadTarHeader):
            index_all(data, chunk)
        return
    ours, end = index_all(data, chunk)
    assert ours == [_go_entry(e) for e in go["entries"] or []]
    assert end == go["end"]


def test_random_archives_match_go(go_toc) -> None:
    # Given random archives in ustar, GNU and PAX form (long names, xattrs, devices, ...)
    rng = random.Random(20261128)
    archives = [random_tar(rng) for _ in range(60)]
    # When Go and we index them
    results = go_toc(archives)
    # Then the TOCs and end offsets are identical, whatever the chunk size
    assert sum(len(r["entries"] or []) for r in results) > 150
    assert sum("error" in r for r in results) < 10
    for go, data in zip(results, archives):
        compare(go, data)
        if "error" not in go:
            assert index_all(data, 1)[0] == index_all(data, 1 << 20)[0]


def test_corrupted_and_truncated_archives_match_go(go_toc) -> None:
    # Given archives with one header field changed (checksum fixed) or cut anywhere
    rng = random.Random(7)
    archives = [corrupt(rng, random_tar(rng)) for _ in range(150)]
    # When Go and we index them
    results = go_toc(archives)
    # Then we reject exactly what Go rejects, and agree on everything Go accepts
    assert any("error" in r for r in results) and any("error" not in r for r in results)
    for go, data in zip(results, archives):
        compare(go, data)


def _header(name: bytes, typeflag: bytes, size: int = 0, *, magic: bytes = b"ustar\x0000",
            extra: dict[int, bytes] | None = None) -> bytes:
    blk = bytearray(BLOCK)
    blk[0:len(name)] = name
    blk[100:108] = b"0000644\0"
    blk[108:116] = b"0000000\0"
    blk[116:124] = b"0000000\0"
    blk[124:136] = b"%011o\0" % size
    blk[136:148] = b"14524770400\0"
    blk[156:157] = typeflag
    blk[257:265] = magic
    for at, value in (extra or {}).items():
        blk[at:at + len(value)] = value
    blk[148:156] = b" " * 8
    blk[148:156] = b"%06o\0 " % sum(blk)
    return bytes(blk)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def test_handcrafted_headers_match_go(go_toc) -> None:
    # Given headers Python's tarfile does not write: base-256 numbers, v7 headers,
    # legacy '\0' types, a global PAX header, GNU long names, header-only types with a
    # size, a zero block followed by garbage, EOF inside padding
    big = bytes([0x80]) + (5_000_000_000).to_bytes(11, "big")
    neg = bytes([0xFF] * 4) + (-5 & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")
    pax = b"30 mtime=1700000000.987654321\n"
    glob = b"16 comment=hello\n"
    cases = [
        _header(b"base256", b"0", extra={108: big[4:], 136: neg}) + bytes(2 * BLOCK),
        _header(b"v7file", b"0", 5, magic=bytes(8)) + _pad(b"hello") + bytes(2 * BLOCK),
        _header(b"legacy-dir/", b"\0") + _header(b"legacy-file", b"\0", 3) + _pad(b"abc"),
        _header(b"pax_global", b"g", len(glob)) + _pad(glob) + _header(b"after", b"0")
        + bytes(BLOCK),
        _header(b"././@LongLink", b"L", 301, magic=b"ustar  \0")
        + _pad(b"L" * 300 + b"\0") + _header(b"short", b"0", magic=b"ustar  \0"),
        _header(b"x", b"x", len(pax)) + _pad(pax) + _header(b"dir-with-size", b"5", 700)
        + _header(b"next", b"0", 1) + _pad(b"z"),
        _header(b"f", b"0", 1) + _pad(b"z") + bytes(BLOCK) + _header(b"g", b"0"),
        _header(b"f", b"0", 1) + b"z" + bytes(100),
        _header(b"f", b"0", 1),
        _header(b"x", b"x", len(pax)) + _pad(pax),
        _header(b"sparse", b"S", 0, magic=b"ustar  \0"),
        _header(b"contiguous", b"7"),
        b"\x01" * BLOCK,
    ]
    # When Go and we index them
    results = go_toc(cases)
    # Then we agree on every one
    for go, data in zip(results, cases):
        compare(go, data)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(1, 5000), max_size=30))
def test_chunking_does_not_change_the_toc(seed: int, cuts: list[int]) -> None:
    # Given a random archive and an arbitrary split into chunks
    data = random_tar(random.Random(seed))

    def chunked() -> list[FileEntry]:
        ix = TarIndexer()
        got: list[FileEntry] = []
        pos = 0
        for c in cuts:
            got += ix.feed(memoryview(data)[pos:pos + c])
            pos += c
        got += ix.feed(data[pos:])
        assert ix.offset == len(data)
        return got + ix.finish()

    try:
        whole, _ = index_all(data, len(data) or 1)
    except BadTarHeader:  # e.g. tarfile's "mtime=1e-06", which Go refuses too
        with pytest.raises(BadTarHeader):
            chunked()
        return
    # Then the entries are the same as in one piece
    assert chunked() == whole


def test_parse_header_run_gives_entry_and_next_header() -> None:
    # Given a PAX entry (x header + header + data) followed by a second entry
    pax = b"18 path=long/name\n"
    data = (_header(b"x", b"x", len(pax)) + _pad(pax) + _header(b"short", b"0", 700)
            + _pad(b"d" * 700) + _header(b"second", b"0") + bytes(2 * BLOCK))
    base = 10_000
    # When the chain at 0 is parsed
    entry, nxt = parse_header_run(data, 0, base)
    # Then it is the PAX-named entry with absolute offsets, and the next header follows
    assert entry.name == "long/name" and entry.xattrs == (("path", "long/name"),)
    assert entry.uncompressed_offset == base + 3 * BLOCK and entry.uncompressed_size == 700
    assert nxt == base + 5 * BLOCK
    second, after = parse_header_run(data, nxt - base, base)
    assert second.name == "second" and after == base + 6 * BLOCK
    assert is_end_of_archive(data, after - base)
    assert not is_end_of_archive(data, 0)
    assert is_end_of_archive(bytes(BLOCK), 0)


def test_parse_header_run_rejects_bad_input() -> None:
    pax = b"18 path=long/name\n"
    chain = _header(b"x", b"x", len(pax)) + _pad(pax) + _header(b"short", b"0")
    # A chain cut short
    with pytest.raises(BadTarHeader, match="runs past"):
        parse_header_run(chain[:-1], 0, 0)
    # Not a header (bad checksum)
    with pytest.raises(BadTarHeader, match="no valid tar header"):
        parse_header_run(b"\x01" * BLOCK, 0, 0)
    # The end of the archive
    with pytest.raises(BadTarHeader, match="end of the archive"):
        parse_header_run(bytes(2 * BLOCK), 0, 0)


def test_truncated_stream_is_reported_with_offset() -> None:
    ix = TarIndexer()
    ix.feed(_header(b"f", b"0", 1000) + b"x" * 10)
    with pytest.raises(BadTarHeader, match="inside an entry's data"):
        ix.finish()


@pytest.mark.parametrize(("secs", "nsecs", "text"), [
    (0, 0, "1970-01-01T00:00:00Z"),
    (1_700_000_000, 987_654_321, "2023-11-14T22:13:20.987654321Z"),
    (1_700_000_000, 500_000_000, "2023-11-14T22:13:20.5Z"),
    (-1, -500_000_000, "1969-12-31T23:59:58.5Z"),
    (253_402_300_800, 0, ""),  # year 10000: Go cannot marshal it, soci stores ""
    (-62_135_596_800, 0, "0001-01-01T00:00:00Z"),
])
def test_mod_time_is_formatted_like_go(secs: int, nsecs: int, text: str) -> None:
    assert format_mod_time(secs, nsecs) == text


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=4096), pos=st.integers(0, 4096))
def test_arbitrary_bytes_raise_only_bad_tar_header(raw: bytes, pos: int) -> None:
    # Given bytes that are mostly not a tar stream (sometimes a valid header in front)
    data = (_header(b"f", b"0", len(raw) // 2) + raw) if pos % 2 else raw
    try:
        index_all(data, 1 + pos)
    except BadTarHeader:
        pass
    try:
        parse_header_run(data, pos % (len(data) + 1), 0)
    except BadTarHeader:
        pass


def _index_or_error(data: bytes, chunk: int) -> tuple[list[FileEntry], int] | str:
    try:
        return index_all(data, chunk)
    except BadTarHeader as err:
        return f"BadTarHeader: {err}"


def _with_c_and_without(data: bytes, chunk: int) -> tuple[tuple[list[FileEntry], int] | str, ...]:
    """What indexing ``data`` gives with the C parser of plain headers, then with Python alone."""
    with_c = _index_or_error(data, chunk)
    saved = tarindex._parse_plain
    tarindex._parse_plain = None
    try:
        return with_c, _index_or_error(data, chunk)
    finally:
        tarindex._parse_plain = saved


def _mutate_for_c(rng: random.Random, data: bytes) -> bytes:
    """One change that moves a header across the C parser's edges: a PAX path record bent
    out of shape, a GNU atime, a STAR trailer, a signed checksum, an odd number field."""
    raw = bytearray(data)
    headers = [i for i in range(0, len(raw) - BLOCK + 1, BLOCK) if raw[i + 257:i + 262] == b"ustar"]
    if not headers:
        return bytes(raw)
    at = rng.choice(headers)
    blk = raw[at:at + BLOCK]
    if blk[156] == ord("x") and rng.random() < 0.6:
        size = int(bytes(blk[124:136]).strip(b"\0 ") or b"0", 8)
        pos = at + BLOCK + rng.randrange(max(size, 1))
        raw[pos] = rng.choice([0, ord(" "), ord("="), ord("\n"), ord("/"), ord("0"), ord("9"), ord("+"),
                               ord("p"), ord("s"), 0xC3, 0xFF])
        return bytes(raw)
    pos, value = rng.choice([(345, 1), (357, ord("1")), (508, ord("t")), (100, 0x80), (124, 0x80), (136, ord(" ")),
                             (329, ord("8")), (337, 0), (263, ord("0")), (0, 0xFF), (345, ord("p")), (156, 0)])
    blk[pos] = value
    if pos == 508:
        blk[508:512] = b"tar\0"
    blk[148:156] = b" " * 8
    total = sum(blk)
    if rng.random() < 0.3 and any(b >= 0x80 for b in blk):  # the signed sum Go also takes
        total -= 256 * sum(1 for b in blk if b >= 0x80)
    blk[148:156] = b"%06o\0 " % total
    raw[at:at + BLOCK] = blk
    return bytes(raw)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), mutations=st.integers(0, 3), chunk=st.sampled_from([1, 100, 512, 1000, 1 << 20]))
def test_c_header_parse_equals_the_python_parse(seed: int, mutations: int, chunk: int) -> None:
    # Given a random archive (ustar, GNU, PAX) with some headers bent at the C parser's edges
    rng = random.Random(seed)
    data = random_tar(rng)
    for _ in range(mutations):
        data = _mutate_for_c(rng, data)
    # When it is indexed with the C parser of plain headers and with Python alone
    with_c, python = _with_c_and_without(data, chunk)
    # Then both give the same entries and end, or the same error
    assert with_c == python


def test_c_takes_plain_headers_and_long_names_and_leaves_the_rest() -> None:
    # Given plain headers, a Go-style long name (an x header with one path record), a
    # ustar prefix, a PAX header with another record, and a GNU long name
    path = b"p" * 150 + b"/long"
    rec = b"165 path=%s\n" % path
    assert len(rec) == 165
    mtime = b"30 mtime=1700000000.987654321\n"
    data = (_header(b"plain", b"0", 3) + _pad(b"abc") + _header(b"x", b"x", len(rec)) + _pad(rec)
            + _header(b"short", b"0", 1) + _pad(b"z")
            + _header(b"name", b"5", extra={345: b"prefix"})
            + _header(b"x", b"x", len(mtime)) + _pad(mtime) + _header(b"timed", b"0")
            + _header(b"././@LongLink", b"L", 301, magic=b"ustar  \0") + _pad(b"L" * 300 + b"\0")
            + _header(b"gnu", b"0", magic=b"ustar  \0") + bytes(2 * BLOCK))
    # When the C parser runs from the start
    got, pos, skip, pad = tarindex._parse_plain(data, 0, 0, FileEntry)
    # Then it took the first three entries, as Python does, and stopped at the PAX mtime header
    python = index_all(data, len(data))[0]
    assert got == python[:3] and python[1].name == path.decode() and python[2].name == "prefix/name"
    assert python[1].xattrs == (("path", path.decode()),)
    assert tarindex._parse_plain(data, 0, 1000, FileEntry)[0][0].uncompressed_offset == 1000 + BLOCK
    assert (pos, skip, pad) == (7 * BLOCK, 0, 0)  # plain 2 blocks, long name 4, prefixed 1
    assert data[pos + 156:pos + 157] == b"x"
    # And a run cut inside an entry's data says how much data and padding are left
    got, pos, skip, pad = tarindex._parse_plain(data[:BLOCK + 1], 0, 0, FileEntry)
    assert [e.name for e in got] == ["plain"] and (pos, skip, pad) == (BLOCK + 1, 2, 509)
    # And the archive's end (a zero block) is left to Python
    assert tarindex._parse_plain(bytes(2 * BLOCK), 0, 0, FileEntry) == ([], 0, 0, 0)


def _pax_chain(payload: bytes, name: bytes = b"short", **header: object) -> bytes:
    return _header(b"x", b"x", len(payload)) + _pad(payload) + _header(name, b"0", 1, **header) + _pad(b"z")  # type: ignore[arg-type]


def _signed_sum_header() -> bytes:
    blk = bytearray(_header(b"caf\xe9", b"0"))
    blk[148:156] = b" " * 8
    blk[148:156] = b"%06o\0 " % (sum(blk) - 256)
    return bytes(blk)


@pytest.mark.parametrize("chain", [
    pytest.param(_pax_chain(b"19 path=long/na\0me\n"), id="a NUL in the path"),
    pytest.param(_pax_chain(b"8 path=\n"), id="an empty path"),
    pytest.param(_pax_chain(b"8 path=\n", name=b"dir/"), id="an empty path, legacy dir"),
    pytest.param(_pax_chain(b"18 path=long/name\n" + b"17 comment=hello\n"), id="two records"),
    pytest.param(_pax_chain(b"19 paths=long/name\n"), id="key paths"),
    pytest.param(_pax_chain(b"1048577 path=" + b"p" * 1048563 + b"\n"), id="a record over 1 MiB"),
    pytest.param(_pax_chain(b"1048576 path=" + b"p" * 1048562 + b"\n"), id="a record of 1 MiB"),
    pytest.param(_pax_chain(b"19 path=long/name\n"), id="length too long"),
    pytest.param(_pax_chain(b"019 path=long/name\n"), id="length with a zero"),
    pytest.param(_pax_chain(b"+19 path=long/name\n"), id="length with a sign"),
    pytest.param(_pax_chain(b"18 path=long/name\n", extra={508: b"tar\0"}), id="STAR"),
    pytest.param(_pax_chain(b"18 path=long/name\n", magic=b"ustar  \0", extra={345: b"0000000001\0"}), id="GNU atime"),
    pytest.param(_pax_chain(b"18 path=long/name\n", magic=b"ustar  \0", extra={345: b"p" * 20}), id="GNU old prefix"),
    pytest.param(_pax_chain(b"18 path=long/nam\xff\n", extra={100: bytes([0x80]) + bytes(6) + b"\1"}), id="base-256 mode"),
    pytest.param(_header(b"star", b"0", extra={345: b"pre", 476: b"0000001\0", 508: b"tar\0"}) + bytes(2 * BLOCK),
                 id="STAR alone"),
    pytest.param(_header(b"star", b"0", extra={476: b"zz", 508: b"tar\0"}) + bytes(2 * BLOCK), id="STAR bad atime"),
    pytest.param(_header(b"sum", b"0")[:-1] + b"\1" + bytes(2 * BLOCK), id="wrong checksum"),
    pytest.param(_signed_sum_header() + bytes(2 * BLOCK), id="signed checksum"),
    pytest.param(_header(b"space", b"0", extra={124: b" 1 2       \0"}) + bytes(2 * BLOCK), id="spaces in size"),
    pytest.param(_header(b"y" * 100, b"0", extra={345: b"p" * 155}) + bytes(2 * BLOCK), id="longest ustar name"),
    pytest.param(_header(b"far", b"0", extra={136: b"77777777777\0"}) + bytes(2 * BLOCK), id="far mtime"),
    pytest.param(_header(b"last", b"0", extra={136: b"777777777777"}) + bytes(2 * BLOCK), id="the latest mtime"),
])
def test_c_and_python_agree_at_the_edges(chain: bytes) -> None:
    # Given a header chain at an edge of what the C parser takes
    for chunk in (1, 7, len(chain)):
        # When it is indexed with the C parser and with Python alone
        with_c, python = _with_c_and_without(chain, chunk)
        # Then they agree on the entries or on the error
        assert with_c == python


def test_c_builds_entries_through_the_class_when_its_init_does_more() -> None:
    import dataclasses

    # Given an entry class like FileEntry whose __init__ also runs a __post_init__
    seen: list[str] = []

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked(FileEntry):  # type: ignore[misc]
        def __post_init__(self) -> None:
            seen.append(self.name)

    data = _header(b"a", b"0") + _header(b"b", b"5") + bytes(2 * BLOCK)
    # When C parses plain headers into it, and then into FileEntry again
    got = tarindex._parse_plain(data, 0, 0, Checked)[0]
    plain = tarindex._parse_plain(data, 0, 0, FileEntry)[0]
    # Then the __post_init__ ran for each entry, and the fields are FileEntry's
    assert seen == ["a", "b"] and [type(e) for e in got] == [Checked, Checked]
    assert [(e.name, e.type) for e in got] == [(e.name, e.type) for e in plain] == [("a", "reg"), ("b", "dir")]
    assert [type(e) for e in plain] == [FileEntry, FileEntry]
