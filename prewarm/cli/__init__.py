"""The ``prewarm`` command line.

Each group of commands lives in its own module under ``prewarm.cli`` and is attached
here; expected failures (:class:`prewarm.errors.PrewarmError`) print one line naming
the thing and what to do, and exit with the error's code.  ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import logging
import signal
import sys

import click

from prewarm.errors import PrewarmError


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the main thread is, so every cleanup runs as for Ctrl-C.

    A BaseException, like KeyboardInterrupt: ``except Exception`` must not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


class PrewarmGroup(click.Group):
    """A click group that turns our errors into one-line messages and exit codes.

    SIGTERM (a Job's pod deleted, ``timeout``) and SIGHUP end a command the way Ctrl-C
    does: the embedded Redis, workers and temp folder are stopped and removed by the same
    ``finally`` blocks, and the exit code is 128 plus the signal's number.  Commands that
    handle signals themselves (the worker's Celery, the shim) set their own handlers later.
    """

    def invoke(self, ctx: click.Context) -> object:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _terminated)
        try:
            return super().invoke(ctx)
        except Terminated as stop:
            click.echo(f"prewarm: stopped by {signal.Signals(stop.signum).name}", err=True)
            sys.exit(128 + stop.signum)
        except PrewarmError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"prewarm: error: {err}", err=True)
            sys.exit(err.exit_code)
        except Exception as err:  # the broker's own errors, turned into ours once, here
            mapped = _broker_error(err, (ctx.obj or {}).get("broker_url"))
            if mapped is None or (ctx.obj and ctx.obj.get("debug")):
                raise
            click.echo(f"prewarm: error: {mapped}", err=True)
            sys.exit(mapped.exit_code)
        except KeyboardInterrupt:
            click.echo("prewarm: interrupted", err=True)
            sys.exit(130)


def _broker_error(err: BaseException, url: str | None) -> PrewarmError | None:
    """redis-py's and kombu's errors as a BrokerError naming the (masked) URL the command
    used (its flag or PREWARM_BROKER_URL); None for others."""
    module = type(err).__module__.split(".")[0]
    if module not in ("redis", "kombu", "amqp"):
        return None
    import os

    from prewarm.fleet.broker import broker_error

    return broker_error(err, url or os.environ.get("PREWARM_BROKER_URL"))


@click.group(cls=PrewarmGroup, context_settings={"help_option_names": ["-h", "--help"]})
# The installed distribution's version (its metadata), so a wheel and a checkout report
# what pip installed rather than a second copy of the number kept in the code.
@click.version_option(package_name="prewarm", prog_name="prewarm")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Pre-warm container images onto nodes before pods need them."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _attach_subcommands() -> None:
    """Attach the command modules; each exposes ``register(main)``."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(main)


_attach_subcommands()
