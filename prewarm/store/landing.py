"""The C records of a layer's landing table, and the fast path (``prewarm.store._landing``) that reads them.

Why: landing a span of small files costs one header check and one file creation per
file; in Python that interpreter time was the largest share of a cold pre-warm's CPU
(py-spy: ``create_whole``, ``parse_header_run`` and ``entry_key`` together ~45% of the
worker samples).  The C functions do the common case with the GIL released; everything
else stays with the Python reference in :mod:`prewarm.store.spans` and :mod:`prewarm.store.layerfs`:

* :func:`check_headers` verifies only a header chain that is one plain ustar or GNU
  block whose every field equals the TOC entry's, optionally behind a PAX header whose
  one record is the entry's ``path`` (how Go's writer stores a long name); it returns
  the other entries, which the caller checks (and words the error for) exactly as before.
* :func:`write_pieces` creates files born with the span and pwrites pieces of the
  others; files with xattrs are handed back to the caller's writer.

The records are one fixed record per TOC entry plus a heap of names and paths, built
once per layer (:func:`build_table`) and saved in the layer's landing table
(:mod:`prewarm.store.table`) with the rest.

``PREWARM_LANDING=python`` selects the Python reference everywhere (for comparison and
where the extension could not be built); ``c``, the default, needs the extension.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
from collections.abc import Callable, Sequence
from types import ModuleType

from prewarm.errors import BadZtoc, ConfigError, StoreError
from prewarm.index.ztoc import FileEntry
from prewarm.store.directio import DirectWriter
from prewarm.store.layerfs import (
    Meta,
    Placement,
    missing_parent,
    not_regular,
    unopenable_data,
    unsafe_parent,
)

#: One entry's record; keep in step with ``record_t`` in ``_landing.c``.
RECORD = struct.Struct("<7q8I2B6x")

F_WRITE, F_BORN, F_CHECKABLE, F_CREATABLE, F_PAX_PATH, F_PLAIN = 1, 2, 4, 8, 16, 32

#: The tar type flag a record holds for each TOC entry type.
TYPE_FLAGS = {"reg": b"0", "hardlink": b"1", "symlink": b"2", "char": b"3", "block": b"4", "dir": b"5",
               "fifo": b"6"}
_INT64 = range(-(1 << 63), 1 << 63)
_UINT32 = range(1 << 32)
_E_PARENT_MISSING, _E_PARENT_UNSAFE, _E_OPEN_DATA, _E_NOT_REGULAR, _E_IO = 1, 2, 3, 4, 5


@functools.cache
def backend() -> ModuleType | None:
    """The C module, or None for the Python reference (``PREWARM_LANDING``).

    Raises:
        ConfigError: an unknown value, or ``c`` asked for while the extension is missing.
    """
    choice = os.environ.get("PREWARM_LANDING", "c").strip().lower() or "c"
    if choice == "python":
        return None
    if choice != "c":
        raise ConfigError(f"PREWARM_LANDING={choice!r} is not one of c, python")
    try:
        from prewarm.store import _landing  # type: ignore[attr-defined]
    except ImportError as err:
        raise ConfigError(f"the C landing extension prewarm.store._landing is not built ({err}); reinstall prewarm "
                          "(scripts/bootstrap builds it with gcc and python3-dev) or set "
                          "PREWARM_LANDING=python") from None
    if _landing.RECORD_SIZE != RECORD.size:
        raise ConfigError(f"prewarm.store._landing was built for {_landing.RECORD_SIZE}-byte records, this prewarm "
                          f"writes {RECORD.size}: rebuild it (pip install -e .)")
    return _landing


def build_table(files: Sequence[FileEntry], placements: Sequence[Placement], born: bytes, meta: Sequence[Meta],
                header_starts: Sequence[int]) -> tuple[bytes, bytes]:
    """The C records (records, heap) of a layer whose TOC was validated.

    Built in C (0.10 s instead of 0.26 s for 51,402 entries); whatever C does not take
    as plainly, the Python builder below does, byte for byte the same.  An entry that
    cannot be expressed in a record (numbers beyond 64 bits, an mtime beyond 2262) is
    simply not flagged checkable or creatable: the Python side takes it.

    Raises:
        BadZtoc: a path or name that cannot be encoded for the filesystem.
    """
    c = backend()
    built = c.build_table(files, placements, born, meta, header_starts) if c is not None else None
    if built is not None:
        return built  # type: ignore[no-any-return]
    return build_table_python(files, placements, born, meta, header_starts)


def build_table_python(files: Sequence[FileEntry], placements: Sequence[Placement], born: bytes, meta: Sequence[Meta],
                       header_starts: Sequence[int]) -> tuple[bytes, bytes]:
    """:func:`build_table` in Python: the reference, and what words its errors."""
    records = bytearray(RECORD.size * len(files))
    heap = bytearray()
    pack = RECORD.pack_into
    strings: dict[bytes, int] = {}

    def place(raw: bytes) -> int:
        at = strings.get(raw)
        if at is None:
            at = strings[raw] = len(heap)
            heap.extend(raw)
        return at

    for i, (e, p, m) in enumerate(zip(files, placements, meta)):
        uid, gid, mode, mtime_ns, xattrs = m
        try:
            name = e.name.encode("utf-8", "surrogateescape")
            link = e.linkname.encode("utf-8", "surrogateescape")
            path = os.fsencode(p.path)
        except UnicodeEncodeError as err:
            raise BadZtoc(f"tar entry {e.name!r} has a name that cannot be encoded: {err}") from None
        plain = (uid in _UINT32 and gid in _UINT32 and mode in _INT64 and mtime_ns in _INT64
                 and e.devmajor in _INT64 and e.devminor in _INT64 and e.uncompressed_size in _INT64)
        flags = F_PLAIN if plain else 0
        if p.kind == "reg" and p.final and e.uncompressed_size > 0:
            flags |= F_WRITE
        if born[i]:
            flags |= F_BORN
            if plain and not xattrs:
                flags |= F_CREATABLE
        if plain and e.type in TYPE_FLAGS:
            if not e.xattrs:
                flags |= F_CHECKABLE
            elif len(e.xattrs) == 1 and e.xattrs[0] == ("path", e.name):  # Go's long names
                flags |= F_CHECKABLE | F_PAX_PATH
        if not plain:
            uid = gid = mode = mtime_ns = 0
        try:
            pack(records, RECORD.size * i, e.uncompressed_offset, header_starts[i],
                 e.uncompressed_size if plain else 0, mode, e.devmajor if plain else 0,
                 e.devminor if plain else 0, mtime_ns, uid, gid, place(name), len(name), place(link), len(link),
                 place(path), len(path), TYPE_FLAGS.get(e.type, b"?")[0], flags)
        except struct.error as err:  # a number beyond what a record holds (the zTOC is not a tar's)
            raise BadZtoc(f"tar entry {e.name!r} has a field a landing table cannot hold: {err}") from None
    if len(heap) >= 1 << 32:
        raise BadZtoc(f"the TOC's names take {len(heap)} bytes, more than a landing table holds")
    return bytes(records), bytes(heap)


def unchecked_entries(records: bytes) -> list[int]:
    """Entries whose headers C never verifies (the caller keeps what it needs to check them)."""
    at = RECORD.size - 7  # the flags byte of record 0
    return [k for k in range(len(records) // RECORD.size) if not records[at + RECORD.size * k] & F_CHECKABLE]


def check_headers(c: ModuleType, records: bytes, heap: bytes, out: memoryview, ustart: int) -> list[int]:
    """Entries whose header chain ends in this span and that C could not verify (check them).

    Raises:
        StoreError: the records are not what :func:`build_table` makes (a corrupt landing table).
    """
    try:
        return c.check_headers(records, heap, out, ustart)  # type: ignore[no-any-return]
    except ValueError as err:
        raise corrupt_table(err) from None


def corrupt_table(err: ValueError) -> StoreError:
    return StoreError(f"{err}: the layer's landing table in its work/ directory is corrupt; remove the layer "
                      "(its partial tree is fetched again)")


#: What the caller does with a piece C left to it: (entry, file offset, stream offset, length).
Fallback = Callable[[int, int, int, int], None]


def write_pieces(c: ModuleType, records: bytes, heap: bytes, root_fd: int, out: memoryview, ustart: int,
                 direct: DirectWriter, placements: Sequence[Placement], fallback: Fallback) -> None:
    """Write the file data of the span [ustart, ustart + len(out)) into the layer at ``root_fd``.

    Raises:
        UnsafeArchive: the tree is not what the TOC says (as :class:`~prewarm.store.layerfs.LayerWriter`).
        StoreError: the records are not what :func:`build_table` makes (a corrupt landing table).
        OSError: as the system calls (ENOSPC, EIO, ...), naming the file.
    """
    try:
        skipped, error, direct.enabled, nbytes = c.write_pieces(records, heap, root_fd, out, ustart,
                                                                direct.enabled, direct.min_direct)
    except ValueError as bad:
        raise corrupt_table(bad) from None
    direct.direct_bytes += nbytes
    for piece in skipped:
        fallback(*piece)
    if error is None:
        return
    code, err, k = error
    path = placements[k].path
    parent = path.rpartition("/")[0]
    if code == _E_PARENT_MISSING:
        raise missing_parent(path, parent)
    if code == _E_PARENT_UNSAFE:
        raise unsafe_parent(path, parent)
    if code == _E_OPEN_DATA:
        raise unopenable_data(path, os.strerror(err))
    if code == _E_NOT_REGULAR:
        raise not_regular(path)
    raise OSError(err or errno.EIO, os.strerror(err or errno.EIO), path)
