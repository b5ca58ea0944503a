"""Store failures end in one clear line and exit 7; a corrupt record never takes a command down (issue 19 items 1-3).

Real stores: a regular file where the root should be (as PREWARM_ROOT and as --root alike),
a read-only bind mount, and a corrupt image record beside a good one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containerd import install_prewarmed, make_layer
from tests.pipeline_helpers import REPO_ROOT, clean_env

COMMANDS = {
    "images": ["images"],
    "mounts": ["mounts", "reg.example/app:1", "/mnt/x"],
    "rm": ["rm", "reg.example/app:1"],
    "gc": ["gc"],
    "status": ["status"],
    "schedule": ["schedule", "127.0.0.1:1/app:1", "--wait"],
}
WRITERS = {"rm", "gc", "schedule"}


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prewarm", *args], env=env, capture_output=True, text=True, check=False,
                          timeout=timeout, cwd=REPO_ROOT)


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("given", ["env", "flag"])
def test_a_regular_file_as_the_root_is_a_store_error_however_it_is_given(tmp_path: Path, command: str,
                                                                        given: str) -> None:
    root = tmp_path / "not-a-dir"
    root.write_text("x")
    env = clean_env(tmp_path / "unused")
    args = COMMANDS[command]
    if given == "env":
        env["PREWARM_ROOT"] = str(root)
    else:
        args = [*args, "--root", str(root)]
    proc = _run(args, env)
    assert proc.returncode == 7, (proc.returncode, proc.stderr)
    line = _one_line(proc)
    assert str(root) in line and "not a directory" in line
    assert root.read_text() == "x"


@pytest.fixture()
def read_only_store(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "store"
    root.mkdir()
    subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_a_read_only_store_stops_a_writing_command_before_it_starts(tmp_path: Path, read_only_store: Path,
                                                                   command: str) -> None:
    proc = _run(COMMANDS[command], clean_env(read_only_store))
    assert proc.returncode == 7, (proc.returncode, proc.stderr)
    line = _one_line(proc)
    assert str(read_only_store) in line and "not writable" in line


def test_a_worker_on_a_read_only_store_refuses_to_start(tmp_path: Path, read_only_store: Path,
                                                        redis_url: str) -> None:
    env = clean_env(read_only_store, PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME="ro")
    proc = _run(["worker", "-c", "1"], env, timeout=120)
    assert proc.returncode == 7, (proc.returncode, proc.stderr[-2000:])
    assert "not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_a_corrupt_image_record_is_skipped_by_listings_and_named_when_asked_for(tmp_path: Path) -> None:
    root = tmp_path / "store"
    layer = make_layer({"etc/a": b"a\n"})
    install_prewarmed(root, [layer])
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    good = {"name": "reg.example/good:1", "reference": "reg.example/good@sha256:" + "1" * 64,
            "manifest_digest": "sha256:" + "1" * 64, "config_digest": "sha256:" + "2" * 64, "platform": "",
            "layer_digests": [layer.digest], "diff_ids": [layer.diff_id], "sizes": [1], "created": 0.0}
    from prewarm.store.layout import Layout

    Layout(root).image(good["name"]).write_text(json.dumps(good))
    bad = images / "0000-corrupt.json"
    bad.write_text('{"name": "reg.example/bad:1", "layer_digests": ["' + layer.digest + '"')  # cut short
    env = clean_env(root)
    # Then images lists the good one and warns, naming the corrupt file
    listed = _run(["images", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    assert [r["name"] for r in json.loads(listed.stdout)] == ["reg.example/good:1"]
    assert str(bad) in listed.stderr
    # And gc keeps the layer the corrupt record still names
    gc = _run(["gc"], env)
    assert gc.returncode == 0 and "nothing to remove" in gc.stdout, (gc.stdout, gc.stderr)
    # And rm of the good image works beside it
    rm = _run(["rm", "reg.example/good:1"], env)
    assert rm.returncode == 0, rm.stderr


@pytest.fixture()
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "store"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def fill(root: Path) -> None:
    """Write a file in ``root`` until its filesystem answers ENOSPC."""
    import errno

    with open(root / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC, err


def _plan(name: str, layers: list) -> object:  # type: ignore[type-arg]
    from prewarm.fleet.plan import ImagePlan, LayerPlan

    plans = tuple(LayerPlan(layer.digest, len(layer.blob), "application/vnd.oci.image.layer.v1.tar+gzip",
                            layer.diff_id, "whole", 1) for layer in layers)
    return ImagePlan(name, "sha256:" + "4" * 64, "sha256:" + "5" * 64, plans, tuple(range(len(plans))),
                     tuple(layer.diff_id for layer in layers))


def test_a_record_that_cannot_be_written_leaves_the_store_as_before_the_job(small_tmpfs: Path) -> None:
    from prewarm.errors import InsufficientSpace
    from prewarm.node.local import StoreBefore
    from prewarm.runtime.images import find_record, list_records, record_prewarmed_image
    from prewarm.store.content import ContentStore
    from prewarm.store.layout import Layout

    root, layout = small_tmpfs, Layout(small_tmpfs)
    # Given a store on a small tmpfs holding one pre-warmed image
    old = make_layer({"etc/old": b"old\n"})
    install_prewarmed(root, [old])
    record_prewarmed_image(layout, "reg.example/old:1", _plan("reg.example/old:1", [old]))  # type: ignore[arg-type]
    before = StoreBefore(root, "reg.example/new:1", frozenset(ContentStore(root).list_layers()), recorded=False)
    # And a job that made its layer ready, after which the disk filled up
    new = make_layer({"etc/new": b"new\n"})
    install_prewarmed(root, [new])
    fill(root)
    # When the job writes its image record
    with pytest.raises(InsufficientSpace) as err:
        record_prewarmed_image(layout, "reg.example/new:1", _plan("reg.example/new:1", [new]))  # type: ignore[arg-type]
    # Then the error names the store and the record, and no half-written file is left
    assert str(root) in str(err.value) and str(layout.image("reg.example/new:1")) in str(err.value)
    assert sorted(p.name for p in layout.images_dir().iterdir()) == [layout.image("reg.example/old:1").name]
    # And the job takes back what it added: its layer and chains go, the older image stays whole
    raised = before.restore("job-1", err.value)
    assert isinstance(raised, InsufficientSpace)
    assert set(ContentStore(root).list_layers()) == {old.digest}
    assert [r.name for r in list_records(layout)] == ["reg.example/old:1"]
    assert find_record(layout, "reg.example/new:1") is None
    chains = [json.loads(p.read_text())["layer_digest"] for p in layout.chains_dir().rglob("*.json")]
    assert chains == [old.digest]


def test_temp_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    from prewarm.store.atomic import atomic_write, remove_orphaned_temps
    from prewarm.store.layout import Layout

    layout = Layout(tmp_path)
    atomic_write(layout.pins_dir() / "job.json", b"[]")
    # Given a temp file of a writer that was killed before its rename, and one of a live writer
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = layout.pins_dir() / f".job.json.{dead.pid}-abcd1234"
    live = layout.pins_dir() / f".job.json.{os.getpid()}-efgh5678"
    orphan.write_bytes(b"[")
    live.write_bytes(b"[")
    # When the store's record folders are swept
    removed = remove_orphaned_temps(layout.record_folders())
    # Then only the dead writer's litter goes; the record is untouched
    assert removed == [orphan] and live.exists() and (layout.pins_dir() / "job.json").read_bytes() == b"[]"


def test_an_embedded_job_whose_record_cannot_be_written_takes_back_its_layers(tmp_path: Path,
                                                                             registry) -> None:  # type: ignore[no-untyped-def]
    from prewarm.store.content import ContentStore
    from prewarm.store.layout import Layout
    from tests.images import simple_image
    from tests.pipeline_helpers import push

    ref = push(simple_image(tmp_path / "oci"), registry, "store-errors/rollback")
    root = tmp_path / "store"
    root.mkdir(mode=0o700)
    # Given a store where the job's summary cannot be written (its folder's name taken by a file),
    # which stands in for any record write failing after the layers are ready
    (root / "jobs").write_text("not a folder")
    env = clean_env(root)
    # When an embedded job pre-warms an image into it
    proc = _run(["schedule", ref, "--wait", "--quiet", "--insecure-registry", registry.host], env, timeout=120)
    # Then it fails with the store's code, in one line naming the record it could not write
    assert proc.returncode == 7, (proc.returncode, proc.stderr[-3000:])
    line = _one_line(proc)
    assert str(root / "jobs") in line and "nothing of this job was kept" in line
    # And the store is as before the job: no layer, ready or not, no image record, no chain
    assert ContentStore(root).list_layers() == []
    assert not list(Layout(root).images_dir().glob("*.json"))
    assert not list(Layout(root).chains_dir().rglob("*.json"))
    # And once the folder is free again the image is pre-warmed in full
    (root / "jobs").unlink()
    again = _run(["schedule", ref, "--wait", "--quiet", "--json", "--insecure-registry", registry.host], env,
                 timeout=120)
    assert again.returncode == 0 and json.loads(again.stdout)["state"] == "succeeded", again.stderr


def test_a_whole_layer_of_small_files_that_fills_the_disk_is_insufficient_space_and_discarded(
        small_tmpfs: Path) -> None:
    import gzip
    import hashlib
    import io
    import tarfile

    from prewarm.errors import InsufficientSpace
    from prewarm.store.content import ContentStore

    # Given a store on a 4 MiB tmpfs and a layer of 3,000 small files (12 MB) that gzip shrinks to little
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for d in range(3):
            info = tarfile.TarInfo(f"d{d}")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
            for i in range(1000):
                data = b"%d %d\n" % (d, i) * 800
                info = tarfile.TarInfo(f"d{d}/f{i}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    tar = buf.getvalue()
    blob = gzip.compress(tar, mtime=0)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    store = ContentStore(small_tmpfs)
    # When it is streamed in (its small files are created by the landing's creating thread)
    with pytest.raises(InsufficientSpace) as err:
        store.ingest_stream(digest, [blob[i:i + 65536] for i in range(0, len(blob), 65536)],
                            media_type="application/vnd.oci.image.layer.v1.tar+gzip",
                            diff_id="sha256:" + hashlib.sha256(tar).hexdigest())
    # Then the error names the store, and nothing of the layer is left
    assert str(small_tmpfs) in str(err.value)
    assert store.layer_state(digest) == "absent"
    assert not store.layout.layer_fs(digest).exists() and not store.layout.layer_work(digest).exists()
