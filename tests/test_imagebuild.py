"""prewarm.imagebuild and the test image catalogue, checked against real tools.

The images must be accepted by what the world uses (skopeo, umoci, the CNCF registry)
and must say what they claim (media types, diff_ids, gzip framing, tar headers), or
every pipeline test built on them proves nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from prewarm.errors import ConfigError
from prewarm.imagebuild import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    BuiltImage,
    DirLayer,
    Layer,
    Platform,
    TarEntry,
    blob_path,
    build_image,
    build_index,
    copy_image,
    push_layout,
    read_blob,
    tagged_descriptor,
)
from prewarm.resolve.registry.client import RegistryClient
from tests.images import (
    BIG_FILE,
    BIG_SIZE,
    HOSTILE_ATTACKS,
    NAME_OVER_100,
    NAME_OVER_255,
    ODD_EXPECT,
    UNICODE_NAME,
    hostile_image,
    mixed_bytes,
    odd_image,
    simple_image,
)
from tests.rootfs import overlay_layer_dirs, overlay_mount, umoci_unpack
from tests.services import Registry
from tests.treecompare import compare_trees

MiB = 1 << 20
ZTOC_THRESHOLD = 10 * MiB


def gzip_members(blob: bytes) -> list[bytes]:
    """Decompress member by member; returns each member's output."""
    out = []
    rest = blob
    while rest:
        d = zlib.decompressobj(wbits=31)
        out.append(d.decompress(rest) + d.flush())
        assert d.eof, "truncated gzip member"
        rest = d.unused_data
    return out


def uncompressed(blob: bytes, media_type: str) -> bytes:
    if media_type.endswith("+zstd"):
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    if media_type.endswith("gzip"):
        return b"".join(gzip_members(blob))
    return blob


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return odd_image(tmp_path_factory.mktemp("odd") / "layout")


@pytest.fixture(scope="module")
def odd_rootfs(odd: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return umoci_unpack(odd.layout, "odd", tmp_path_factory.mktemp("odd-umoci") / "bundle")


@pytest.fixture()
def client(registry: Registry) -> Iterator[RegistryClient]:
    c = RegistryClient(insecure_registries=frozenset({registry.host}))
    yield c
    c.close()


def manifest_of(img: BuiltImage) -> dict:
    return json.loads(read_blob(img.layout, img.manifest_digest))


# === what the blobs and configs say ==========================================


def test_odd_image_layers_have_the_promised_compression_and_media_types(odd: BuiltImage) -> None:
    # Given the odd image, when its manifest and blobs are read back
    manifest = manifest_of(odd)
    assert manifest["mediaType"] == OCI_MANIFEST
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        OCI_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD]
    blobs = [blob_path(odd.layout, layer["digest"]).read_bytes() for layer in manifest["layers"]]
    # Then every blob hashes to its descriptor and has its size
    for layer, blob in zip(manifest["layers"], blobs):
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
        assert len(blob) == layer["size"]
    # and the framing is what each layer claims
    assert len(gzip_members(blobs[1])) == 1                           # one gzip member
    assert blobs[1][3] == 0 and blobs[1][4:8] == b"\0\0\0\0"        # no FNAME etc., mtime 0
    assert len(gzip_members(blobs[2])) == 25 * MiB // MiB             # pigz: 1 MiB members (tar ~24.02 MiB)
    assert blobs[3][:3] == b"\x1f\x8b\x08" and blobs[3][3] == 0x0C    # FLG = FEXTRA | FNAME
    xlen = int.from_bytes(blobs[3][10:12], "little")
    assert blobs[3][12:12 + xlen] == b"PW\x06\x00prewrm"
    assert blobs[3][12 + xlen:].split(b"\x00", 1)[0] == b"layer.tar"
    assert gzip.decompress(blobs[3])[257:262] == b"ustar"             # stdlib gzip reads the header
    assert blobs[4][257:262] == b"ustar"                              # plain tar
    assert blobs[5][:4] == b"\x28\xb5\x2f\xfd"                        # zstd frame magic
    # and layers sit on both sides of the zTOC threshold
    sizes = [layer["size"] for layer in manifest["layers"]]
    assert sizes[1] > ZTOC_THRESHOLD and sizes[2] > ZTOC_THRESHOLD
    assert sizes[0] < ZTOC_THRESHOLD and sizes[3] < ZTOC_THRESHOLD


def test_config_diff_ids_hash_the_uncompressed_tars(odd: BuiltImage) -> None:
    manifest = manifest_of(odd)
    config = json.loads(read_blob(odd.layout, manifest["config"]["digest"]))
    # Then each diff_id is the sha256 of the layer as tar, recomputed here independently
    diff_ids = []
    for layer in manifest["layers"]:
        tar = uncompressed(blob_path(odd.layout, layer["digest"]).read_bytes(), layer["mediaType"])
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
    assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}
    assert [b.diff_id for b in odd.layers] == diff_ids
    # and the config names the host platform, with one history entry per layer
    host = Platform.host()
    assert (config["os"], config["architecture"]) == (host.os, host.architecture)
    assert len(config["history"]) == len(manifest["layers"])
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"


def test_tar_headers_use_pax_for_long_unicode_names_xattrs_and_owners(odd: BuiltImage) -> None:
    # Given the base layer's tar, read with the stdlib's tar reader
    layer = manifest_of(odd)["layers"][0]
    tar_bytes = uncompressed(blob_path(odd.layout, layer["digest"]).read_bytes(), layer["mediaType"])
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    # Then long and unicode names survive whole
    assert len(NAME_OVER_100.encode()) > 100 and len(NAME_OVER_255.encode()) > 255
    for name in (NAME_OVER_100, NAME_OVER_255, UNICODE_NAME):
        assert name in members
        assert "path" in members[name].pax_headers
    # and xattrs are SCHILY records, owners and modes as described
    assert members["etc/xattr-file"].pax_headers["SCHILY.xattr.user.comment"] == "kept by every layer format"
    notes = members["home/alice/notes.txt"]
    assert (notes.uid, notes.gid, notes.uname, notes.gname, notes.mode) == (1000, 1000, "alice", "alice", 0o600)
    assert members["usr/bin/su-like"].mode == 0o4755 and members["tmp"].mode == 0o1777
    assert members["usr/bin/su-hardlink"].islnk() and members["usr/bin/su-hardlink"].linkname == "usr/bin/su-like"
    assert (members["dev/null-like"].devmajor, members["dev/null-like"].devminor) == (1, 3)
    assert members["run/fifo"].isfifo()
    # and a plain short entry gets no PAX record at all
    assert members["etc/hostname"].pax_headers == {}
    assert {m.mtime for m in members.values()} == {1704067200}


def test_builds_are_deterministic(tmp_path: Path) -> None:
    # When the same image is built twice in two layouts
    a = simple_image(tmp_path / "a")
    b = simple_image(tmp_path / "b")
    # Then every digest is the same
    assert a.manifest_digest == b.manifest_digest
    assert [x.digest for x in a.layers] == [x.digest for x in b.layers]


# === what real tools make of them ============================================


def test_umoci_unpacks_the_odd_image_with_everything_applied(odd_rootfs: Path) -> None:
    root = odd_rootfs
    e = ODD_EXPECT
    # whiteouts and opaque directories removed what lower layers had
    for rel in e.absent:
        assert not os.path.lexists(root / rel), rel
    for rel, data in e.files.items():
        assert (root / rel).read_bytes() == data, rel
    for rel, (mode, uid, gid) in e.modes.items():
        st = os.lstat(root / rel)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid), rel
    for rel, target in e.symlinks.items():
        assert os.readlink(root / rel) == target, rel
    for group in e.hardlinks:
        assert len({os.lstat(root / rel).st_ino for rel in group}) == 1, group
    for rel, (major, minor) in e.chardevs.items():
        st = os.lstat(root / rel)
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor)
    for rel in e.fifos:
        assert stat.S_ISFIFO(os.lstat(root / rel).st_mode)
    for rel, attrs in e.xattrs.items():
        for name, value in attrs.items():
            assert os.getxattr(root / rel, name) == value, (rel, name)
    for rel in e.empty_dirs:
        assert os.listdir(root / rel) == [], rel
    for rel in e.long_names:
        assert (root / rel).is_file()
    assert (root / e.dir_became_file).is_file()
    big, size = e.big
    assert (root / big).stat().st_size == size
    assert (root / BIG_FILE).read_bytes() == mixed_bytes(BIG_SIZE, seed=40)


def test_overlay_of_layer_dirs_equals_umoci_rootfs(odd: BuiltImage, odd_rootfs: Path, tmp_path: Path) -> None:
    # Given each layer extracted alone in overlay's diff format by GNU tar
    dirs = overlay_layer_dirs(odd.layout, "odd", tmp_path / "layers")
    # When they are overlay-mounted newest first
    with overlay_mount(dirs, tmp_path / "merged") as merged:
        # Then the kernel's view equals umoci's unpack in every respect compare_trees checks
        assert compare_trees(odd_rootfs, merged) == []
    assert not os.path.ismount(tmp_path / "merged")


def test_odd_image_pushed_with_our_client_is_what_skopeo_sees(odd: BuiltImage, registry: Registry,
                                                               repo_name: str, client: RegistryClient) -> None:
    # When the layout is pushed with the project's registry client
    digest = push_layout(client, odd.layout, registry.host, repo_name, "odd")
    assert digest == odd.manifest_digest
    # Then skopeo reads the same manifest and layers back from the registry
    raw = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{registry.host}/{repo_name}:odd"],
                         check=True, capture_output=True).stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == odd.manifest_digest
    info = json.loads(subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/{repo_name}:odd"],
        check=True, capture_output=True, text=True).stdout)
    assert info["Digest"] == odd.manifest_digest
    assert info["Layers"] == [layer.digest for layer in odd.layers]
    assert (info["Os"], info["Architecture"]) == ("linux", Platform.host().architecture)


def test_skopeo_copies_the_odd_layout_with_digests_kept(odd: BuiltImage, registry: Registry, repo_name: str) -> None:
    # The layouts are ordinary OCI: skopeo's own push keeps every digest when told to
    # (by default it gzips the uncompressed layer, which changes the manifest)
    subprocess.run(["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false", f"oci:{odd.layout}:odd",
                    f"docker://{registry.host}/{repo_name}:copied"], check=True, capture_output=True)
    raw = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                          f"docker://{registry.host}/{repo_name}:copied"], check=True, capture_output=True).stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == odd.manifest_digest


def test_docker_schema2_image_pushes_and_inspects(tmp_path: Path, registry: Registry, repo_name: str,
                                                  client: RegistryClient) -> None:
    # Given the simple image with Docker media types
    img = simple_image(tmp_path / "layout", media_types="docker")
    manifest = manifest_of(img)
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert {layer["mediaType"] for layer in manifest["layers"]} == {DOCKER_LAYER_GZIP}
    # When pushed, the registry serves it under its Docker media type
    assert push_layout(client, img.layout, registry.host, repo_name, "simple") == img.manifest_digest
    info = json.loads(subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/{repo_name}:simple"],
        check=True, capture_output=True, text=True).stdout)
    assert info["Digest"] == img.manifest_digest
    raw, media_type, _ = client.get_manifest(registry.host, repo_name, "simple")
    assert media_type == DOCKER_MANIFEST
    assert json.loads(raw)["mediaType"] == DOCKER_MANIFEST


@pytest.mark.parametrize("media_types", ["oci", "docker"])
def test_multi_platform_index(tmp_path: Path, registry: Registry, repo_name: str, client: RegistryClient,
                              media_types: str) -> None:
    # Given one image per platform under one index
    host = Platform.host()
    other = Platform("linux", "s390x") if host.architecture != "s390x" else Platform("linux", "amd64")
    arm = Platform("linux", "arm", "v7")
    per_platform = {
        p: [Layer([TarEntry("platform.txt", data=str(p).encode())], "gzip")] for p in (host, other, arm)}
    built = build_index(tmp_path / "layout", per_platform, tag="multi", media_types=media_types)  # type: ignore[arg-type]
    index = json.loads(read_blob(built.layout, built.index_digest))
    assert index["mediaType"] == (OCI_INDEX if media_types == "oci" else DOCKER_LIST)
    assert [m["platform"] for m in index["manifests"]] == [
        {"architecture": host.architecture, "os": "linux"}, {"architecture": other.architecture, "os": "linux"},
        {"architecture": "arm", "os": "linux", "variant": "v7"}]
    assert tagged_descriptor(built.layout, "multi")["digest"] == built.index_digest
    # When pushed, the registry holds the index and each platform's manifest by digest
    assert push_layout(client, built.layout, registry.host, repo_name, "multi") == built.index_digest
    for img in built.images:
        body, _, _ = client.get_manifest(registry.host, repo_name, img.manifest_digest)
        config = json.loads(client.get_blob(registry.host, repo_name, json.loads(body)["config"]["digest"]))
        assert config["architecture"] == img.platform.architecture
    # and skopeo picks the host's platform from it
    info = json.loads(subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/{repo_name}:multi"],
        check=True, capture_output=True, text=True).stdout)
    assert info["Digest"] == built.index_digest and info["Architecture"] == host.architecture
    if media_types == "oci":
        # and umoci unpacks the host platform's tree (via the narrowed shadow layout)
        rootfs = umoci_unpack(built.layout, "multi", tmp_path / "bundle")
        assert (rootfs / "platform.txt").read_text() == str(host)


# === directory layers ========================================================


def test_dir_layer_round_trips_through_umoci(tmp_path: Path) -> None:
    # Given a directory with hardlinks, symlinks, a fifo, modes and a user xattr
    src = tmp_path / "src"
    (src / "pkg/sub").mkdir(parents=True)
    (src / "pkg/a.py").write_text("print('a')\n")
    os.link(src / "pkg/a.py", src / "pkg/a-link.py")
    os.symlink("a.py", src / "pkg/alias.py")
    (src / "pkg/sub/tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "pkg/sub/tool", 0o4750)
    os.mkfifo(src / "pkg/pipe")
    os.setxattr(src / "pkg/a.py", "user.note", b"from disk")
    (src / "pkg/__pycache__").mkdir()
    (src / "pkg/__pycache__/a.pyc").write_bytes(b"junk")
    # When it becomes a layer under a prefix, with __pycache__ excluded
    layer = DirLayer(src, prefix="usr/lib/app", exclude=("pkg/__pycache__",))
    img = build_image(tmp_path / "layout", [Layer(layer, "gzip", level=1)], tag="dir")
    rootfs = umoci_unpack(img.layout, "dir", tmp_path / "bundle")
    # Then umoci's tree equals the source (owners forced to root, which they already are)
    shutil_tree = tmp_path / "expected"
    subprocess.run(["cp", "-a", str(src), str(shutil_tree)], check=True)
    subprocess.run(["rm", "-r", str(shutil_tree / "pkg/__pycache__")], check=True)
    assert compare_trees(shutil_tree, rootfs / "usr/lib/app") == []
    assert sorted(os.listdir(rootfs)) == ["usr"]


def test_dir_layer_forces_owner(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    os.chown(src / "f", 1234, 5678)
    img = build_image(tmp_path / "layout", [Layer(DirLayer(src), "uncompressed")], tag="t")
    with tarfile.open(blob_path(img.layout, img.layers[0].digest)) as tar:
        assert (tar.getmember("f").uid, tar.getmember("f").gid) == (0, 0)
    img2 = build_image(tmp_path / "layout2", [Layer(DirLayer(src, owner=None), "uncompressed")], tag="t")
    with tarfile.open(blob_path(img2.layout, img2.layers[0].digest)) as tar:
        assert (tar.getmember("f").uid, tar.getmember("f").gid) == (1234, 5678)


# === hostile layers ==========================================================


def test_hostile_layers_carry_their_attacks_verbatim(tmp_path: Path) -> None:
    # The store's safety tests need the names exactly as crafted, not sanitised
    expected = {
        "dotdot": "../x", "dotdot-nested": "a/../../x", "absolute": "/etc/x",
        "symlink-escape": "link/file", "symlink-relative-escape": "up/outside-file",
        "symlink-overwrite": "victim", "hardlink-escape": "hl", "hardlink-absolute": "hl-passwd",
    }
    assert set(HOSTILE_ATTACKS) == set(expected)
    for attack in HOSTILE_ATTACKS:
        img = hostile_image(tmp_path / "layout", attack)
        blob = blob_path(img.layout, img.layers[1].digest)
        with tarfile.open(blob) as tar:
            names = tar.getnames()
            assert names[-1] == expected[attack], attack
            if attack == "hardlink-escape":
                assert tar.getmember("hl").linkname == "../../outside"
            if attack == "symlink-escape":
                assert tar.getmember("link").linkname == "/tmp/outside"


# === bad input ===============================================================


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": []}, "at least one layer"),
    ({"tag": "bad tag!"}, "not a valid tag"),
    ({"media_types": "podman"}, "use 'oci' or 'docker'"),
    ({"layers": [Layer([TarEntry("f")], "lz4")]}, "unknown compression 'lz4'"),  # type: ignore[arg-type]
    ({"layers": [Layer([TarEntry("f")], "gzip", level=11)]}, "gzip level 11 is outside 0-9"),
    ({"layers": [Layer([TarEntry("f")], "zstd")], "media_types": "docker"}, "Docker schema-2 has no media type"),
    ({"layers": [Layer([TarEntry("l", "symlink")])]}, "a symlink needs a linkname"),
    ({"layers": [Layer([TarEntry("x", "socket")])]}, "unknown type 'socket'"),  # type: ignore[arg-type]
    ({"layers": [Layer(DirLayer(Path("/nonexistent/dir")))]}, "/nonexistent/dir does not exist"),
    ({"layers": [Layer([TarEntry("f", data=Path("/nonexistent/file"))])]}, "cannot read its data file"),
    ({"layers": [Layer([TarEntry("f", xattrs={"user.bin": b"\xff\xfe"})])]}, "xattr values must be UTF-8"),
])
def test_bad_descriptions_are_config_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"layers": [Layer([TarEntry("f", data=b"x")])], **kwargs}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_image(tmp_path / "layout", args.pop("layers"), **args)


def test_unknown_tag_names_the_tags_there(tmp_path: Path, client: RegistryClient, registry: Registry) -> None:
    simple_image(tmp_path / "layout", tag="one")
    with pytest.raises(ConfigError, match=r"has no tag 'two' \(tags: one\)"):
        push_layout(client, tmp_path / "layout", registry.host, "test/unknown-tag", "two")
    with pytest.raises(ConfigError, match="not an OCI image layout"):
        tagged_descriptor(tmp_path / "nothing", "one")


# === copies of built images ==================================================


def test_odd_image_is_built_once_and_hardlinked_into_each_layout(odd: BuiltImage, tmp_path: Path) -> None:
    # When a second layout asks for the odd image under another tag
    again = odd_image(tmp_path / "again", tag="second")
    # Then it is the same image, its blobs shared with the first copy, tagged as asked
    assert again.manifest_digest == odd.manifest_digest
    assert tagged_descriptor(again.layout, "second")["digest"] == odd.manifest_digest
    for layer in odd.layers:
        assert blob_path(again.layout, layer.digest).stat().st_ino == blob_path(odd.layout, layer.digest).stat().st_ino
    # and umoci reads the copy
    rootfs = umoci_unpack(again.layout, "second", tmp_path / "bundle")
    assert (rootfs / "etc/hostname").read_bytes() == b"odd\n"


def test_copy_image_copies_an_index_with_every_platform(tmp_path: Path) -> None:
    per_platform = {p: [Layer([TarEntry("p", data=str(p).encode())])]
                    for p in (Platform("linux", "amd64"), Platform("linux", "arm64"))}
    built = build_index(tmp_path / "src", per_platform, tag="multi")
    copy_image(built.layout, "multi", tmp_path / "dst", "copied")
    for img in built.images:
        for digest in (img.manifest_digest, img.config_digest, *(layer.digest for layer in img.layers)):
            assert blob_path(tmp_path / "dst", digest).is_file()
    with pytest.raises(ConfigError, match="no tag 'nope'"):
        copy_image(built.layout, "nope", tmp_path / "dst2", "x")


# === the bench images ========================================================


def test_demo_layers_split_site_packages_in_two_disjoint_halves() -> None:
    import sysconfig

    from bench.demo import demo_layers

    # Given the demo's layers, described but not built
    stdlib, first, second = demo_layers()
    site = Path(sysconfig.get_paths()["purelib"])
    assert isinstance(first.content, DirLayer) and isinstance(second.content, DirLayer)
    assert isinstance(stdlib.content, DirLayer) and (stdlib.content.root / "os.py").is_file()
    # Then each package is in exactly one of the two package layers
    names = {n for n in os.listdir(site) if not n.startswith("__editable__") and n != "__pycache__"}
    in_first = names - set(first.content.exclude)
    in_second = names - set(second.content.exclude)
    assert in_first and in_second
    assert in_first.isdisjoint(in_second) and in_first | in_second == names
    assert first.content.root == second.content.root == site


def test_cached_ai_image_is_reused_and_pushed(tmp_path: Path, registry: Registry) -> None:
    from bench import images as bench_images

    # Given a cache that already holds a complete layout (and a torch directory)
    cache = tmp_path / "cache"
    (cache / bench_images.TORCH_DIR_NAME).mkdir(parents=True)
    assert bench_images.install_torch(cache) == cache / bench_images.TORCH_DIR_NAME
    img = simple_image(cache / bench_images.LAYOUT_NAME, tag=bench_images.TAG)
    (cache / bench_images.LAYOUT_NAME / "complete").write_text(img.manifest_digest)
    # When the benchmark asks for its image, nothing is rebuilt
    layout = bench_images.build_ai_image(cache)
    assert layout == cache / bench_images.LAYOUT_NAME
    # and pushing gives the reference and layers the benchmark runner reads
    ref, layers = bench_images.push_ai_image(layout, registry)
    assert ref == f"{registry.host}/bench/ai:latest"
    assert layers == [(x.digest, x.size, x.media_type) for x in img.layers]
    info = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["Digest"] == img.manifest_digest


def test_demo_runs_end_to_end_on_a_small_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.demo import run
    from tests.images import simple_layers

    # When the README demo runs (own registry, push, prewarm schedule, overlay-vs-umoci)
    # on the small image instead of the few hundred MB of Python files
    rc = run(tmp_path, verify=True, layers=simple_layers())
    out = capsys.readouterr().out
    # Then it succeeds, and says the pre-warmed tree is umoci's
    assert rc == 0, out
    assert "rootfs     identical to `umoci unpack`" in out
    assert "lowerdir=" in out


def test_umoci_unpack_reads_docker_schema2_layouts_like_oci_ones(tmp_path: Path) -> None:
    # Given the simple image in both media-type flavours
    docker = simple_image(tmp_path / "docker", media_types="docker")
    oci = simple_image(tmp_path / "oci")
    assert docker.manifest_digest != oci.manifest_digest
    # When both are unpacked (the Docker one through the renamed shadow layout)
    a = umoci_unpack(docker.layout, "simple", tmp_path / "a")
    b = umoci_unpack(oci.layout, "simple", tmp_path / "b")
    # Then the trees are the same, with the top layer's whiteout applied
    assert compare_trees(a, b) == []
    assert not (a / "etc/old.conf").exists() and (a / "etc/new.conf").is_file()
