"""Options shared by several commands, and the one place flags become :class:`Settings`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from prewarm.config import Settings


def registry_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--insecure-registry", "insecure_registries", multiple=True, metavar="HOST:PORT",
                      help="Use plain HTTP for this registry (repeatable; also PREWARM_INSECURE_REGISTRIES).")(fn)
    fn = click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False),
                      help="CA bundle for registry TLS (also PREWARM_CA_BUNDLE).")(fn)
    return fn


def root_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--root", type=click.Path(file_okay=False, path_type=Path),
                        help="Content store (default PREWARM_ROOT or /var/lib/prewarm).")(fn)


def settings_from(**flags: Any) -> Settings:
    """Settings from the environment with the command's flags on top (flags win)."""
    insecure = flags.pop("insecure_registries", None) or None
    return Settings.from_env(insecure_registries=frozenset(insecure) if insecure else None, **flags)
