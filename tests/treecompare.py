"""Compare two directory trees the way a container sees them.

Used to check a pre-warmed, overlay-mounted image against ``umoci unpack``'s rootfs.
"Same" means: the same relative paths, and for each the same file type, permission
bits (setuid, setgid and sticky included), uid and gid, regular-file content, symlink
target, device numbers, ``user.*`` xattrs, and the same hardlink groups (which paths
share an inode within each tree).  mtimes only when asked: the layer formats keep them,
but overlay and unpackers treat directory mtimes differently.

The root directory itself is not compared (its owner and mode belong to whoever made
the target directory, not to the image).
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from pathlib import Path

_TYPES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "char device", stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket",
}
_CHUNK = 1 << 20


def _walk(root: Path) -> dict[str, os.stat_result]:
    """Relative path -> lstat, for every entry below ``root`` (symlinks not followed)."""
    out: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = os.lstat(full)
    return out


def _user_xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names) if n.startswith("user.")}


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(_CHUNK), fb.read(_CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


def _hardlink_groups(entries: dict[str, os.stat_result]) -> dict[str, frozenset[str]]:
    """Path -> the other paths of the tree sharing its inode (non-directories only)."""
    by_inode: dict[tuple[int, int], set[str]] = defaultdict(set)
    for rel, st in entries.items():
        if not stat.S_ISDIR(st.st_mode):
            by_inode[(st.st_dev, st.st_ino)].add(rel)
    return {rel: frozenset(group - {rel}) for group in by_inode.values() for rel in group}


def _fmt_mode(mode: int) -> str:
    return oct(stat.S_IMODE(mode))


def compare_trees(a: Path | str, b: Path | str, *, mtimes: bool = False) -> list[str]:
    """The differences between trees ``a`` and ``b``, one line each; empty means the same.

    Each line names the relative path and both values (``a`` first), e.g.
    ``usr/bin/su: mode 0o4755 != 0o755``.
    """
    root_a, root_b = Path(a), Path(b)
    ea, eb = _walk(root_a), _walk(root_b)
    diffs: list[str] = []
    for rel in sorted(ea.keys() - eb.keys()):
        diffs.append(f"{rel}: only in {root_a}")
    for rel in sorted(eb.keys() - ea.keys()):
        diffs.append(f"{rel}: only in {root_b}")
    links_a, links_b = _hardlink_groups(ea), _hardlink_groups(eb)
    for rel in sorted(ea.keys() & eb.keys()):
        sa, sb = ea[rel], eb[rel]
        pa, pb = str(root_a / rel), str(root_b / rel)
        ta, tb = stat.S_IFMT(sa.st_mode), stat.S_IFMT(sb.st_mode)
        if ta != tb:
            diffs.append(f"{rel}: type {_TYPES.get(ta, oct(ta))} != {_TYPES.get(tb, oct(tb))}")
            continue
        # Symlink permission bits are meaningless on Linux (always 0777 in practice).
        if ta != stat.S_IFLNK and stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
            diffs.append(f"{rel}: mode {_fmt_mode(sa.st_mode)} != {_fmt_mode(sb.st_mode)}")
        if (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
            diffs.append(f"{rel}: owner {sa.st_uid}:{sa.st_gid} != {sb.st_uid}:{sb.st_gid}")
        if ta == stat.S_IFREG:
            if sa.st_size != sb.st_size:
                diffs.append(f"{rel}: size {sa.st_size} != {sb.st_size}")
            elif not _same_content(pa, pb):
                diffs.append(f"{rel}: content differs")
        elif ta == stat.S_IFLNK:
            la, lb = os.readlink(pa), os.readlink(pb)
            if la != lb:
                diffs.append(f"{rel}: symlink target {la!r} != {lb!r}")
        elif ta in (stat.S_IFCHR, stat.S_IFBLK):
            da = (os.major(sa.st_rdev), os.minor(sa.st_rdev))
            db = (os.major(sb.st_rdev), os.minor(sb.st_rdev))
            if da != db:
                diffs.append(f"{rel}: device {da[0]},{da[1]} != {db[0]},{db[1]}")
        if ta != stat.S_IFLNK:
            xa, xb = _user_xattrs(pa), _user_xattrs(pb)
            if xa != xb:
                diffs.append(f"{rel}: user xattrs {xa} != {xb}")
        if ta != stat.S_IFDIR and links_a.get(rel, frozenset()) != links_b.get(rel, frozenset()):
            diffs.append(f"{rel}: hardlinked with {sorted(links_a.get(rel, ()))} != "
                         f"{sorted(links_b.get(rel, ()))}")
        if mtimes and ta != stat.S_IFLNK and int(sa.st_mtime) != int(sb.st_mtime):
            diffs.append(f"{rel}: mtime {int(sa.st_mtime)} != {int(sb.st_mtime)}")
    return diffs
