"""Options shared by several commands, and the one place flags become :class:`Settings`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click

from prewarm.config import Settings


def registry_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--insecure-registry", "insecure_registries", multiple=True, metavar="HOST:PORT",
                      help="Use plain HTTP for this registry (repeatable; also PREWARM_INSECURE_REGISTRIES).")(fn)
    fn = click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False),
                      help="CA bundle for registry TLS (also PREWARM_CA_BUNDLE).")(fn)
    return fn


def root_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    # A plain path: the store is checked by settings_from(store=...), the same way whether it
    # came from --root or PREWARM_ROOT.
    return click.option("--root", type=click.Path(path_type=Path),
                        help="Content store (default PREWARM_ROOT or /var/lib/prewarm).")(fn)


def settings_from(store: Literal["read", "write"] | None = None, **flags: Any) -> Settings:
    """Settings from the environment with the command's flags on top (flags win).

    ``store``: the command reads or writes the node's store, which is checked here, once
    (prewarm.store.layout.check_root): a clear StoreError instead of a traceback later.
    """
    insecure = flags.pop("insecure_registries", None) or None
    settings = Settings.from_env(insecure_registries=frozenset(insecure) if insecure else None, **flags)
    if store is not None:
        from prewarm.store.layout import check_root

        check_root(settings.root, writable=store == "write")
    return settings
