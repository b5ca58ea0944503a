"""The skeleton C makes (``_landing.skeleton_nodes``) is the tree the Python skeleton makes.

``ContentStore.prepare_layer`` makes a layer's directories, empty files and symlinks on
fresh paths in C, and hands every other entry (replaced paths, hard links, whiteouts,
devices, a parent that is missing or a symlink) back to the Python ``LayerWriter``.
Generated archives (odd names, whiteouts, hard links, replaced paths, symlinks under
later entries' paths) are prepared both ways on the same zTOC: the trees are equal node
by node, or both ways refuse the layer with the same error.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prewarm.errors import PrewarmError
from prewarm.index.ztoc import FileEntry
from prewarm.store import landing
from prewarm.store.content import ContentStore
from prewarm.store.layerfs import LayerWriter
from tests.test_table_c import _archives, _parsed, _plain_layer, _replace

DIGEST = "sha256:" + "cd" * 32


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every node under ``root``: its type, permission bits, size (files), target (links), device."""
    out: dict[str, tuple[object, ...]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            out[str(path.relative_to(root))] = (
                kind, stat.S_IMODE(st.st_mode), st.st_size if stat.S_ISREG(kind) else None,
                os.readlink(path) if stat.S_ISLNK(kind) else None, st.st_rdev)
    return out


def _prepare(files: list[FileEntry], c: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[object, ...]] | str:
    """The layer's tree once prepared (before any span), or the error that refused it."""
    with tempfile.TemporaryDirectory() as folder, monkeypatch.context() as m:
        if not c:  # the Python reference, as PREWARM_LANDING=python gives it
            m.setattr(landing, "backend", lambda: None)
        store = ContentStore(Path(folder) / "store")
        try:
            store.prepare_layer(DIGEST, _parsed(files))
        except PrewarmError as err:
            return f"{type(err).__name__}: {err}"
        return _tree(store.layout.layer_fs(DIGEST))


@st.composite
def _layers(draw: st.DrawFn) -> list[FileEntry]:
    """Layers most of which a checker accepts: few names, so paths repeat (a directory over a
    file, a file over a symlink), symlinks under later entries' paths, links, whiteouts."""
    out = []
    for _ in range(draw(st.integers(min_value=1, max_value=30))):
        parts = draw(st.lists(st.sampled_from(["a", "b", "c", "é", ".wh.a", ".wh..wh..opq"]), min_size=1,
                              max_size=3))
        name = "/".join(parts) + draw(st.sampled_from(["", "", "/"]))
        type_ = draw(st.sampled_from(["reg", "reg", "dir", "dir", "dir", "symlink", "hardlink", "fifo"]))
        link = {"symlink": draw(st.sampled_from(["a", "b/c", "../x", "/etc"])),
                "hardlink": draw(st.sampled_from(["a", "a/b", "b", "c/a"]))}.get(type_, "")
        size = draw(st.sampled_from([0, 0, 1, 3000])) if type_ == "reg" else 0
        out.append(FileEntry(name=name, type=type_, uncompressed_offset=0, uncompressed_size=size, linkname=link,
                             mode=0o755, uid=0, gid=0, mod_time="2024-01-02T03:04:05Z"))
    at, placed = 0, []
    for e in out:
        at += 512
        placed.append(_replace(e, at))
        at += e.uncompressed_size + (-e.uncompressed_size & 511)
    return placed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.one_of(_layers(), _archives()))
def test_c_and_python_make_the_same_skeleton_or_refuse_the_same(files: list[FileEntry],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert _prepare(files, True, monkeypatch) == _prepare(files, False, monkeypatch)


def test_c_makes_a_plain_layers_skeleton_and_hands_back_only_what_it_does_not_make(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert landing.backend() is not None, "the C extension is not built"
    # Given a layer of every common kind of entry (directory, files, empty file, symlink,
    # hard link, long PAX name, xattrs, whiteout, fifo)
    files = _plain_layer()
    handed: list[str] = []
    create = LayerWriter.create

    def counted(self: LayerWriter, entry: FileEntry, placement: object) -> None:
        handed.append(entry.name)
        create(self, entry, placement)  # type: ignore[arg-type]

    monkeypatch.setattr(LayerWriter, "create", counted)
    monkeypatch.setattr(LayerWriter, "make_parent", lambda *a: handed.append("parent of " + a[1]))
    # When it is prepared
    store = ContentStore(tmp_path / "store")
    store.prepare_layer(DIGEST, _parsed(files))
    # Then Python made only the hard link, the whiteout and the fifo: C made the directory,
    # the empty file and the symlink, and found the born files' directory there
    assert handed == ["d/h", "./d/.wh.gone", "d/f"]
    fs = store.layout.layer_fs(DIGEST)
    assert (fs / "d").is_dir() and not (fs / "d").is_symlink()
    assert os.readlink(fs / "d" / "s") == "a"
    assert (fs / "d" / "e").stat().st_size == 0
    monkeypatch.undo()
    assert _tree(fs) == _prepare(files, False, pytest.MonkeyPatch())
