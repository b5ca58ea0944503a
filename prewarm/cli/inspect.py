"""``prewarm inspect IMAGE``: what an image reference resolves to, and whether it has a SOCI index.

This is the quickest way to check that a node can reach and authenticate to a
registry: it resolves the reference exactly as a pre-warm would (platform choice,
digests checked) and prints the manifest, config and layers.  Unknown images,
refused credentials, unreachable registries and malformed references end in one line
and a non-zero exit code (1 for not found), never a traceback.
"""

from __future__ import annotations

import json
from typing import Any

import click

from prewarm.cli._common import registry_options, settings_from


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@click.command()
@click.argument("image")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Platform to resolve (default: this host's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--no-soci", is_flag=True, help="Do not look for a SOCI index.")
@registry_options
def inspect_cmd(image: str, platform: str | None, as_json: bool, no_soci: bool, **flags: Any) -> None:
    """Resolve IMAGE and print its digest, platform, config and layers."""
    from prewarm.index.soci import find_soci_index, index_summary
    from prewarm.resolve.reference import parse_reference
    from prewarm.resolve.registry.client import RegistryClient

    settings = settings_from(**flags)
    ref = parse_reference(image)
    client = RegistryClient.from_settings(settings)
    resolved = client.resolve(ref, platform or settings.platform)
    soci = None if no_soci else find_soci_index(client, resolved)
    if as_json:
        click.echo(json.dumps({
            "reference": str(ref),
            "manifest_digest": resolved.manifest_digest,
            "media_type": resolved.media_type,
            "index_digest": resolved.index_digest,
            "platform": resolved.platform,
            "config_digest": resolved.config_digest,
            "layers": [{"digest": layer.digest, "size": layer.size, "media_type": layer.media_type,
                        "diff_id": diff_id} for layer, diff_id in zip(resolved.layers, resolved.diff_ids)],
            "soci_index": index_summary(soci) if soci is not None else None,
        }, indent=2))
        return
    click.echo(f"image:     {ref}")
    click.echo(f"digest:    {resolved.manifest_digest}")
    if resolved.index_digest:
        click.echo(f"index:     {resolved.index_digest}")
    click.echo(f"type:      {resolved.media_type}")
    click.echo(f"platform:  {resolved.platform or 'unknown'}")
    click.echo(f"config:    {resolved.config_digest}")
    total = sum(layer.size for layer in resolved.layers)
    click.echo(f"layers:    {len(resolved.layers)} ({_human(total)})")
    for i, (layer, diff_id) in enumerate(zip(resolved.layers, resolved.diff_ids)):
        click.echo(f"  {i:>3}  {layer.digest}  {_human(layer.size):>10}  {layer.media_type}")
        click.echo(f"       diff_id {diff_id}")
    if not no_soci:
        if soci is None:
            click.echo("soci:      no SOCI index")
        else:
            click.echo(f"soci:      {soci.digest} ({soci.version}, {len(soci.ztocs)} zTOCs, "
                       f"built by {soci.build_tool_identifier or 'unknown'})")


def register(main: click.Group) -> None:
    main.add_command(inspect_cmd, "inspect")
