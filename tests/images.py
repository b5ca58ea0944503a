"""The test image catalogue: real OCI images with every oddity a pre-warmer must survive.

Each builder writes an OCI layout with :mod:`prewarm.imagebuild` and returns what it built;
push it with :func:`prewarm.imagebuild.push_layout`.  The images are deterministic, so
digests are stable between runs.

- :func:`simple_image`: two small gzip layers, one whiteout; for quick tests.
- :func:`odd_image`: six layers, one per compression we must read (gzip single member,
  pigz-style concatenated members, FNAME/FEXTRA header, plain tar, zstd), layers above
  and below the 10 MiB zTOC threshold, a 40 MB file spanning many 4 MiB spans, and every
  entry kind: whiteouts and opaque directories over lower layers, hardlinks, relative and
  absolute symlinks, a fifo, char devices, setuid/setgid/sticky modes, user xattrs,
  uid/gid other than 0, names over 100 and 255 bytes, unicode names, empty files and dirs.
  :data:`ODD_EXPECT` says what its unpacked rootfs must show.
- :func:`hostile_layers` / :func:`hostile_image`: layers whose entries try to write
  outside the layer (``..``, absolute paths, through a symlink, hardlinks out).
"""

from __future__ import annotations

import atexit
import dataclasses
import random
import shutil
import tempfile
from pathlib import Path

from prewarm.imagebuild import BuiltImage, Layer, MediaTypes, TarEntry, build_image, copy_image

MiB = 1 << 20

# Names past the ustar limits: a path of more than 100 bytes (ustar's name field) and
# one of more than 255 (ustar's prefix + name), each component under NAME_MAX.
LONG_DIR = "long/" + "d" * 120
NAME_OVER_100 = f"{LONG_DIR}/file-over-100-bytes.txt"
NAME_OVER_255 = f"{LONG_DIR}/{'e' * 140}/{'f' * 60}.bin"
UNICODE_NAME = "unicode/naïve-日本語-Ωmega-😀.txt"
BIG_FILE = "models/weights.bin"
BIG_SIZE = 40 * MiB


def mixed_bytes(size: int, seed: int, random_share: float = 0.5) -> bytes:
    """Seeded bytes that compress realistically: each 64 KiB block is part random, part text.

    Pure random data would not compress and pure text would shrink to nothing; a layer of
    weights and code sits between, and span sizes in compressed bytes should too.
    """
    rng = random.Random(seed)
    block = 64 * 1024
    rand_len = int(block * random_share)
    out = bytearray()
    n = 0
    while len(out) < size:
        out += rng.randbytes(rand_len)
        text = "".join(f"line {n}.{i}: tensor[{rng.randrange(1 << 16)}] = {rng.random():.6f}\n"
                       for i in range((block - rand_len) // 40 + 1))
        out += text.encode()[: block - rand_len]
        n += 1
    return bytes(out[:size])


# === the simple image ========================================================


def simple_layers() -> list[Layer]:
    base = [
        TarEntry("etc", "dir", mode=0o755),
        TarEntry("etc/hostname", data=b"simple\n"),
        TarEntry("etc/old.conf", data=b"to be deleted\n"),
        TarEntry("bin", "dir", mode=0o755),
        TarEntry("bin/hello", data=b"#!/bin/sh\necho hello\n", mode=0o755),
        TarEntry("bin/hi", "symlink", linkname="hello", mode=0o777),
    ]
    top = [
        TarEntry("etc", "dir", mode=0o755),
        TarEntry("etc/.wh.old.conf"),
        TarEntry("etc/new.conf", data=b"key = value\n" * 100),
        TarEntry("data", "dir", mode=0o755),
        TarEntry("data/payload.bin", data=mixed_bytes(256 * 1024, seed=1)),
    ]
    return [Layer(base, "gzip", created_by="simple base"), Layer(top, "gzip", created_by="simple top")]


def simple_image(layout: Path, tag: str = "simple", media_types: MediaTypes = "oci") -> BuiltImage:
    """Two small gzip layers (a few hundred KB): etc/old.conf is whited out by the top."""
    return build_image(layout, simple_layers(), tag=tag, media_types=media_types)


# === the odd image ===========================================================


@dataclasses.dataclass(frozen=True)
class OddExpect:
    """What the odd image's rootfs shows once its layers are applied in order."""

    absent: tuple[str, ...] = (
        "etc/remove-me",          # file whited out in layer 2
        "var/cache",              # directory whited out (with its children) in layer 3
        "var/cache/pkg.db",
        "opt/app/old-a",          # hidden by the opaque opt/app in layer 2
        "opt/app/sub/old-b",
        "srv/legacy/one",         # hidden by the opaque srv/legacy in layer 4
        "models/.wh.stale",       # whiteout markers never show
        "etc/.wh.remove-me",
        "opt/app/.wh..wh..opq",
    )
    files: dict[str, bytes] = dataclasses.field(default_factory=lambda: {
        "etc/hostname": b"odd\n",
        "etc/replaced": b"replaced by layer 3\n",
        "opt/app/new": b"new app after the opaque dir\n",
        "srv/legacy/fresh": b"fresh after opaque\n",
        "empty/file": b"",
        NAME_OVER_100: b"over 100 bytes\n",
        UNICODE_NAME: "unicode content ✓\n".encode(),
        "zstd/hello.txt": b"hello from a zstd layer\n" * 10,
        "plain/readme.txt": b"from the uncompressed layer\n",
        "fextra/info.txt": b"from the FNAME/FEXTRA layer\n",
    })
    # path -> (mode incl. setuid/setgid/sticky, uid, gid)
    modes: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=lambda: {
        "usr/bin/su-like": (0o4755, 0, 0),
        "usr/bin/sg-like": (0o2755, 0, 42),
        "tmp": (0o1777, 0, 0),
        "home/alice/notes.txt": (0o600, 1000, 1000),
        "home/alice": (0o750, 1000, 1000),
        "srv/owned": (0o640, 4242, 5151),
    })
    symlinks: dict[str, str] = dataclasses.field(default_factory=lambda: {
        "usr/bin/rel-link": "su-like",
        "etc/abs-link": "/usr/bin/su-like",
        "etc/dangling": "../nowhere/at/all",
        "etc/was-file": "hostname",          # a file in layer 0, a symlink from layer 4
    })
    hardlinks: tuple[tuple[str, ...], ...] = (
        ("usr/bin/su-like", "usr/bin/su-hardlink"),
        (BIG_FILE, "models/weights-hardlink.bin"),
    )
    chardevs: dict[str, tuple[int, int]] = dataclasses.field(default_factory=lambda: {
        "dev/null-like": (1, 3),
        "dev/tty-like": (5, 0),
    })
    fifos: tuple[str, ...] = ("run/fifo",)
    xattrs: dict[str, dict[str, bytes]] = dataclasses.field(default_factory=lambda: {
        "etc/xattr-file": {"user.comment": b"kept by every layer format", "user.prewarm.n": b"42"},
        "zstd/with-xattr": {"user.origin": b"zstd"},
    })
    empty_dirs: tuple[str, ...] = ("empty/dir", "var/empty")
    big: tuple[str, int] = (BIG_FILE, BIG_SIZE)
    long_names: tuple[str, ...] = (NAME_OVER_100, NAME_OVER_255)
    dir_became_file: str = "srv/was-dir"


ODD_EXPECT = OddExpect()


def _odd_base() -> list[TarEntry]:
    """Layer 0 (gzip, small): most entry kinds, and the things later layers delete."""
    def d(name: str, mode: int = 0o755, **kw: object) -> TarEntry:
        return TarEntry(name, "dir", mode=mode, **kw)  # type: ignore[arg-type]

    return [
        d("etc"), d("usr"), d("usr/bin"), d("var"), d("var/cache"), d("var/empty"),
        d("tmp", 0o1777), d("home"),
        d("home/alice", 0o750, uid=1000, gid=1000, uname="alice", gname="alice"),
        TarEntry("home/alice/notes.txt", data=b"alice's notes\n", mode=0o600, uid=1000, gid=1000,
                 uname="alice", gname="alice"),
        TarEntry("etc/hostname", data=b"odd\n"),
        TarEntry("etc/remove-me", data=b"deleted by a whiteout above\n"),
        TarEntry("etc/replaced", data=b"original, replaced by layer 3\n"),
        TarEntry("etc/was-file", data=b"a file that becomes a symlink\n"),
        TarEntry("etc/xattr-file", data=b"has user xattrs\n",
                 xattrs=ODD_EXPECT.xattrs["etc/xattr-file"]),
        TarEntry("etc/abs-link", "symlink", linkname="/usr/bin/su-like", mode=0o777),
        TarEntry("etc/dangling", "symlink", linkname="../nowhere/at/all", mode=0o777),
        TarEntry("usr/bin/su-like", data=b"\x7fELF pretend setuid\n", mode=0o4755),
        TarEntry("usr/bin/su-hardlink", "hardlink", linkname="usr/bin/su-like", mode=0o4755),
        TarEntry("usr/bin/sg-like", data=b"\x7fELF pretend setgid\n", mode=0o2755, gid=42,
                 gname="staff"),
        TarEntry("usr/bin/rel-link", "symlink", linkname="su-like", mode=0o777),
        TarEntry("var/cache/pkg.db", data=b"cache to be deleted with its dir\n"),
        d("dev"),
        TarEntry("dev/null-like", "chardev", mode=0o666, devmajor=1, devminor=3),
        TarEntry("dev/tty-like", "chardev", mode=0o620, devmajor=5, devminor=0, gid=5, gname="tty"),
        d("run"),
        TarEntry("run/fifo", "fifo", mode=0o644),
        d("opt"), d("opt/app"), d("opt/app/sub"),
        TarEntry("opt/app/old-a", data=b"hidden by opaque\n"),
        TarEntry("opt/app/sub/old-b", data=b"hidden by opaque too\n"),
        d("srv"), d("srv/legacy"), d("srv/was-dir"),
        TarEntry("srv/legacy/one", data=b"hidden by opaque in layer 4\n"),
        TarEntry("srv/was-dir/child", data=b"gone when the dir becomes a file\n"),
        TarEntry("srv/owned", data=b"odd owner\n", mode=0o640, uid=4242, gid=5151),
        d("empty"), d("empty/dir"),
        TarEntry("empty/file"),
        d("long"), d(LONG_DIR), d(f"{LONG_DIR}/{'e' * 140}"),
        TarEntry(NAME_OVER_100, data=b"over 100 bytes\n"),
        TarEntry(NAME_OVER_255, data=b"over 255 bytes\n" * 50),
        d("unicode"),
        TarEntry(UNICODE_NAME, data="unicode content ✓\n".encode()),
        TarEntry("unicode/ünïcödé-dir-Ж", "dir", mode=0o755),
    ]


def _odd_big() -> list[TarEntry]:
    """Layer 1 (gzip, > 10 MiB): the 40 MB file across many 4 MiB spans, and its hardlink."""
    return [
        TarEntry("models", "dir", mode=0o755),
        TarEntry("models/stale", data=b"whited out in layer 2\n"),
        TarEntry(BIG_FILE, data=mixed_bytes(BIG_SIZE, seed=40)),
        TarEntry("models/weights-hardlink.bin", "hardlink", linkname=BIG_FILE),
        TarEntry("models/after-big.txt", data=b"an entry after the big file\n"),
    ]


def _odd_pigz() -> list[TarEntry]:
    """Layer 2 (concatenated gzip members, > 10 MiB): whiteouts and an opaque dir."""
    return [
        TarEntry("etc", "dir", mode=0o755),
        TarEntry("etc/.wh.remove-me"),
        TarEntry("models", "dir", mode=0o755),
        TarEntry("models/.wh.stale"),
        TarEntry("models/shard-2.bin", data=mixed_bytes(24 * MiB, seed=2, random_share=0.6)),
        TarEntry("opt", "dir", mode=0o755),
        TarEntry("opt/app", "dir", mode=0o755),
        TarEntry("opt/app/.wh..wh..opq"),
        TarEntry("opt/app/new", data=b"new app after the opaque dir\n"),
    ]


def _odd_fextra() -> list[TarEntry]:
    """Layer 3 (gzip header with FNAME and FEXTRA, small): a dir whiteout, a replaced file."""
    return [
        TarEntry("var", "dir", mode=0o755),
        TarEntry("var/.wh.cache"),
        TarEntry("etc", "dir", mode=0o755),
        TarEntry("etc/replaced", data=b"replaced by layer 3\n"),
        TarEntry("fextra", "dir", mode=0o755),
        TarEntry("fextra/info.txt", data=b"from the FNAME/FEXTRA layer\n"),
    ]


def _odd_plain() -> list[TarEntry]:
    """Layer 4 (uncompressed tar): type changes and a second opaque dir."""
    return [
        TarEntry("etc", "dir", mode=0o755),
        TarEntry("etc/was-file", "symlink", linkname="hostname", mode=0o777),
        TarEntry("srv", "dir", mode=0o755),
        TarEntry("srv/.wh.was-dir"),
        TarEntry("srv/was-dir", data=b"a directory below, a file here\n"),
        TarEntry("srv/legacy", "dir", mode=0o755),
        TarEntry("srv/legacy/.wh..wh..opq"),
        TarEntry("srv/legacy/fresh", data=b"fresh after opaque\n"),
        TarEntry("plain", "dir", mode=0o755),
        TarEntry("plain/readme.txt", data=b"from the uncompressed layer\n"),
    ]


def _odd_zstd() -> list[TarEntry]:
    """Layer 5 (zstd, small)."""
    return [
        TarEntry("zstd", "dir", mode=0o755),
        TarEntry("zstd/hello.txt", data=b"hello from a zstd layer\n" * 10),
        TarEntry("zstd/with-xattr", data=b"x\n", xattrs=ODD_EXPECT.xattrs["zstd/with-xattr"]),
    ]


def odd_layers() -> list[Layer]:
    return [
        Layer(_odd_base(), "gzip", level=6, created_by="odd 0: base, every entry kind (gzip)"),
        Layer(_odd_big(), "gzip", level=6, created_by="odd 1: 40 MB file (gzip, one member)"),
        Layer(_odd_pigz(), "pigz", level=6, member_size=1 * MiB,
              created_by="odd 2: whiteouts, opaque dir (concatenated gzip members)"),
        Layer(_odd_fextra(), "gzip-fname-fextra", level=9, created_by="odd 3: FNAME/FEXTRA header"),
        Layer(_odd_plain(), "uncompressed", created_by="odd 4: plain tar"),
        Layer(_odd_zstd(), "zstd", level=3, created_by="odd 5: zstd"),
    ]


_odd_cache: dict[str, BuiltImage] = {}


def odd_image(layout: Path, tag: str = "odd") -> BuiltImage:
    """The odd image in ``layout`` under ``tag`` (about 50 MB of blobs).

    Layer sizes: 0 small, 1 ~28 MB, 2 ~19 MB, 3-5 small.  OCI media types (Docker
    schema-2 has no zstd media type).  Building takes a few seconds of one core, so
    the first call of a process builds it in a private directory and every call
    hardlinks that (identical, deterministic) image into ``layout``.
    """
    if "built" not in _odd_cache:
        cache = Path(tempfile.mkdtemp(prefix="prewarm-odd-image-"))
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        _odd_cache["built"] = build_image(cache / "layout", odd_layers(), tag="odd", media_types="oci")
    built = _odd_cache["built"]
    copy_image(built.layout, "odd", layout, tag)
    return dataclasses.replace(built, layout=layout, tag=tag)


# === hostile layers ==========================================================


def hostile_layers() -> dict[str, Layer]:
    """One crafted gzip layer per escape attempt, by name.

    Every entry after the first in each list is the attack; a safe store must refuse
    the layer (``UnsafeArchive``) or contain the write, and never touch anything outside.
    """
    attacks: dict[str, list[TarEntry]] = {
        "dotdot": [
            TarEntry("ok.txt", data=b"fine\n"),
            TarEntry("../x", data=b"escaped via ..\n"),
        ],
        "dotdot-nested": [
            TarEntry("a", "dir", mode=0o755),
            TarEntry("a/../../x", data=b"escaped via a/../..\n"),
        ],
        "absolute": [
            TarEntry("ok.txt", data=b"fine\n"),
            TarEntry("/etc/x", data=b"absolute path\n"),
        ],
        "symlink-escape": [
            TarEntry("link", "symlink", linkname="/tmp/outside", mode=0o777),
            TarEntry("link/file", data=b"written through a symlink\n"),
        ],
        "symlink-relative-escape": [
            TarEntry("up", "symlink", linkname="../../..", mode=0o777),
            TarEntry("up/outside-file", data=b"written through a relative symlink\n"),
        ],
        "symlink-overwrite": [
            TarEntry("victim", "symlink", linkname="/tmp/outside-victim", mode=0o777),
            TarEntry("victim", data=b"a file that must replace the link, not write through it\n"),
        ],
        "hardlink-escape": [
            TarEntry("ok.txt", data=b"fine\n"),
            TarEntry("hl", "hardlink", linkname="../../outside"),
        ],
        "hardlink-absolute": [
            TarEntry("hl-passwd", "hardlink", linkname="/etc/passwd"),
        ],
    }
    return {name: Layer(entries, "gzip", created_by=f"hostile: {name}") for name, entries in attacks.items()}


HOSTILE_ATTACKS: tuple[str, ...] = tuple(hostile_layers())


def hostile_image(layout: Path, attack: str, tag: str | None = None) -> BuiltImage:
    """A benign base layer under the hostile layer named ``attack``.

    Raises:
        KeyError: unknown attack name (see :data:`HOSTILE_ATTACKS`).
    """
    base = Layer([TarEntry("etc", "dir", mode=0o755), TarEntry("etc/hostname", data=b"hostile\n")],
                 "gzip", created_by="benign base")
    return build_image(layout, [base, hostile_layers()[attack]], tag=tag or attack)
