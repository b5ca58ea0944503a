"""``prewarm index IMAGE``: build the zTOCs of an image's layers and push a SOCI index.

Layers are streamed from the registry in parallel, each read once; layers under
``--min-layer-size`` and zstd layers get no zTOC (as soci leaves them).  Each zTOC is
built on disk, in memory that does not grow with the layer's file count (a temporary
folder in ``TMPDIR``, or ``--output``).  With ``--push`` the zTOCs and a SOCI index v1
(subject = the image manifest) are pushed to the image's repository and listed under
the referrers fallback tag; the image itself is not changed.  ``--output DIR`` keeps the
zTOCs as files for ``prewarm ztoc info``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import click

from prewarm.cli._common import registry_options, settings_from


@click.command()
@click.argument("image")
@click.option("--span-size", metavar="BYTES", help="Uncompressed bytes per span (default PREWARM_SPAN_SIZE or 4 MiB).")
@click.option("--min-layer-size", metavar="BYTES",
              help="Layers smaller than this get no zTOC (default PREWARM_MIN_LAYER_SIZE or 10 MiB).")
@click.option("--push", is_flag=True, help="Push the zTOCs and a SOCI index v1 to the image's repository.")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Platform to index (default: this host's).")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Layers built in parallel.")
@click.option("--build-tool-identifier", help="Written into the zTOCs and the index (default 'prewarm').")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Also write each zTOC to DIR/<layer hex>.ztoc.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@registry_options
def index_cmd(image: str, span_size: str | None, min_layer_size: str | None, push: bool, platform: str | None,
              jobs: int, build_tool_identifier: str | None, output: Path | None, as_json: bool,
              **flags: Any) -> None:
    """Build zTOCs for IMAGE's layers; with --push, publish them as a SOCI index."""
    from prewarm.config import BUILD_TOOL_IDENTIFIER, whole_number
    from prewarm.errors import ConfigError
    from prewarm.index.soci import build_layer_ztocs, push_soci_index
    from prewarm.resolve.reference import parse_reference
    from prewarm.resolve.registry.client import RegistryClient

    # the converter of PREWARM_SPAN_SIZE and PREWARM_MIN_LAYER_SIZE: the same bounds and message
    settings = settings_from(span_size=whole_number(span_size, "--span-size") if span_size else None,
                             min_layer_size=whole_number(min_layer_size, "--min-layer-size")
                             if min_layer_size else None, **flags)
    tool = build_tool_identifier or BUILD_TOOL_IDENTIFIER
    ref = parse_reference(image)
    client = RegistryClient.from_settings(settings)
    resolved = client.resolve(ref, platform or settings.platform)
    # the zTOCs are built on disk (bounded memory at any file count): into --output, or a
    # temporary folder that goes once they are pushed
    with contextlib.ExitStack() as stack:
        if output is not None:
            try:
                output.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"cannot create --output folder {output}: {err.strerror or err}") from err
            into = output
        else:
            into = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="prewarm-index-")))
        built = build_layer_ztocs(client, resolved, into=into, span_size=settings.span_size,
                                  min_layer_size=settings.min_layer_size, build_tool_identifier=tool, workers=jobs)
        index_digest = None
        if push and built.ztocs:
            index_digest = push_soci_index(client, resolved, {layer: z.path for layer, z in built.ztocs.items()},
                                           settings.span_size, tool)
    if as_json:
        click.echo(json.dumps({
            "image": str(ref), "manifest_digest": resolved.manifest_digest, "span_size": settings.span_size,
            "ztocs": {layer: {"digest": z.digest, "size": z.size} for layer, z in built.ztocs.items()},
            "skipped": built.skipped, "soci_index": index_digest,
        }, indent=2))
    else:
        click.echo(f"{ref} ({resolved.manifest_digest}, {resolved.platform})")
        for desc in resolved.layers:
            if desc.digest in built.ztocs:
                z = built.ztocs[desc.digest]
                click.echo(f"  {desc.digest}  zTOC {z.digest} ({z.size} bytes)")
            else:
                click.echo(f"  {desc.digest}  no zTOC: {built.skipped.get(desc.digest, 'duplicate layer')}")
        if index_digest:
            click.echo(f"pushed SOCI index {index_digest}")
        elif push:
            click.echo("nothing to push: no layer was indexed")
        else:
            click.echo("not pushed (use --push to publish the SOCI index)")


def register(main: click.Group) -> None:
    main.add_command(index_cmd, "index")
