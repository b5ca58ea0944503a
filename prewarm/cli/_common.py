"""Options shared by several commands, and the one place flags become :class:`Settings`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click

from prewarm.config import Settings, existing_file, registry_host


def registry_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--insecure-registry", "insecure_registries", multiple=True, metavar="HOST:PORT",
                      help="Use plain HTTP for this registry (repeatable; also PREWARM_INSECURE_REGISTRIES).")(fn)
    # plain strings: settings_from checks them with the converters of their PREWARM_* variables
    fn = click.option("--ca-bundle", metavar="FILE",
                      help="CA bundle for registry TLS (also PREWARM_CA_BUNDLE).")(fn)
    return fn


def root_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    # A plain path: the store is checked by settings_from(store=...), the same way whether it
    # came from --root or PREWARM_ROOT.
    return click.option("--root", type=click.Path(path_type=Path),
                        help="Content store (default PREWARM_ROOT or /var/lib/prewarm).")(fn)


def settings_from(store: Literal["read", "write"] | None = None, **flags: Any) -> Settings:
    """Settings from the environment with the command's flags on top (flags win).

    Every value is checked here, at start, before anything is fetched: a flag goes through
    the converter of its ``PREWARM_*`` variable (prewarm.config), so both fail with the
    same one-line ConfigError (exit 2), naming the one that was given.

    ``store``: the command reads or writes the node's store, which is checked here, once
    (prewarm.store.layout.check_root): a clear StoreError instead of a traceback later.  A
    command that writes also gets its span writer (PREWARM_LANDING) checked.

    Raises:
        ConfigError: a malformed flag or variable.
        StoreError: the store cannot be used as ``store`` says.
    """
    insecure = flags.pop("insecure_registries", None) or None
    if insecure:
        flags["insecure_registries"] = frozenset(registry_host(h, "--insecure-registry") for h in insecure)
    if flags.get("ca_bundle"):
        flags["ca_bundle"] = str(existing_file(flags["ca_bundle"], "--ca-bundle"))
    settings = Settings.from_env(**flags)
    if settings.broker_url:
        remember_broker(settings.broker_url)
    if store is not None:
        from prewarm.store.layout import check_root

        check_root(settings.root, writable=store == "write")
    if store == "write":
        from prewarm.store.landing import backend

        backend()  # the C extension is built (PREWARM_LANDING=c), before any layer needs it
    return settings


def nonempty(value: str, what: str) -> str:
    """``value`` unless it is empty or blank: an empty argument is bad input (exit 2), not "not found".

    Raises:
        ConfigError: ``value`` is empty; the message says what ``what`` should have been.
    """
    if not value.strip():
        from prewarm.errors import ConfigError

        raise ConfigError(f"the {what} is empty; {_EXAMPLES.get(what, 'give one')}")
    return value


_EXAMPLES = {
    "job id": "give one that `prewarm status` lists",
    "image name": "give one that `prewarm images` lists",
}


def remember_broker(url: str) -> None:
    """Note the broker URL this command uses, given by flag or variable, so a Redis error
    that reaches the CLI's error boundary (prewarm.cli.PrewarmGroup) names it."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.find_root().ensure_object(dict)["broker_url"] = url
