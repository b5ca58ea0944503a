"""The zTOC: SOCI's per-layer index (gzip checkpoints plus the tar table of contents).

This module holds the data model (pure, no I/O).  Parsing, validation and
serialisation to soci's FlatBuffers layout are added here too; building lives in
``prewarm.ztoc_build`` and inflating a span in ``prewarm.inflate``.

CONTRACT (other modules rely on these names; extend, do not rename):

* ``FileEntry``: one tar entry from the TOC, fields as in soci's ``FileMetadata``.
* ``Checkpoint``: one zran access point.
* ``Span``: everything a worker needs to fetch, verify and inflate one span.
"""

from __future__ import annotations

import dataclasses

#: Bytes of deflate history stored with every checkpoint.
WINDOW_SIZE = 32768

#: Entry types as soci spells them in ``FileMetadata.type``.
ENTRY_TYPES = ("reg", "dir", "symlink", "hardlink", "char", "block", "fifo")


@dataclasses.dataclass(frozen=True, slots=True)
class FileEntry:
    """One tar entry of a layer, as recorded in the zTOC's TOC.

    ``uncompressed_offset`` is where the entry's DATA starts in the tar stream (its
    header(s) lie just before).  ``xattrs`` holds EVERY PAX record of the entry
    (``path``, ``linkpath``, ``SCHILY.xattr.*``, ...) as (key, value) pairs sorted by
    key, exactly as soci stores them; :attr:`real_xattrs` gives the file's xattrs.
    """

    name: str
    type: str
    uncompressed_offset: int
    uncompressed_size: int
    linkname: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mod_time: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, str], ...] = ()

    @property
    def real_xattrs(self) -> dict[str, str]:
        prefix = "SCHILY.xattr."
        return {k[len(prefix):]: v for k, v in self.xattrs if k.startswith(prefix)}


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """A zran access point: inflating may start here given ``window``.

    ``compressed_offset`` is the first whole byte after a deflate block boundary;
    when ``bits`` is not 0, that many high bits of the byte before it still belong
    to the stream.  ``window`` is the 32 KiB of output before ``uncompressed_offset``
    (zero-filled at the start of the stream).
    """

    compressed_offset: int
    uncompressed_offset: int
    bits: int
    window: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Span:
    """One unit of work: a compressed byte range and the uncompressed range it yields.

    ``compressed_start`` already includes the shared byte when ``bits`` is not 0
    (``checkpoint.compressed_offset - 1``); ``compressed_end`` is exclusive.
    ``digest`` is ``sha256:<hex>`` of exactly ``[compressed_start, compressed_end)``.
    """

    index: int
    compressed_start: int
    compressed_end: int
    uncompressed_start: int
    uncompressed_end: int
    digest: str
    checkpoint: Checkpoint | None  # None for uncompressed (TarZinfo) layers
