"""``prewarm snapshotter``: run the containerd proxy snapshotter shim in the foreground."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from prewarm.cli._common import root_option, settings_from


@click.command()
@click.option("--address", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Unix socket to serve on; the same path as [proxy_plugins.prewarm] address.")
@root_option
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]),
              help="Log level of the shim (stderr); info logs each layer answered from the store.")
@click.option("--isolate-namespaces", is_flag=True,
              help="Keep snapshots apart by the containerd-namespace gRPC header. Off for containerd, "
                   "which sends it on some calls only and already puts the namespace in every key.")
def snapshotter(address: Path, root: Path | None, log_level: str, isolate_namespaces: bool) -> None:
    """Serve containerd's snapshot API over pre-warmed layers (a proxy snapshotter)."""
    from prewarm.runtime.shim.server import run

    settings = settings_from(store="write", root=root)
    level = getattr(logging, log_level.upper())
    for name in ("prewarm.runtime.shim", "prewarm.runtime.snapshot"):
        logging.getLogger(name).setLevel(level)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("prewarm.runtime.shim", "prewarm.runtime.snapshot"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).propagate = False
    run(address, settings.root, isolate_namespaces=isolate_namespaces)


def register(main: click.Group) -> None:
    main.add_command(snapshotter)
