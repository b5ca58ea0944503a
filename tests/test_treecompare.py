"""compare_trees finds every kind of difference a container would notice, and no others."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.treecompare import compare_trees


def make_tree(root: Path) -> Path:
    """A small tree with one of every entry kind compare_trees looks at."""
    root.mkdir()
    (root / "dir").mkdir()
    (root / "dir/file").write_bytes(b"content\n")
    (root / "dir/other").write_bytes(b"other\n")
    os.link(root / "dir/file", root / "dir/file-link")
    (root / "bin").mkdir()
    (root / "bin/su").write_bytes(b"setuid\n")
    os.chmod(root / "bin/su", 0o4755)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    os.symlink("../dir/file", root / "bin/rel")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "owned").write_bytes(b"alice\n")
    os.chown(root / "owned", 1000, 1000)
    (root / "x").write_bytes(b"xattr\n")
    os.setxattr(root / "x", "user.k", b"v")
    (root / "empty").mkdir()
    return root


def copy_tree(src: Path, dst: Path) -> Path:
    # GNU cp -a keeps modes, owners, hardlinks, devices and xattrs.
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


@pytest.fixture()
def twin(tmp_path: Path) -> tuple[Path, Path]:
    a = make_tree(tmp_path / "a")
    return a, copy_tree(a, tmp_path / "b")


def test_identical_trees_have_no_differences(twin: tuple[Path, Path]) -> None:
    # Given two copies of a tree with every entry kind
    a, b = twin
    # Then nothing differs, with or without mtimes (cp -a keeps them)
    assert compare_trees(a, b) == []
    assert compare_trees(a, b, mtimes=True) == []


def _rewrite(p: Path, data: bytes) -> None:
    mode = stat.S_IMODE(p.stat().st_mode)
    st = p.stat()
    p.write_bytes(data)
    os.chmod(p, mode)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replace_with_dir(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _break_hardlink(p: Path) -> None:
    data = p.read_bytes()
    st = p.stat()
    p.unlink()
    p.write_bytes(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def _retarget(p: Path) -> None:
    p.unlink()
    os.symlink("/dir/file", p)


def _redevice(p: Path) -> None:
    p.unlink()
    os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    os.chmod(p, 0o666)


def _fifo_to_file(p: Path) -> None:
    p.unlink()
    p.write_bytes(b"")


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "content": (lambda b: _rewrite(b / "dir/other", b"OTHER\n"), "dir/other: content differs"),
    "size": (lambda b: _rewrite(b / "dir/other", b"longer content\n"), "dir/other: size 6 != 15"),
    "type": (lambda b: _replace_with_dir(b / "owned"), "owned: type file != dir"),
    "setuid": (lambda b: os.chmod(b / "bin/su", 0o755), "bin/su: mode 0o4755 != 0o755"),
    "sticky": (lambda b: os.chmod(b / "tmp", 0o777), "tmp: mode 0o1777 != 0o777"),
    "owner": (lambda b: os.chown(b / "owned", 1000, 1001), "owned: owner 1000:1000 != 1000:1001"),
    "symlink": (lambda b: _retarget(b / "bin/rel"), "bin/rel: symlink target '../dir/file' != '/dir/file'"),
    "hardlink": (lambda b: _break_hardlink(b / "dir/file-link"),
                 "dir/file-link: hardlinked with ['dir/file'] != []"),
    "device": (lambda b: _redevice(b / "null"), "null: device 1,3 != 1,5"),
    "xattr": (lambda b: os.setxattr(b / "x", "user.k", b"w"),
              "x: user xattrs {'user.k': b'v'} != {'user.k': b'w'}"),
    "fifo": (lambda b: _fifo_to_file(b / "fifo"), "fifo: type fifo != file"),
    "missing": (lambda b: os.unlink(b / "dir/other"), "dir/other: only in "),
    "extra": (lambda b: (b / "empty/new").write_bytes(b""), "empty/new: only in "),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_kind_of_difference_is_reported(twin: tuple[Path, Path], case: str) -> None:
    # Given two equal trees, when one detail of the second is changed
    a, b = twin
    change, expected = CASES[case]
    change(b)
    # Then that difference, and only differences about that path, are reported
    diffs = compare_trees(a, b)
    assert any(d.startswith(expected) for d in diffs), diffs
    path = expected.split(":", 1)[0]
    assert all(d.startswith(path) or "hardlinked with" in d for d in diffs), diffs


def test_missing_path_names_the_tree_it_is_in(twin: tuple[Path, Path]) -> None:
    a, b = twin
    shutil.rmtree(b / "empty")
    assert compare_trees(a, b) == [f"empty: only in {a}"]
    assert compare_trees(b, a) == [f"empty: only in {a}"]


def test_mtimes_are_compared_only_when_asked(twin: tuple[Path, Path]) -> None:
    # Given a file whose mtime alone differs
    a, b = twin
    os.utime(b / "dir/other", (0, 0))
    # Then the default comparison ignores it and mtimes=True reports it
    assert compare_trees(a, b) == []
    diffs = compare_trees(a, b, mtimes=True)
    assert len(diffs) == 1 and diffs[0].startswith("dir/other: mtime ") and diffs[0].endswith("!= 0")


def test_hardlink_group_change_is_seen_from_both_members(twin: tuple[Path, Path]) -> None:
    # Given b where dir/other joins the dir/file hardlink group instead of being a copy
    a, b = twin
    os.unlink(b / "dir/other")
    os.link(b / "dir/file", b / "dir/other")
    diffs = compare_trees(a, b)
    # Then content and the changed groups of all three paths are reported
    assert "dir/other: size 6 != 8" in diffs
    assert any(d.startswith("dir/file: hardlinked with") for d in diffs)
    assert any(d.startswith("dir/file-link: hardlinked with") for d in diffs)


def test_overlay_mount_applies_whiteouts_and_unmounts_even_on_error(tmp_path: Path) -> None:
    from tests.rootfs import overlay_mount

    # Given a lower layer and an upper one in overlay's diff format
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "keep").mkdir(parents=True)
    (lower / "keep/a").write_text("a")
    (lower / "gone").write_text("gone")
    (lower / "opaque").mkdir()
    (lower / "opaque/old").write_text("old")
    upper.mkdir()
    os.mknod(upper / "gone", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    (upper / "opaque").mkdir()
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    (upper / "opaque/new").write_text("new")
    # When mounted newest first, the merged view has the whiteouts applied
    with overlay_mount([upper, lower], tmp_path / "m") as merged:
        assert sorted(os.listdir(merged)) == ["keep", "opaque"]
        assert os.listdir(merged / "opaque") == ["new"]
    assert not os.path.ismount(tmp_path / "m")
    # and a single read-only layer mounts too, and is unmounted when the body raises
    os.mknod(lower / "whiteout-alone", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    with pytest.raises(RuntimeError, match="inside"), overlay_mount([lower], tmp_path / "single") as merged:
        assert (merged / "gone").read_text() == "gone"
        assert not os.path.lexists(merged / "whiteout-alone")
        raise RuntimeError("inside")
    assert not os.path.ismount(tmp_path / "single")
    with pytest.raises(ValueError, match="does not exist"), overlay_mount([tmp_path / "missing"], tmp_path / "x"):
        pass
