"""``prewarm ztoc build|info|verify``: build, inspect and check single zTOCs.

For people who debug indexes: ``build`` indexes a local layer file the way soci does
(same bytes as soci's builder for the same span size and identifier), ``info`` shows
what a zTOC holds (like ``soci ztoc info``; ``--json`` for scripts), and ``verify``
checks a zTOC against a layer span by span and exits non-zero naming the first
mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from prewarm.errors import BadZtoc, ConfigError


@click.group("ztoc")
def ztoc_group() -> None:
    """Build, inspect and verify SOCI zTOCs."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from err


def _load(path: Path) -> Any:
    from prewarm.index.ztoc import parse_ztoc

    data = _read(path, "zTOC")
    try:
        return parse_ztoc(data), len(data)
    except BadZtoc as err:
        raise BadZtoc(f"{path} is not a valid zTOC: {err}") from err


@ztoc_group.command("build")
@click.argument("layer", type=click.Path(path_type=Path))
@click.option("--span-size", type=click.IntRange(min=1),
              help="Uncompressed bytes per span (default PREWARM_SPAN_SIZE or 4 MiB).")
@click.option("--build-tool-identifier", help="Written into the zTOC (default 'prewarm').")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the zTOC.")
def build_cmd(layer: Path, span_size: int | None, build_tool_identifier: str | None,
              output: Path) -> None:
    """Build the zTOC of LAYER (a .tar.gz or .tar file), reading it once."""
    from prewarm.cli._common import settings_from
    from prewarm.config import BUILD_TOOL_IDENTIFIER
    from prewarm.index.ztoc_build import build_ztoc_file_from_file

    size = span_size or settings_from().span_size
    # built on disk beside OUTPUT (temporary files, then a rename): memory stays flat at any file count
    made = build_ztoc_file_from_file(layer, output, span_size=size,
                                     build_tool_identifier=build_tool_identifier or BUILD_TOOL_IDENTIFIER)
    click.echo(f"{output}: {made.digest} ({made.size} bytes, {made.num_spans} spans, "
               f"{made.num_files} files, span size {size})")


def _shown(text: str) -> str:
    """``text`` printable: bytes that are not UTF-8 (kept as surrogates) become ``\\xNN``.

    Why: a zTOC's strings are raw bytes from the image; printing a surrogate would stop
    the command with UnicodeEncodeError instead of showing the zTOC.
    """
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _info(z: Any, size: int) -> dict[str, Any]:
    spans = []
    for i in range(z.num_spans):
        s = z.span(i)
        entry: dict[str, Any] = {
            "span": i, "compressed_start": s.compressed_start,
            "compressed_end": s.compressed_end, "uncompressed_start": s.uncompressed_start,
            "uncompressed_end": s.uncompressed_end, "digest": s.digest,
        }
        if s.checkpoint is not None:
            entry["checkpoint"] = {"compressed_offset": s.checkpoint.compressed_offset,
                                   "uncompressed_offset": s.checkpoint.uncompressed_offset,
                                   "bits": s.checkpoint.bits}
        spans.append(entry)
    files = []
    multi = 0
    for f in z.files:
        start = z.span_for_offset(f.uncompressed_offset) if f.uncompressed_offset < \
            z.uncompressed_archive_size else z.num_spans - 1
        end_at = f.uncompressed_offset + max(f.uncompressed_size, 1) - 1
        end = z.span_for_offset(end_at) if end_at < z.uncompressed_archive_size else start
        multi += end != start
        files.append({"filename": _shown(f.name), "type": f.type, "offset": f.uncompressed_offset,
                      "size": f.uncompressed_size, "start_span": start, "end_span": end,
                      "mode": f.mode, "uid": f.uid, "gid": f.gid, "linkname": _shown(f.linkname),
                      "mod_time": _shown(f.mod_time),
                      "xattrs": {_shown(k): _shown(v) for k, v in f.xattrs}})
    return {
        "version": _shown(z.version), "build_tool": _shown(z.build_tool_identifier), "size": size,
        "compression": z.compression, "compressed_archive_size": z.compressed_archive_size,
        "uncompressed_archive_size": z.uncompressed_archive_size, "span_size": z.span_size,
        "num_spans": z.num_spans, "num_files": len(z.files), "num_multi_span_files": multi,
        "legacy_checkpoints": z.legacy_checkpoints, "spans": spans, "files": files,
    }


@ztoc_group.command("info")
@click.argument("ztoc", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def info_cmd(ztoc: Path, as_json: bool) -> None:
    """Show a zTOC's spans, checkpoints and files."""
    z, size = _load(ztoc)
    info = _info(z, size)
    if as_json:
        click.echo(json.dumps(info, indent=2, ensure_ascii=False))
        return
    for key in ("version", "build_tool", "size", "compression", "compressed_archive_size",
                "uncompressed_archive_size", "span_size", "num_spans", "num_files",
                "num_multi_span_files"):
        click.echo(f"{key}: {info[key]}")
    click.echo("")
    click.echo(f"{'SPAN':>5} {'COMPRESSED':>25} {'UNCOMPRESSED':>25} {'BITS':>4}  DIGEST")
    for s in info["spans"]:
        bits = s["checkpoint"]["bits"] if "checkpoint" in s else "-"
        click.echo(f"{s['span']:>5} {s['compressed_start']:>12}-{s['compressed_end']:<12} "
                   f"{s['uncompressed_start']:>12}-{s['uncompressed_end']:<12} {bits:>4}  "
                   f"{s['digest']}")
    click.echo("")
    click.echo(f"{'TYPE':<8} {'OFFSET':>12} {'SIZE':>12} {'SPANS':>11}  NAME")
    for f in info["files"]:
        spans = f"{f['start_span']}-{f['end_span']}"
        link = f" -> {f['linkname']}" if f["linkname"] else ""
        click.echo(f"{f['type']:<8} {f['offset']:>12} {f['size']:>12} {spans:>11}  "
                   f"{f['filename']}{link}")


@ztoc_group.command("verify")
@click.argument("ztoc", type=click.Path(path_type=Path))
@click.argument("layer", type=click.Path(path_type=Path))
def verify_cmd(ztoc: Path, layer: Path) -> None:
    """Check ZTOC against LAYER: span digests, inflation from each checkpoint, the TOC."""
    from prewarm.index.ztoc_build import verify_ztoc

    z, _ = _load(ztoc)
    spans = verify_ztoc(z, layer)
    click.echo(f"{ztoc}: OK for {layer} ({spans} spans, {len(z.files)} files)")


def register(main: click.Group) -> None:
    main.add_command(ztoc_group, "ztoc")
