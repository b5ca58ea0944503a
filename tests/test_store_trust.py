"""The store's trust boundary: what an image's layer may put on the node, and who may reach it.

Layers come from untrusted registries and land through the real paths (whole layers through
``ingest_stream``, spans through ``prepare_layer``/``land_span`` with a zTOC built over the
tar, with the C landing and the Python reference); what they leave is read back from disk.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from prewarm.store.content import ContentStore
from tests.test_store import GZIP, _add, sha

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def _tar(build) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        build(tf)
    return buf.getvalue()


def ingest(store: ContentStore, tar: bytes) -> Path:
    """Stream ``tar`` (gzipped) into ``store`` as a whole layer; its ``fs`` directory."""
    blob = gzip.compress(tar, mtime=0)
    store.ingest_stream(sha(blob), iter([blob]), media_type=GZIP, diff_id=sha(tar))
    return store.layout.layer_fs(sha(blob))


# === item 2: the store root is private to its owner


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is already private to root)."""
    d = Path(tempfile.mkdtemp(prefix="prewarm-trust-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to land a setuid-root file and to become nobody")
def test_an_images_setuid_binary_is_out_of_reach_of_other_users(open_dir: Path) -> None:
    # Given a store whose layer holds a setuid-root copy of cat
    cat = Path("/bin/cat").read_bytes()
    store = ContentStore(open_dir / "root")
    fs = ingest(store, _tar(lambda tf: (_add(tf, "bin/", tarfile.DIRTYPE, mode=0o755),
                                        _add(tf, "bin/cat", data=cat, mode=0o4755))))
    target = fs / "bin" / "cat"
    assert os.stat(target).st_mode & 0o7777 == 0o4755 and os.stat(target).st_uid == 0
    # When another local user tries to reach it (stat it, and run it)
    probe = ("import errno, os, sys\n"
             "try:\n    os.stat(sys.argv[1])\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n"
             "else:\n    print('reached')\n")
    reached = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", probe, str(target)], capture_output=True,
                             text=True, check=True)
    # (through a shell: setpriv itself looks its command up before it drops root)
    run = subprocess.run([*NOBODY, "/bin/sh", "-c", 'exec "$0" /dev/null', str(target)], capture_output=True,
                         text=True)
    # Then the store root stops them: EACCES, and the binary never runs
    assert reached.stdout.strip() == "EACCES"
    assert run.returncode != 0 and "Permission denied" in run.stderr
    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700


def test_an_existing_open_store_root_is_made_private_at_start_up(tmp_path: Path) -> None:
    # Given a store root that an older prewarm left 0755 (and one that does not exist yet)
    root = tmp_path / "root"
    root.mkdir()
    os.chmod(root, 0o755)
    # When the store is opened on them
    ContentStore(root)
    ContentStore(tmp_path / "new" / "root")
    # Then both are 0700
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "root").st_mode) == 0o700
