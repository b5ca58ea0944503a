"""Tar headers to TOC entries, with Go ``archive/tar`` semantics (what soci's TOC holds).

soci builds the TOC of a zTOC by running Go's ``tar.Reader`` over the uncompressed
layer and recording, for every entry ``Next()`` returns, the header fields and the
stream position right after the header chain (where the data starts).  To produce the
same TOC we follow the same rules:

* ustar, GNU, STAR and v7 headers; the checksum may be the signed or unsigned sum;
  numbers are octal or base-256; the ustar prefix is joined with ``/``.
* PAX ``x`` records apply to the next entry (``path``, ``linkpath``, ``size``,
  ``uid``, ``gid``, ``uname``, ``gname``, ``mtime`` with sub-seconds) and ALL of them
  are kept, sorted by key, as the entry's records (``SCHILY.xattr.*`` included); a
  later ``x`` header replaces an earlier one.  A record with an empty value keeps the
  ustar field.  PAX ``g`` (global) headers are skipped: Go returns them as pseudo
  entries which soci cannot index, and they do not apply to later entries.
* GNU ``L``/``K`` long names and link names; legacy ``\\0`` type becomes ``reg`` (or
  ``dir`` when the name ends in ``/``).
* Header-only types (dir, symlink, hardlink, char, block, fifo) have no data in the
  stream even when their size field is not 0; the recorded size is still the field.
* Two zero blocks end the archive; so does a clean EOF at a header boundary, after one
  zero block, or inside the padding after an entry's data (all accepted by Go).

Data bytes are never looked at: their regions are skipped by arithmetic, so indexing
costs a few microseconds per entry, whatever the size of the files.
"""

from __future__ import annotations

from zlib import adler32

from prewarm.errors import BadTarHeader
from prewarm.index.ztoc import FileEntry

BLOCK = 512
#: Go refuses PAX and GNU long-name payloads above this (``maxSpecialFileSize``).
MAX_SPECIAL_FILE_SIZE = 1 << 20

_ZERO_BLOCK = bytes(BLOCK)

_TYPE_NAMES = {
    ord("0"): "reg",
    ord("1"): "hardlink",
    ord("2"): "symlink",
    ord("3"): "char",
    ord("4"): "block",
    ord("5"): "dir",
    ord("6"): "fifo",
}
_HEADER_ONLY = frozenset(b"123456")
_TYPE_REGA = 0
_TYPE_X = ord("x")
_TYPE_G = ord("g")
_TYPE_LONG_NAME = ord("L")
_TYPE_LONG_LINK = ord("K")
_TYPE_GNU_SPARSE = ord("S")

_FORMAT_V7 = 1
_FORMAT_USTAR = 2  # USTAR or PAX
_FORMAT_GNU = 3
_FORMAT_STAR = 4

_MAX_INT64 = (1 << 63) - 1

try:
    from prewarm.index._tarindex import parse_plain as _parse_plain  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - built by setup.py; the Python parser takes every header then
    _parse_plain = None


class _NeedMore(Exception):
    """The header chain continues past the bytes at hand; ``end`` is the buffer end needed."""

    def __init__(self, end: int, clean_from: int | None = None) -> None:
        super().__init__(end)
        self.end = end
        # EOF anywhere in [clean_from, end - BLOCK] is a clean end for Go (no header byte read)
        self.clean_from = clean_from


def _cstr(raw: bytes) -> bytes:
    i = raw.find(0)
    return raw if i < 0 else raw[:i]


def _text(raw: bytes) -> str:
    # Go strings are bytes; surrogateescape keeps non-UTF-8 names round-trippable.
    return raw.decode("utf-8", "surrogateescape")


_NUM_CACHE: dict[bytes, int] = {}
_NUM_CACHE_MAX = 8192


def _parse_octal(field: bytes, what: str) -> int:
    field = field.strip(b" \x00")
    if not field:
        return 0
    if field.isdigit():  # ASCII digits only: no sign, space or underscore for int()
        try:
            value = int(field, 8)
        except ValueError:
            raise BadTarHeader(f"tar header field {what} is not an octal number: {field!r}") from None
        if value <= _MAX_INT64:
            return value
    digits = _cstr(field)
    if not digits.isdigit():
        raise BadTarHeader(f"tar header field {what} is not an octal number: {field!r}")
    try:
        parsed = int(digits, 8)
    except ValueError:
        raise BadTarHeader(f"tar header field {what} is not an octal number: {field!r}") from None
    if parsed >= 1 << 64:
        raise BadTarHeader(f"tar header field {what} overflows 64 bits: {field!r}")
    # Go converts the uint64 to int64.
    return parsed - (1 << 64) if parsed > _MAX_INT64 else parsed


def _parse_numeric(field: bytes, what: str) -> int:
    """A numeric header field as Go's ``parseNumeric``: base-256 or octal (memoised)."""
    value = _NUM_CACHE.get(field)
    if value is None:
        value = _parse_numeric_uncached(field, what)
        if len(_NUM_CACHE) < _NUM_CACHE_MAX:
            _NUM_CACHE[field] = value
    return value


def _parse_numeric_uncached(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:
        inv = 0xFF if field[0] & 0x40 else 0
        x = 0
        for i, c in enumerate(field):
            c ^= inv
            if i == 0:
                c &= 0x7F
            if x >> 56:
                raise BadTarHeader(f"tar header field {what} overflows 64 bits (base-256)")
            x = (x << 8) | c
        if x >> 63:
            raise BadTarHeader(f"tar header field {what} overflows 64 bits (base-256)")
        return ~x if inv else x
    return _parse_octal(field, what)


def _checksum_ok(blk: bytes) -> bool:
    field = blk[148:156]
    try:
        value = _parse_octal(field, "chksum")
    except BadTarHeader:
        return False
    if blk.isascii():
        # every byte < 128, so the sum is < 65521 and adler32's low half is 1 + sum, exactly
        return value == (adler32(blk) & 0xFFFF) - 1 - sum(field) + 8 * 32
    unsigned = sum(blk) - sum(field) + 8 * 32
    if value == unsigned:
        return True
    high = sum(1 for b in blk if b >= 0x80) - sum(1 for b in blk[148:156] if b >= 0x80)
    return value == unsigned - 256 * high


def _header_format(blk: bytes) -> int:
    if not _checksum_ok(blk):
        return 0
    magic = blk[257:263]
    if magic == b"ustar\x00":
        return _FORMAT_STAR if blk[508:512] == b"tar\x00" else _FORMAT_USTAR
    if magic == b"ustar " and blk[263:265] == b" \x00":
        return _FORMAT_GNU
    return _FORMAT_V7


def _parse_pax(payload: bytes) -> dict[str, str]:
    """PAX records as Go's ``parsePAX`` reads them (sparse 0.0 offsets folded into a map)."""
    records: dict[str, str] = {}
    sparse: list[str] = []
    i, end = 0, len(payload)
    while i < end:
        sp = payload.find(b" ", i)
        if sp < 0:
            raise BadTarHeader("PAX record without a length field")
        digits = payload[i:sp]
        # Go's ParseInt also takes a sign; no record is that short
        if not digits.isdigit() and not (digits[:1] in (b"+", b"-") and digits[1:].isdigit()):
            raise BadTarHeader(f"PAX record length {digits[:20]!r} is not a number")
        n = int(digits)
        rec_end = i + n
        if n < 5 or rec_end > end or n - (sp - i + 1) <= 0:
            raise BadTarHeader(f"PAX record length {n} does not fit the extended header")
        if payload[rec_end - 1] != 0x0A:
            raise BadTarHeader("PAX record does not end in a newline")
        eq = payload.find(b"=", sp + 1, rec_end - 1)
        if eq < 0 or eq == sp + 1:
            raise BadTarHeader("PAX record without a key")
        kb, vb = payload[sp + 1:eq], payload[eq + 1:rec_end - 1]
        i = rec_end
        k = kb.decode("utf-8", "surrogateescape")
        v = vb.decode("utf-8", "surrogateescape")
        if k in ("path", "linkpath", "uname", "gname"):
            if 0 in vb:
                raise BadTarHeader(f"PAX record {k} contains a NUL byte")
        elif 0 in kb:
            raise BadTarHeader("PAX record key contains a NUL byte")
        if k in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
            want = "GNU.sparse.offset" if len(sparse) % 2 == 0 else "GNU.sparse.numbytes"
            if k != want or "," in v:
                raise BadTarHeader("PAX GNU sparse records out of order")
            sparse.append(v)
        else:
            records[k] = v
    if sparse:
        records["GNU.sparse.map"] = ",".join(sparse)
    return records


def _parse_pax_int(value: str, key: str) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise BadTarHeader(f"PAX record {key}={value!r} is not a decimal number") from None
    if value.strip() != value or "_" in value or not -(1 << 63) <= n <= _MAX_INT64:
        raise BadTarHeader(f"PAX record {key}={value!r} is not a 64-bit decimal number")
    return n


def _parse_pax_time(value: str) -> tuple[int, int]:
    """(seconds, nanoseconds) as Go's ``parsePAXTime``; nanoseconds carry the sign."""
    ss, _, sn = value.partition(".")
    secs = _parse_pax_int(ss, "mtime")
    if not sn:
        return secs, 0
    if sn.strip("0123456789"):
        raise BadTarHeader(f"PAX record mtime={value!r} has a bad fraction")
    nsecs = int((sn + "000000000")[:9])
    return secs, (-nsecs if ss.startswith("-") else nsecs)


def _days_to_civil(days: int) -> tuple[int, int, int]:
    # Howard Hinnant's civil_from_days: exact for any integer day count.
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y), m, d


def format_mod_time(secs: int, nsecs: int = 0) -> str:
    """The time as Go's ``Time.MarshalText`` writes it in UTC (RFC 3339, nanoseconds trimmed).

    Go fails to marshal years outside 0..9999 and soci then stores an empty string.
    """
    if nsecs < 0 or nsecs >= 1_000_000_000:
        secs, nsecs = divmod(secs * 1_000_000_000 + nsecs, 1_000_000_000)
    days, rem = divmod(secs, 86400)
    date = _DATES.get(days)
    if date is None:
        y, m, d = _days_to_civil(days)
        date = f"{y:04d}-{m:02d}-{d:02d}T" if 0 <= y <= 9999 else ""
        if len(_DATES) < 65536:
            _DATES[days] = date
    if not date:
        return ""
    hh, rem = divmod(rem, 3600)
    mm, ss = divmod(rem, 60)
    frac = f".{nsecs:09d}".rstrip("0") if nsecs else ""
    return f"{date}{hh:02d}:{mm:02d}:{ss:02d}{frac}Z"


_DATES: dict[int, str] = {}
_MOD_TIMES: dict[tuple[int, int], str] = {}


def _block_padding(n: int) -> int:
    return -n & (BLOCK - 1)


def _parse_chain(buf: bytes | bytearray | memoryview, pos: int, end: int, base: int = 0
                 ) -> tuple[FileEntry | None, int, int]:
    """Parse one header chain at ``buf[pos:end]``.

    Returns (entry, data_pos, data_len): ``entry`` has ``uncompressed_offset``
    ``base + data_pos``; ``data_len`` is what the stream holds after the header (0 for
    header-only types).  At a zero block, returns (None, position of that block, 0).

    Raises:
        _NeedMore: the chain continues past ``end``.
        BadTarHeader: the bytes are not a valid header chain.
    """
    pax: dict[str, str] | None = None
    long_name = b""
    long_link = b""
    clean_from = pos
    while True:
        if pos + BLOCK > end:
            raise _NeedMore(pos + BLOCK, clean_from)
        blk = bytes(buf[pos:pos + BLOCK])
        if blk == _ZERO_BLOCK:
            return None, pos, 0
        fmt = _header_format(blk)
        if not fmt:
            raise BadTarHeader(f"no valid tar header at offset {pos} (bad checksum or magic)")
        flag = blk[156]
        nums = _header_numbers(blk, fmt)
        size = nums[3]
        if size < 0:
            raise BadTarHeader(f"tar header at offset {pos} has a negative size")
        body = pos + BLOCK
        if flag in (_TYPE_X, _TYPE_G, _TYPE_LONG_NAME, _TYPE_LONG_LINK):
            if size > MAX_SPECIAL_FILE_SIZE:
                raise BadTarHeader(f"extended header at offset {pos} is {size} bytes "
                                   f"(more than {MAX_SPECIAL_FILE_SIZE})")
            if body + size > end:
                raise _NeedMore(body + size)
            payload = bytes(buf[body:body + size])
            clean_from = body + size
            pos = clean_from + _block_padding(size)
            if flag == _TYPE_X:
                pax = _parse_pax(payload)
            elif flag == _TYPE_G:
                _parse_pax(payload)  # validated as Go does, then dropped
                pax, long_name, long_link = None, b"", b""
            elif flag == _TYPE_LONG_NAME:
                long_name = _cstr(payload)
            else:
                long_link = _cstr(payload)
            continue
        return _make_entry(blk, fmt, flag, nums, pax, long_name, long_link, pos, base)


def _is_gnu_sparse(pax: dict[str, str]) -> bool:
    """Whether Go's ``readGNUSparsePAXHeaders`` treats the entry as a sparse file."""
    major, minor = pax.get("GNU.sparse.major", ""), pax.get("GNU.sparse.minor", "")
    if (major, minor) in (("0", "0"), ("0", "1"), ("1", "0")):
        return True
    if major or minor:
        return False
    return bool(pax.get("GNU.sparse.map"))


def _header_numbers(blk: bytes, fmt: int) -> tuple[int, int, int, int, int, int, int]:
    """(mode, uid, gid, size, mtime, devmajor, devminor): Go parses them for EVERY header."""
    get = _NUM_CACHE.get  # inlined _parse_numeric: this runs twice per entry
    f = blk[100:108]
    if (mode := get(f)) is None:
        mode = _parse_numeric(f, "mode")
    f = blk[108:116]
    if (uid := get(f)) is None:
        uid = _parse_numeric(f, "uid")
    f = blk[116:124]
    if (gid := get(f)) is None:
        gid = _parse_numeric(f, "gid")
    f = blk[124:136]
    if (size := get(f)) is None:
        size = _parse_numeric(f, "size")
    f = blk[136:148]
    if (mtime := get(f)) is None:
        mtime = _parse_numeric(f, "mtime")
    devmajor: int | None = 0
    devminor: int | None = 0
    if fmt != _FORMAT_V7:
        f = blk[329:337]
        if (devmajor := get(f)) is None:
            devmajor = _parse_numeric(f, "devmajor")
        f = blk[337:345]
        if (devminor := get(f)) is None:
            devminor = _parse_numeric(f, "devminor")
        if fmt == _FORMAT_STAR:
            _parse_numeric(blk[476:488], "atime")
            _parse_numeric(blk[488:500], "ctime")
    assert devmajor is not None and devminor is not None
    return mode, uid, gid, size, mtime, devmajor, devminor


def _make_entry(blk: bytes, fmt: int, flag: int, nums: tuple[int, int, int, int, int, int, int],
                pax: dict[str, str] | None, long_name: bytes, long_link: bytes, pos: int,
                base: int) -> tuple[FileEntry, int, int]:
    name = _cstr(blk[0:100])
    linkname = _cstr(blk[157:257])
    mode, uid, gid, size, mtime, devmajor, devminor = nums
    uname = gname = b""
    if fmt != _FORMAT_V7:
        uname = _cstr(blk[265:297])
        gname = _cstr(blk[297:329])
        prefix = b""
        if fmt == _FORMAT_USTAR:
            prefix = _cstr(blk[345:500])
        elif fmt == _FORMAT_STAR:
            prefix = _cstr(blk[345:476])
        else:  # GNU: atime/ctime; pre-Go1.8 writers put a prefix there
            try:
                if blk[345]:
                    _parse_numeric(blk[345:357], "atime")
                if blk[357]:
                    _parse_numeric(blk[357:369], "ctime")
            except BadTarHeader:
                p = _cstr(blk[345:500])
                if all(c < 0x80 for c in p):
                    prefix = p
        if prefix:
            name = prefix + b"/" + name
    name_s, link_s = _text(name), _text(linkname)
    uname_s, gname_s = _text(uname), _text(gname)
    nsecs = 0
    records: tuple[tuple[str, str], ...] = ()
    if pax is not None:
        sparse_keys = "GNU.sparse.major" in pax or "GNU.sparse.minor" in pax or "GNU.sparse.map" in pax
        if sparse_keys and _is_gnu_sparse(pax):
            raise BadTarHeader(f"tar entry {name_s!r} is a GNU sparse file (not supported)")
        for k, v in pax.items():
            if not v:
                continue
            if k == "path":
                name_s = v
            elif k == "linkpath":
                link_s = v
            elif k == "uname":
                uname_s = v
            elif k == "gname":
                gname_s = v
            elif k == "uid":
                uid = _parse_pax_int(v, k)
            elif k == "gid":
                gid = _parse_pax_int(v, k)
            elif k == "mtime":
                mtime, nsecs = _parse_pax_time(v)
            elif k in ("atime", "ctime"):
                _parse_pax_time(v)
            elif k == "size":
                size = _parse_pax_int(v, k)
        records = tuple(sorted(pax.items()))
    if long_name:
        name_s = _text(long_name)
    if long_link:
        link_s = _text(long_link)
    if flag == _TYPE_REGA:
        flag = ord("5") if name_s.endswith("/") else ord("0")
    type_name = _TYPE_NAMES.get(flag)
    if type_name is None:
        what = "a GNU sparse file" if flag == _TYPE_GNU_SPARSE else f"of type {chr(flag)!r}"
        raise BadTarHeader(f"tar entry {name_s!r} is {what}, which SOCI cannot index")
    if size < 0:
        raise BadTarHeader(f"tar entry {name_s!r} has a negative size")
    data_pos = pos + BLOCK
    mod_time = _MOD_TIMES.get((mtime, nsecs))
    if mod_time is None:
        mod_time = format_mod_time(mtime, nsecs)
        if len(_MOD_TIMES) < 65536:
            _MOD_TIMES[(mtime, nsecs)] = mod_time
    # positional: FileEntry(name, type, offset, size, linkname, mode, uid, gid, uname, gname,
    # mod_time, devmajor, devminor, xattrs) -- this runs once per file of a layer
    entry = FileEntry(name_s, type_name, base + data_pos, size, link_s, mode, uid & 0xFFFFFFFF,
                      gid & 0xFFFFFFFF, uname_s, gname_s, mod_time, devmajor, devminor, records)
    return entry, data_pos, (0 if flag in _HEADER_ONLY else size)


def is_end_of_archive(buf: bytes | bytearray | memoryview, pos: int) -> bool:
    """True if ``buf[pos:]`` is the end of a tar archive: two zero blocks, or one then EOF."""
    if buf[pos:pos + BLOCK] != _ZERO_BLOCK:
        return False
    rest = buf[pos + BLOCK:pos + 2 * BLOCK]
    return len(rest) == 0 or rest == _ZERO_BLOCK


def parse_header_run(buf: bytes | bytearray | memoryview, pos: int,
                     stream_offset_of_buf: int) -> tuple[FileEntry, int]:
    """Parse the header chain at ``buf[pos:]`` (extended headers plus the main header).

    Used to check an untrusted TOC entry against the real headers of a layer.

    Args:
        buf: bytes of the uncompressed tar stream.
        pos: index in ``buf`` where the chain starts.
        stream_offset_of_buf: stream offset of ``buf[0]``.

    Returns:
        The entry (offsets absolute in the stream) and the absolute stream offset of
        the next header (data offset plus the data, rounded up to 512).

    Raises:
        BadTarHeader: no valid header chain there, the archive ends there, or the chain
            runs past the end of ``buf``.
    """
    try:
        entry, data_pos, data_len = _parse_chain(buf, pos, len(buf), stream_offset_of_buf)
    except _NeedMore as more:
        raise BadTarHeader(f"tar header chain at stream offset {stream_offset_of_buf + pos} runs "
                           f"past the {len(buf)} bytes given (needs {more.end - pos})") from None
    if entry is None:
        raise BadTarHeader(f"stream offset {stream_offset_of_buf + data_pos} is the end of the "
                           f"archive (zero block), not a tar header")
    nxt = stream_offset_of_buf + data_pos + data_len + _block_padding(data_len)
    return entry, nxt


class TarIndexer:
    """Incremental TOC builder over an uncompressed tar stream fed in arbitrary chunks.

    Only header bytes are copied (into a small carry-over buffer when a header chain is
    split between chunks); data regions are skipped by counting.  ``offset`` is the
    number of stream bytes consumed.  After the end of the archive further bytes are
    counted but ignored, as Go stops reading there.
    """

    def __init__(self) -> None:
        self.offset = 0
        self._skip = 0           # data bytes still to skip
        self._pad = 0            # padding bytes after the data still to skip
        self._carry = bytearray()  # start of a header chain split between chunks
        self._need = 0           # carry length needed before parsing again
        self._clean_from: int | None = None  # carry length from which EOF is clean
        self._zero_blocks = 0    # consecutive zero blocks seen at a header boundary
        self._ended = False
        self.ended_at: int | None = None  # stream offset right after the end marker

    @property
    def ended(self) -> bool:
        """True once two zero blocks were seen."""
        return self._ended

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[FileEntry]:
        """Consume the next bytes of the stream; return the entries completed by them.

        Raises:
            BadTarHeader: the stream is not a valid tar archive.
        """
        mv = memoryview(chunk)
        n = len(mv)
        out: list[FileEntry] = []
        pos = 0
        while pos < n:
            if self._ended:
                pos = n
                break
            if self._skip or self._pad:
                take = min(self._skip + self._pad, n - pos)
                d = min(take, self._skip)
                self._skip -= d
                self._pad -= take - d
                pos += take
                continue
            if self._carry:
                take = min(self._need - len(self._carry), n - pos)
                self._carry += mv[pos:pos + take]
                pos += take
                if len(self._carry) < self._need:
                    break
                base = self.offset + pos - len(self._carry)
                consumed = self._step(self._carry, 0, base, out, final=False)
                if consumed is None:
                    continue  # needs more; _need was raised
                # the carry held exactly what the chain needed: nothing extra consumed
                self._carry = bytearray()
                continue
            if _parse_plain is not None and not self._zero_blocks:
                # C takes the run of plain headers from here (and skips their data); Python
                # takes the header it stops at, if any, below
                got, pos, self._skip, self._pad = _parse_plain(mv, pos, self.offset, FileEntry)
                out += got
                if pos == n or self._skip or self._pad:
                    continue
            consumed = self._step(mv, pos, self.offset, out, final=False)
            if consumed is None:
                # chain split: copy its start (header bytes only) into the carry
                self._carry = bytearray(mv[pos:n])
                pos = n
                break
            pos = consumed
        self.offset += n
        return out

    def _step(self, buf: bytes | bytearray | memoryview, pos: int, base: int,
              out: list[FileEntry], *, final: bool) -> int | None:
        """Parse at ``buf[pos:]``; return the new position or None when more bytes are needed."""
        end = len(buf)
        if self._zero_blocks:
            if pos + BLOCK > end:
                self._need = pos + BLOCK if buf is self._carry else BLOCK
                self._clean_from = None
                return None
            if buf[pos:pos + BLOCK] != _ZERO_BLOCK:
                raise BadTarHeader(f"zero block followed by a non-zero block at stream offset "
                                   f"{base + pos}: not a tar archive end")
            self._ended = True
            self.ended_at = base + pos + BLOCK
            return pos + BLOCK
        try:
            entry, data_pos, data_len = _parse_chain(buf, pos, end, base)
        except _NeedMore as more:
            self._need = more.end - pos if buf is not self._carry else more.end
            self._clean_from = None if more.clean_from is None else more.clean_from - pos
            return None
        if entry is None:
            self._zero_blocks = 1
            return data_pos + BLOCK
        out.append(entry)
        self._skip = data_len
        self._pad = _block_padding(data_len)
        return data_pos

    def finish(self) -> list[FileEntry]:
        """Declare the end of the stream; return nothing new or raise if it ended badly.

        Go accepts EOF at a header boundary, after one zero block, or inside the padding
        after an entry's data; EOF inside data or inside a header chain is an error.

        Raises:
            BadTarHeader: the stream ends inside an entry's data or header chain.
        """
        if self._ended:
            return []
        if self._skip:
            raise BadTarHeader(f"tar stream ends at offset {self.offset} inside an entry's data "
                               f"({self._skip} bytes missing)")
        if self._carry:
            # Go returns a clean io.EOF only when no byte of the next header block was read
            # (EOF inside the padding of an extended header is fine too).
            clean = (not self._zero_blocks and self._clean_from is not None
                     and self._clean_from <= len(self._carry) <= self._need - BLOCK)
            if not clean:
                raise BadTarHeader(f"tar stream ends at offset {self.offset} inside a header")
        return []
