"""Tar entries -> a layer directory in overlay's diff format, without ever leaving it.

The layer directory is an overlay lowerdir, so tar's conventions become overlay's:

* ``dir/.wh.NAME`` (a whiteout) becomes a 0/0 character device ``dir/NAME``;
* ``dir/.wh..wh..opq`` (an opaque marker) becomes ``trusted.overlay.opaque=y`` on ``dir``;
* other ``.wh..wh.*`` entries (aufs bookkeeping) are dropped;
* hard links become real hard links, devices and fifos real nodes.

Entries come from an untrusted TOC or tar stream, so nothing here follows a symlink
inside the layer: parents are opened component by component from a directory fd with
``O_NOFOLLOW`` (or in one ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` call), and
every entry is created relative to its parent's fd.  :func:`check_entries` simulates
the whole archive first (``..``, absolute names, a path through a symlink or a file
created earlier, a hard link to a missing target or a directory) so a bad archive is
refused before anything is created; the fd discipline is the second line of defence.

Metadata (without the xattrs :func:`kept_xattrs` drops) is applied by :func:`apply_meta` alone:
owner before mode (chown clears setuid/setgid), then xattrs, then mtimes.  A file created whole with its data
(:meth:`LayerWriter.create_whole`) gets it there and then; everything else gets it last
(:meth:`LayerWriter.apply_metadata`), directories after everything else because creating
a child changes its parent's mtime.
"""

from __future__ import annotations

import calendar
import ctypes
import errno
import functools
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, Self, overload

from prewarm.errors import BadZtoc, CorruptContent, UnsafeArchive
from prewarm.index.ztoc import ENTRY_TYPES, FileEntry
from prewarm.store.directio import DirectWriter

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
#: Every tar entry has at least one 512-byte header: a bound on the entry count.
TAR_BLOCK = 512

_RFC3339 = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NODE_TYPES = {"char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}
#: Directory fds a LayerWriter keeps open (a tar visits a directory, its subdirectories, then it again).
_DIR_FDS = 16

_ENTRY_TYPES = frozenset(ENTRY_TYPES)


class Placement(NamedTuple):
    """What one TOC entry becomes in the layer dir, and where (a column of the landing table).

    ``kind`` is the entry type, or ``"whiteout"`` / ``"opaque"`` / ``"skip"``; ``path``
    the normalised relative path of the node created (for a whiteout: the hidden name;
    for an opaque marker: the directory; ``""`` is the layer root).  ``final`` is False
    when the node is not in the finished layer (a later entry replaced this path and no
    hard link kept it): its data and metadata are not applied.

    A node that a hard link keeps after a later entry replaced its path (``a``, then
    ``b`` linked to ``a``, then a new ``a``) is created at ``made_at`` (``a``), and
    gets its data and metadata at ``path``, the link that holds it in the end (``b``):
    containerd's unpack leaves ``b`` the first ``a``'s content and mode.
    """

    kind: str
    path: str
    final: bool = True
    made_at: str = ""

    @property
    def created_at(self) -> str:
        """Where the node is created (``made_at`` for a node a hard link keeps, else ``path``)."""
        return self.made_at or self.path


def split_name(name: str, what: str = "entry") -> list[str]:
    """Normalise a tar name into path components inside the layer.

    ``./`` prefixes, ``.`` components, duplicate and trailing slashes are dropped.

    Raises:
        UnsafeArchive: absolute names, ``..`` components, NUL bytes, over-long components.
    """
    if "\x00" in name:
        raise UnsafeArchive(f"tar {what} {name!r} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeArchive(f"tar {what} {name!r} is an absolute path: it would write outside the layer")
    parts = name.split("/")
    if "" in parts or "." in parts:
        parts = [p for p in parts if p and p != "."]
    if ".." in parts:
        raise UnsafeArchive(f"tar {what} {name!r} contains '..': it would write outside the layer")
    if len(name) > 63:  # a str of n characters encodes to at most 4n bytes: look only at long ones
        for p in parts:
            if len(p) > 63 and len(os.fsencode(p)) > 255:
                raise UnsafeArchive(f"tar {what} {name!r} has a path component longer than 255 bytes")
    return parts


@functools.lru_cache(maxsize=4096)  # images share a handful of mtimes across thousands of files
def parse_mod_time(value: str) -> int:
    """RFC 3339 (as soci and the tar indexer write it, e.g. ``2024-01-02T03:04:05.5Z``) to ns.

    An empty string (soci's spelling of an unrepresentable time) is the epoch.

    Raises:
        BadZtoc: not an RFC 3339 time.
    """
    if not value:
        return 0
    m = _RFC3339.match(value)
    try:
        if not m:
            raise ValueError(value)
        tz = "+00:00" if m.group(3) in ("Z", "z") else m.group(3)
        dt = datetime.fromisoformat(m.group(1) + tz)
    except ValueError:
        raise BadZtoc(f"modification time {value!r} is not an RFC 3339 time") from None
    ns = int((m.group(2) or "").ljust(9, "0"))
    return calendar.timegm(dt.utctimetuple()) * 1_000_000_000 + ns


def check_entries(entries: Sequence[FileEntry], archive_size: int) -> list[Placement]:
    """Validate a whole archive's entries before anything is created; say what each becomes.

    Raises:
        UnsafeArchive: an entry that would write outside the layer (naming it).
        BadZtoc: counts, types, offsets or sizes that cannot belong to this archive.
    """
    return list(check_archive(entries, archive_size).placements)


def check_archive(entries: Sequence[FileEntry], archive_size: int) -> EntryChecker:
    """:func:`check_entries`, returning the checker (its ``placements`` and ``fresh``).

    Raises:
        UnsafeArchive, BadZtoc: as :func:`check_entries`.
    """
    if len(entries) * TAR_BLOCK > archive_size:
        raise BadZtoc(f"{len(entries)} entries cannot fit in a {archive_size}-byte tar stream")
    checker = EntryChecker(archive_size)
    for e in entries:
        checker.check(e)
    return checker


class EntryChecker:
    """Simulates the layer tree entry by entry, refusing anything that would escape it.

    A path through a symlink (or a file) created earlier in the same archive, or a hard
    link to something not (yet) in the layer, is refused.  :attr:`placements` says what
    each entry checked so far becomes, ``final`` marking the nodes the finished layer
    keeps (the last entry of each path, and nodes hard links keep after their path was
    replaced: see :class:`Placement`).

    Why it is packed: a whole layer of a million files goes through one checker, so
    every byte it keeps per entry counts (issue 20: three maps keyed by every path and a
    Placement per entry were ~300 B an entry).  Each path maps to one int shared by a
    block of entries (:meth:`_packed`: the block of its last entry, its node kind); what
    each entry becomes is kept as columns (:class:`_Placements`) whose paths are the
    map's own keys; only hard links keep more.  About 120 B an entry, most of it the
    path itself and its slot in the map.
    """

    def __init__(self, archive_size: int | None = None) -> None:
        self.archive_size = archive_size
        self._kinds = bytearray()  # entry -> its placement kind (_KIND_CODE)
        self._finals = bytearray()  # entry -> 1 if the finished layer keeps its node
        self._paths: list[str] = []  # entry -> its placement path
        self._made_at: dict[int, str] = {}  # entry -> made_at, for the rare nodes a hard link keeps
        self.placements: Sequence[Placement] = _Placements(self._kinds, self._finals, self._paths, self._made_at)
        #: fresh[i]: entry i's path held nothing before it (creating it replaces nothing).
        self.fresh = bytearray()  # a byte per entry, not a pointer
        #: path -> _packed(its last entry, its node kind), or _IMPLICIT_DIR (a parent no entry made)
        self._tree: dict[str, int] = {"": _IMPLICIT_DIR}
        self._block = -1  # the block of entries _block_ints are for
        self._block_ints: list[int] = []
        #: hard link path -> the entry that created its node (the others' node is their last entry)
        self._link_node: dict[str, int] = {}
        #: creator -> every path holding its node, for nodes with hard links
        self._links: dict[int, list[str]] = {}
        #: The last parent whose every prefix was found a directory; entries that add new
        #: paths cannot change that, so the next entry in the same directory skips the walk
        #: (archives list a directory's entries together).  Anything else forgets it.
        self._checked_parent: str | None = None

    def check(self, e: FileEntry) -> Placement:
        """Validate one entry (in archive order) and return what it becomes.

        Raises:
            UnsafeArchive, BadZtoc: as :func:`check_entries`.
        """
        tree = self._tree
        if e.type not in _ENTRY_TYPES:
            raise BadZtoc(f"tar entry {e.name!r} has unknown type {e.type!r}")
        if e.uncompressed_size < 0 or e.uncompressed_offset < 0 or (
                self.archive_size is not None and e.type == "reg"
                and e.uncompressed_offset + e.uncompressed_size > self.archive_size):
            raise BadZtoc(f"tar entry {e.name!r} claims {e.uncompressed_size} bytes at offset "
                          f"{e.uncompressed_offset}, outside the {self.archive_size}-byte archive")
        parts = split_name(e.name)
        base = parts[-1] if parts else ""
        if base == OPAQUE_MARKER:
            kind, parts = "opaque", parts[:-1]
        elif base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            kind = "skip"
        elif base.startswith(WHITEOUT_PREFIX):
            kind, parts = "whiteout", parts[:-1] + [base[len(WHITEOUT_PREFIX):]]
            if parts[-1] in ("", ".", ".."):
                raise UnsafeArchive(f"tar entry {e.name!r} is a whiteout of {parts[-1]!r}")
        elif not parts:
            kind = "skip"  # the layer root itself
        else:
            kind = e.type
        path = "/".join(parts)
        old = tree.get(path)  # (a parent below is never this path: it stays what it is here)
        fresh = old is None
        self.fresh.append(fresh)
        if kind != "skip":
            # The parents: every proper prefix (for an opaque marker, the directory too).
            parent_parts = parts if kind == "opaque" else parts[:-1]
            parent = "/".join(parent_parts)
            if parent != self._checked_parent:
                prefixes = []
                prefix = ""
                for part in parent_parts:
                    prefix = f"{prefix}/{part}" if prefix else part
                    prefixes.append(prefix)
                _check_parents(e.name, prefixes, tree)
                for prefix in prefixes:
                    tree.setdefault(prefix, _IMPLICIT_DIR)  # created implicitly
                self._checked_parent = parent
        if not fresh or kind == "whiteout":
            self._checked_parent = None  # a path replaced or hidden: walk again next time
        if kind == "symlink" and not e.linkname:
            raise CorruptContent(f"tar entry {e.name!r} is a symlink with an empty target")
        target = ""
        if kind == "hardlink":
            target = "/".join(split_name(e.linkname, f"entry {e.name!r} has a hard link target"))
            tnode = tree.get(target)
            if tnode is None or tnode & 3 == _DIR or not target:
                why = "a directory" if (tnode is not None and tnode & 3 == _DIR) or not target else \
                    "missing from the layer"
                raise UnsafeArchive(f"tar entry {e.name!r} is a hard link to {e.linkname!r}, which is {why}")
        i = len(self._paths)
        code = _KIND_CODE[kind]
        if kind == "whiteout":
            if old is not None:
                if old & 3 == _DIR:
                    self._forget_below(path)
                self._drop(path, old)
            tree[path] = self._packed(i, _OTHER)
        elif kind == "dir":
            tree[path] = self._packed(i, _DIR)  # (a directory again keeps what is below it)
            if old is not None:
                self._drop(path, old)
        elif kind not in ("opaque", "skip"):
            if old is not None and old & 3 == _DIR:
                self._forget_below(path)
            tree[path] = self._packed(i, _NODE_OF_KIND[code])
            if old is not None:
                self._drop(path, old)
            if kind == "hardlink":
                # (the target's node as it is now: the link may have replaced it, or what was above it)
                node = None if target == path else self._node(target, tree.get(target))
                if node is not None:
                    self._link_node[path] = node
                    self._links.setdefault(node, [self._paths[node]]).append(path)
        self._kinds.append(code)
        self._finals.append(1)
        self._paths.append(path)
        return Placement(kind, path)

    def _packed(self, i: int, node_kind: int) -> int:
        """What the tree holds for a path whose last entry is ``i``: its block and the node kind (low two bits).

        Why blocks: an int per path is 32 bytes more per entry; the ints of a block of
        :data:`_BLOCK` entries are made once and shared, and :meth:`_last` finds the entry
        in its block when a path is replaced or linked to (rare, and a C scan of the block).
        """
        block = i >> _BLOCK_BITS
        if block != self._block:
            self._block, self._block_ints = block, [block << 2 | k for k in range(4)]
        return self._block_ints[node_kind]

    def _last(self, path: str, packed: int) -> int:
        """The last entry at ``path`` (``packed`` in the tree): the last in its block whose path is ``path``.

        An opaque marker's path is its directory's, which it does not replace: passed over.
        (A node a hard link keeps may have taken a link's path, see :meth:`_drop`: it was
        created before the link, so the link's entry still comes last.)
        """
        lo = (packed >> 2) << _BLOCK_BITS
        hi = min(lo + _BLOCK, len(self._paths))
        block = self._paths[lo:hi]
        block.reverse()
        k = block.index(path)
        while self._kinds[hi - 1 - k] == _OPAQUE:
            k = block.index(path, k + 1)
        return hi - 1 - k

    def _node(self, path: str, packed: int | None) -> int | None:
        """The entry that created the node at ``path`` (hard links: their target's creator), if any."""
        if packed is None or packed < 0:
            return None
        return self._node_of(path, self._last(path, packed))

    def _node_of(self, path: str, last: int) -> int | None:
        code = self._kinds[last]
        if code == _KIND_CODE["hardlink"]:
            return self._link_node.get(path)
        return None if code in _NO_NODE else last

    def _drop(self, path: str, packed: int) -> None:
        """The node at ``path`` (``packed`` in the tree) is replaced: its entry is no longer final,
        unless a hard link keeps it."""
        if packed < 0:
            return  # a parent no entry made: nothing to drop
        last = self._last(path, packed)
        node = self._node_of(path, last)
        self._finals[last] = 0
        self._link_node.pop(path, None)
        if node is None or node not in self._links:
            return
        paths = self._links[node]
        paths.remove(path)
        if self._paths[node] == path:  # where its data and metadata go: another link that holds it, or nowhere
            if paths:
                self._made_at[node] = self._made_at.get(node) or path
                self._paths[node] = paths[0]
                self._finals[node] = 1
            else:
                self._finals[node] = 0

    def _forget_below(self, path: str) -> None:
        """A directory replaced by a non-directory takes its old subtree with it."""
        tree = self._tree
        prefix = path + "/"
        for p in [p for p in tree if p.startswith(prefix)]:
            self._drop(p, tree.pop(p))


#: What each entry checked becomes, by code (a byte an entry in :class:`_Placements`).
_KINDS = (*ENTRY_TYPES, "whiteout", "opaque", "skip")
_KIND_CODE = {kind: code for code, kind in enumerate(_KINDS)}
#: The node kinds the tree walk tells apart (the low two bits of a packed path).
_DIR, _SYMLINK, _REG, _OTHER = range(4)
_NODE_OF_KIND = {_KIND_CODE[k]: (_DIR if k == "dir" else _SYMLINK if k == "symlink" else _REG if k == "reg"
                                 else _OTHER) for k in ENTRY_TYPES}
#: Entries that create no node a hard link could share.
_NO_NODE = frozenset((_KIND_CODE["dir"], _KIND_CODE["whiteout"]))
_OPAQUE = _KIND_CODE["opaque"]
#: A parent directory that no entry created (no last entry; a small int, shared, not one per path).
_IMPLICIT_DIR = -4
#: Entries whose paths share the ints of the tree (:meth:`EntryChecker._packed`).
_BLOCK_BITS = 7
_BLOCK = 1 << _BLOCK_BITS


class _Placements(Sequence[Placement]):
    """:attr:`EntryChecker.placements`: the columns, each Placement made when it is asked for.

    Why: a NamedTuple per entry was ~70 B of the ~300 B a checked entry kept.  The view
    holds the columns only, not the checker's tree, so a caller that keeps the
    placements lets the tree go (``LandingTable.derive`` does).
    """

    __slots__ = ("_finals", "_kinds", "_made_at", "_paths")

    def __init__(self, kinds: bytearray, finals: bytearray, paths: list[str], made_at: dict[int, str]) -> None:
        self._kinds, self._finals, self._paths, self._made_at = kinds, finals, paths, made_at

    def __len__(self) -> int:
        return len(self._paths)

    @overload
    def __getitem__(self, i: int) -> Placement: ...

    @overload
    def __getitem__(self, i: slice) -> list[Placement]: ...

    def __getitem__(self, i: int | slice) -> Placement | list[Placement]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self._paths)))]
        path = self._paths[i]  # (IndexError as a list's)
        if i < 0:
            i += len(self._paths)
        return Placement(_KINDS[self._kinds[i]], path, self._finals[i] == 1, self._made_at.get(i, ""))

    def __iter__(self) -> Iterator[Placement]:
        made_at = self._made_at
        for i, (code, path, final) in enumerate(zip(self._kinds, self._paths, self._finals)):
            yield Placement(_KINDS[code], path, final == 1, made_at.get(i, "") if made_at else "")


def _check_parents(name: str, prefixes: list[str], tree: dict[str, int]) -> None:
    """Every parent path of an entry must be a directory created earlier (or implicitly).

    Raises:
        UnsafeArchive: a parent is a symlink or a non-directory.
    """
    for prefix in prefixes:
        packed = tree.get(prefix)
        if packed is None:
            continue
        if packed & 3 == _SYMLINK:
            raise UnsafeArchive(f"tar entry {name!r} would write through the symlink {prefix!r} "
                                "created earlier in the layer")
        if packed & 3 != _DIR:
            raise UnsafeArchive(f"tar entry {name!r} has a non-directory {prefix!r} as a parent")


# === what a tree that is not what its TOC says is called (here and in prewarm.store.landing)


def missing_parent(name: str, parent: str) -> UnsafeArchive:
    return UnsafeArchive(f"tar entry {name!r}: directory {parent!r} is missing from the layer")


def unsafe_parent(name: str, parent: str) -> UnsafeArchive:
    return UnsafeArchive(f"tar entry {name!r} would write through a symlink or non-directory in {parent!r}")


def unopenable_data(path: str, reason: str) -> UnsafeArchive:
    return UnsafeArchive(f"file {path!r} of the layer cannot be opened for its data ({reason}); the layer "
                         "tree is not what its TOC says")


def not_regular(path: str) -> UnsafeArchive:
    return UnsafeArchive(f"file {path!r} of the layer is not a regular file")


# === openat2: resolve a path beneath a dir fd in one syscall, refusing every symlink

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # same number on x86_64 and aarch64


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_openat2_ok = hasattr(_libc, "syscall")


def open_beneath(dir_fd: int, path: str, flags: int) -> int:
    """Open ``path`` relative to ``dir_fd``; no component may be a symlink or ``..``.

    Raises:
        OSError: as open(2) would; ELOOP / EXDEV when a symlink or escape is met.
    """
    global _openat2_ok
    if _openat2_ok:
        how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM):
            raise OSError(err, os.strerror(err), path)
        _openat2_ok = False  # old kernel or seccomp: walk instead
    parts = path.split("/")
    if ".." in parts or not parts[0]:  # what RESOLVE_BENEATH refuses as an escape
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), path)
    fd = os.dup(dir_fd)
    try:
        for p in parts[:-1]:
            nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


class LayerWriter:
    """Creates entries inside one layer directory through directory fds.

    Use as a context manager; it keeps the fd of the last parent used, since tar
    archives list a directory's entries together.
    """

    def __init__(self, root: Path) -> None:
        """Open the layer root (which must be a real directory, not a symlink).

        Raises:
            UnsafeArchive: ``root`` is a symlink.
        """
        self.root = root
        try:
            self._root_fd = os.open(root, _DIR_FLAGS)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeArchive(f"layer directory {root} is not a plain directory") from None
            raise
        #: fds of directories landed in lately, by relative path (most recent last)
        self._dirs: dict[str, int] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._forget_dirs()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    @property
    def root_fd(self) -> int:
        return self._root_fd

    def _parent_fd(self, parent: str, name: str, *, create: bool) -> int:
        """The fd of directory ``parent`` (relative), creating missing directories 0755."""
        if not parent:
            return self._root_fd
        cached = self._dirs.get(parent)
        if cached is not None:
            return cached
        try:
            fd = open_beneath(self._root_fd, parent, _DIR_FLAGS)
        except FileNotFoundError:
            if not create:
                raise missing_parent(name, parent) from None
            fd = self._make_dirs(parent, name)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
                raise unsafe_parent(name, parent) from None
            raise
        if len(self._dirs) >= _DIR_FDS:
            os.close(self._dirs.pop(next(iter(self._dirs))))
        self._dirs[parent] = fd
        return fd

    def _forget_dirs(self, keep: int = -1) -> None:
        """Close the cached directory fds but ``keep`` (a removed tree may have held any of them)."""
        kept = {p: fd for p, fd in self._dirs.items() if fd == keep}
        for fd in self._dirs.values():
            if fd != keep:
                os.close(fd)
        self._dirs = kept

    def _make_dirs(self, parent: str, name: str) -> int:
        fd = os.dup(self._root_fd)
        try:
            for p in parent.split("/"):
                try:
                    nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(p, 0o755, dir_fd=fd)
                    nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except OSError as err:
                    if err.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeArchive(f"tar entry {name!r} would write through a symlink or "
                                            f"non-directory {p!r} in {parent!r}") from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _clear(self, pfd: int, base: str, *, keep_dir: bool) -> bool:
        """Remove what is at ``base`` (a later tar entry replaces an earlier one); True if a dir stays."""
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(base, dir_fd=pfd)
            self._forget_dirs(keep=pfd)  # they may have been inside the removed tree
        else:
            os.unlink(base, dir_fd=pfd)
        return False

    def make_parent(self, path: str, name: str) -> None:
        """Create the missing parent directories of ``path`` (0755, as for any entry)."""
        self._parent_fd(path.rpartition("/")[0], name, create=True)

    def create(self, entry: FileEntry, placement: Placement) -> None:
        """Create the node for one entry (regular files pre-sized, no data yet).

        Raises:
            UnsafeArchive: the entry would escape the layer, or a hard link's target is
                missing or a directory.
        """
        if placement.kind == "skip":
            return
        if placement.kind == "opaque":
            os.setxattr(self._parent_fd(placement.path, entry.name, create=True), OPAQUE_XATTR, b"y")
            return
        pfd, base = self.parent_dir(entry, placement)
        kind = placement.kind
        if kind == "dir":
            try:
                os.mkdir(base, 0o755, dir_fd=pfd)
            except FileExistsError:
                if not self._clear(pfd, base, keep_dir=True):
                    os.mkdir(base, 0o755, dir_fd=pfd)
            return
        if kind == "reg":
            fd = self._new_file(pfd, base)
            try:
                if entry.uncompressed_size:
                    os.ftruncate(fd, entry.uncompressed_size)
            finally:
                os.close(fd)
            return
        # Made first, cleared only when something is there: a later tar entry replacing an
        # earlier one is rare, and a stat before every creation was one more system call
        # per entry.
        try:
            self._make_node(entry, kind, pfd, base)
        except FileExistsError:
            self._clear(pfd, base, keep_dir=False)
            self._make_node(entry, kind, pfd, base)

    def _make_node(self, entry: FileEntry, kind: str, pfd: int, base: str) -> None:
        if kind == "whiteout":
            os.mknod(base, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=pfd)
        elif kind == "symlink":
            os.symlink(entry.linkname, base, dir_fd=pfd)
        elif kind == "hardlink":
            self._link(entry, pfd, base)
        else:
            os.mknod(base, _NODE_TYPES[kind] | 0o600, os.makedev(entry.devmajor, entry.devminor), dir_fd=pfd)

    def _new_file(self, pfd: int, base: str) -> int:
        """A new empty regular file ``base`` in ``pfd``, open for writing; what was there is removed first."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(base, flags, 0o600, dir_fd=pfd)
        except FileExistsError:
            self._clear(pfd, base, keep_dir=False)
            return os.open(base, flags, 0o600, dir_fd=pfd)

    def parent_dir(self, entry: FileEntry, placement: Placement) -> tuple[int, str]:
        """(fd of the directory the entry's node is created in, its name there); missing directories are made.

        Raises:
            UnsafeArchive: the entry would escape the layer.
        """
        parent, _, base = placement.created_at.rpartition("/")
        return self._parent_fd(parent, entry.name, create=True), base

    def clear(self, pfd: int, base: str) -> None:
        """Remove what is at ``base`` in ``pfd`` (a later tar entry replaces it)."""
        self._clear(pfd, base, keep_dir=False)

    def create_file(self, entry: FileEntry, placement: Placement) -> int:
        """Create the regular file of one entry (a ``reg`` placement) and return it open for writing.

        Why: a streamed whole layer writes each file's data as it arrives and applies its
        metadata on the same fd (:func:`apply_meta`) before closing it, instead of
        creating it empty, opening it again for its data and once more by path for its
        metadata: about half the system calls per file.

        Raises:
            UnsafeArchive: the entry would escape the layer.
        """
        return self._new_file(*self.parent_dir(entry, placement))

    def _dir_fd_of(self, path: str, name: str) -> int:
        try:
            return open_beneath(self._root_fd, path, _DIR_FLAGS)
        except OSError as err:
            raise UnsafeArchive(f"tar entry {name!r}: {path!r} is not a directory inside the layer "
                                f"({err.strerror})") from None

    def _link(self, entry: FileEntry, pfd: int, base: str) -> None:
        target = split_name(entry.linkname, f"entry {entry.name!r} has a hard link target")
        if not target:
            raise UnsafeArchive(f"tar entry {entry.name!r} is a hard link to the layer root")
        tparent = "/".join(target[:-1])
        tfd = self._root_fd if not tparent else self._dir_fd_of(tparent, entry.name)
        try:
            st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeArchive(f"tar entry {entry.name!r} is a hard link to the directory {entry.linkname!r}")
            os.link(target[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise UnsafeArchive(f"tar entry {entry.name!r} is a hard link to {entry.linkname!r}, "
                                "which is missing from the layer") from None
        finally:
            if tfd != self._root_fd:
                os.close(tfd)

    def open_data(self, path: str) -> int:
        """An O_WRONLY fd on the regular file at ``path`` (for pwrite of its data).

        Raises:
            UnsafeArchive: ``path`` is not a regular file reached without symlinks.
        """
        try:
            fd = open_beneath(self._root_fd, path, os.O_WRONLY | os.O_NOFOLLOW)
        except OSError as err:
            raise unopenable_data(path, err.strerror or str(err)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise not_regular(path)
        return fd

    def apply_metadata(self, placements: Sequence[Placement], meta: Sequence[Meta] | Mapping[int, Meta],
                       done: bytes | None = None) -> None:
        """Owners, modes, xattrs and mtimes of every final entry; directories last.

        ``meta[i]`` is entry i's :func:`entry_meta` (a mapping may hold only the entries
        not ``done``).  Hard links share their target's inode (the target's metadata wins,
        applied at ``path``: the link that keeps it when the target's own path was
        replaced); whiteouts keep 0/0 and get the entry's owner, as containerd's overlay
        applier does.  Entries whose byte in ``done`` is set already have theirs (files
        born whole when their span landed, see :meth:`create_whole`).
        """
        dirs: list[tuple[Placement, Meta]] = []
        for i in range(len(placements)):
            if done and done[i]:
                continue  # most files of a many-file layer: no Placement made for them
            placement = placements[i]
            if not placement.final or placement.kind in ("skip", "opaque", "hardlink"):
                continue
            if placement.kind == "dir":
                dirs.append((placement, meta[i]))
            else:
                self._apply_one(placement, meta[i])
        for placement, m in sorted(dirs, key=lambda d: d[0].path.count("/"), reverse=True):
            self._apply_one(placement, m)

    def create_whole(self, path: str, data: memoryview, writer: DirectWriter, meta: Meta) -> None:
        """Create a regular file with all its data and its metadata, in one open.

        Why: most files of a layer lie inside one span; creating each when its span lands
        (in whichever process lands it) instead of in the skeleton takes 70,000 creations
        off the one process that prepares the layer, and saves an open and a close each.
        A file left by an earlier, interrupted landing of the same span is written again.

        Raises:
            UnsafeArchive: the path is not a regular file reached without symlinks.
            OSError: as the system calls (ENOSPC, ...).
        """
        parent, _, base = path.rpartition("/")
        pfd = self._parent_fd(parent, path, create=False)
        try:
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=pfd)
        except FileExistsError:  # left by an interrupted landing of this span
            fd = self.open_data(path)
        try:
            writer.pwrite(fd, data, 0)
            apply_meta(fd, "reg", meta)
        finally:
            os.close(fd)

    def _apply_one(self, placement: Placement, meta: Meta) -> None:
        parent, _, base = placement.path.rpartition("/")
        apply_meta((self._parent_fd(parent, placement.path, create=False), base), placement.kind, meta)


def apply_meta(node: int | tuple[int, str], kind: str, meta: Meta) -> None:
    """Give one node its owner, mode, xattrs and mtime: the one place metadata is applied.

    ``node`` is an open fd (a file created whole with its data) or a name in a directory
    fd (everything else; nothing is followed, so a symlink gets its own owner and mtime).
    The order is the contract: the owner first, then the mode (chown clears set-id
    bits), then xattrs, then the mtime.  Whiteouts keep their 0/0 device and get only the
    owner, as containerd's overlay applier does; symlinks get no mode, and skip the
    ``user.*`` xattrs Linux refuses on them.  C ``create_whole`` (``_landing.c``) is the
    twin of the fd case for files without xattrs; tests/test_landing.py holds the trees
    the two land equal.

    Raises:
        OSError: as chown, chmod, setxattr or utime.
    """
    uid, gid, mode, mtime_ns, xattrs = meta
    at: dict[str, Any] = {}
    nofollow: dict[str, Any] = {}
    if isinstance(node, int):
        target: int | str = node
        where: int | str = node
    else:
        dir_fd, target = node
        at, nofollow = {"dir_fd": dir_fd}, {"follow_symlinks": False}
        where = f"/proc/self/fd/{dir_fd}/{target}" if xattrs else ""
    os.chown(target, uid, gid, **at, **nofollow)
    if kind == "whiteout":
        return
    is_link = kind == "symlink"
    if not is_link:
        os.chmod(target, mode & 0o7777, **at)
    for key, value in xattrs:
        try:
            os.setxattr(where, key, os.fsencode(value), **nofollow)
        except OSError as err:
            if is_link and err.errno in (errno.EPERM, errno.ENOTSUP):
                continue  # user.* xattrs are not allowed on symlinks
            raise
    os.utime(target, ns=(mtime_ns, mtime_ns), **at, **nofollow)


#: What metadata an entry gets: (uid, gid, mode, mtime in ns, xattr (key, value) pairs).
Meta = tuple[int, int, int, int, tuple[tuple[str, str], ...]]


def entry_meta(e: FileEntry) -> Meta:
    """The metadata :meth:`LayerWriter.apply_metadata` applies for entry ``e`` (its :func:`kept_xattrs`).

    Raises:
        BadZtoc: the modification time is not RFC 3339.
    """
    return e.uid, e.gid, e.mode, parse_mod_time(e.mod_time), kept_xattrs(e.real_xattrs) if e.xattrs else ()


#: xattr namespaces a layer's tar never sets on the node.
DROPPED_XATTR_PREFIXES = ("trusted.", "user.overlay.")


def kept_xattrs(xattrs: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The xattrs of a tar entry that its node gets: all but ``trusted.*`` and ``user.overlay.*``.

    Why: the layer dir is an overlay lowerdir, and overlay reads its own state from
    ``trusted.overlay.*`` (``user.overlay.*`` when mounted with ``userxattr``): redirect
    and metacopy send a lookup to another path or layer, origin names a file handle,
    opaque hides the layers below.  A tar may carry any of them, so they are not the
    image's to set.  containerd's unpacker (``pkg/archive/tar_unix.go`` ``setxattr``)
    refuses every ``trusted.*`` key from an archive and skips it; we skip the same, and
    ``user.overlay.*`` too for the ``userxattr`` mounts.  The opaque marker a real
    ``.wh..wh..opq`` entry stands for is set by :meth:`LayerWriter.create`, not taken from xattrs.
    """
    return tuple((k, v) for k, v in xattrs.items() if not k.startswith(DROPPED_XATTR_PREFIXES))


def data_extents(entries: Iterable[FileEntry], placements: Sequence[Placement]) -> Iterator[tuple[int, int]]:
    """(stream offset, size) of every entry's data the layer keeps (final regular files only).

    Superseded regular files (a later entry of the same path) get an empty extent: their
    bytes are not written anywhere.
    """
    return ((e.uncompressed_offset, e.uncompressed_size if p.kind == "reg" and p.final else 0)
            for e, p in zip(entries, placements))
