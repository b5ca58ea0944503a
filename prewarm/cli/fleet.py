"""Fleet commands: ``prewarm nodes`` (membership), ``prewarm budget`` (registry limits), ``prewarm prune``."""

from __future__ import annotations

import re

import click

from prewarm.cli._common import remember_broker

#: ``prewarm prune``'s default age: the same 7 days after which finished jobs expire by themselves.
PRUNE_DEFAULT = "7d"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Duration(click.ParamType):
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w``, or plain seconds."""

    name = "DURATION"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value))
        if not m:
            self.fail(f"{value!r} is not a duration: give a number with s, m, h, d or w (e.g. 7d, 12h)", param, ctx)
        return float(m.group(1)) * _UNITS[m.group(2) or "s"]


@click.command()
@click.argument("registry", metavar="HOST[:PORT]")
@click.option("--rate", help="Bytes per second for the whole fleet, e.g. 500MB (0 = unlimited).")
@click.option("--burst", help="Bucket size, e.g. 64MB (default: one second of rate, at least 8 MiB).")
@click.option("--concurrency", type=click.IntRange(0, 100000), help="Requests in flight for the whole fleet.")
@click.option("--clear", is_flag=True, help="Remove the budget.")
@click.option("--broker-url", envvar="PREWARM_BROKER_URL", required=True, help="Redis (PREWARM_BROKER_URL).")
def budget_cmd(registry: str, rate: str | None, burst: str | None, concurrency: int | None, clear: bool,
               broker_url: str) -> None:
    """Show or set the registry budget every worker of the fleet obeys."""
    from prewarm.config import MAX_NUMBER, registry_host
    from prewarm.errors import ConfigError
    from prewarm.fleet.broker import redis_client
    from prewarm.fleet.budget import clear_budget, get_budget, parse_size, set_budget
    from prewarm.fleet.progress import human_bytes

    registry = registry_host(registry, "HOST[:PORT]")
    if clear and (rate is not None or burst is not None or concurrency is not None):
        raise ConfigError("--clear removes the budget: give it alone, or --rate/--burst/--concurrency without it")
    if burst is not None and rate is None and concurrency is None:
        raise ConfigError("--burst sizes the bucket of a --rate: give --rate with it")

    def size(text: str, name: str) -> int:
        value = parse_size(text)
        if value > MAX_NUMBER:
            raise ConfigError(f"{name}={text!r} is out of range; give at most 1PiB ({MAX_NUMBER} bytes)")
        return value

    remember_broker(broker_url)
    r = redis_client(broker_url)
    if clear:
        clear_budget(r, registry)
    elif rate is not None or concurrency is not None:
        current = get_budget(r, registry)
        set_budget(r, registry,
                   rate=size(rate, "--rate") if rate is not None else (current.rate if current else 0),
                   burst=size(burst, "--burst") if burst else None,
                   concurrency=concurrency if concurrency is not None else (current.concurrency if current else 0))
    cfg = get_budget(r, registry)
    if cfg is None:
        click.echo(f"{registry}: no budget (unlimited)")
    else:
        rate_s = f"{human_bytes(cfg.rate)}/s" if cfg.rate else "unlimited"
        conc = str(cfg.concurrency) if cfg.concurrency else "unlimited"
        click.echo(f"{registry}: rate {rate_s}, burst {human_bytes(cfg.burst)}, concurrency {conc}")


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--broker-url", envvar="PREWARM_BROKER_URL", required=True, help="Redis (PREWARM_BROKER_URL).")
def nodes_cmd(as_json: bool, broker_url: str) -> None:
    """List the fleet's nodes: up or down, labels, free disk, and the layers they hold ready."""
    import json
    import time

    from prewarm.fleet.broker import redis_client
    from prewarm.fleet.nodes import list_nodes
    from prewarm.fleet.progress import human_bytes, human_seconds

    remember_broker(broker_url)
    nodes = list_nodes(redis_client(broker_url))
    if as_json:
        click.echo(json.dumps([{"name": n.name, "up": n.up, "labels": n.labels, "free_bytes": n.free_bytes,
                                "layers": sorted(n.layers), "heartbeat": n.heartbeat} for n in nodes], indent=2))
        return
    if not nodes:
        click.echo("no node has registered; start `prewarm worker` on the nodes")
        return
    click.echo(f"{'NODE':<24} {'STATE':<5} {'SEEN':>6} {'FREE':>10} {'LAYERS':>6}  LABELS")
    for n in nodes:
        labels = ",".join(f"{k}={v}" for k, v in sorted(n.labels.items()))
        click.echo(f"{n.name:<24} {'up' if n.up else 'down':<5} {human_seconds(time.time() - n.heartbeat):>6} "
                   f"{human_bytes(n.free_bytes):>10} {len(n.layers):>6}  {labels}")


@click.command()
@click.option("--older-than", type=Duration(), default=PRUNE_DEFAULT, show_default=True,
              help="Age past which jobs that are over (or have not moved since) and silent nodes go.")
@click.option("--dry-run", is_flag=True, help="Say what would go, remove nothing.")
@click.option("--broker-url", envvar="PREWARM_BROKER_URL", required=True, help="Redis (PREWARM_BROKER_URL).")
def prune_cmd(older_than: float, dry_run: bool, broker_url: str) -> None:
    """Remove old records from the fleet's Redis: jobs and nodes.

    Jobs created more than --older-than ago go if they are over (succeeded, failed,
    cancelled) or nothing moved in them since (their nodes are gone); standing schedules
    stay until cancelled.  Nodes whose last heartbeat is older go from `prewarm nodes`,
    and the records of worker processes that stopped (their unfinished tasks go back to
    their queues first).  Without it, finished and cancelled jobs expire 7 days after they end, and node records
    7 days after their last heartbeat.
    """
    from prewarm.fleet.broker import redis_client
    from prewarm.fleet.jobs import prune_jobs
    from prewarm.fleet.nodes import prune_nodes
    from prewarm.fleet.progress import human_seconds
    from prewarm.fleet.recovery import prune as prune_workers

    r = redis_client(broker_url, reachable=True)
    gone_jobs = prune_jobs(r, older_than, dry_run=dry_run)
    gone_nodes = prune_nodes(r, older_than, dry_run=dry_run)
    gone_workers = prune_workers(r, older_than, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(gone_jobs)} job(s), {len(gone_nodes)} node(s) and {len(gone_workers)} dead "
               f"worker record(s) older than {human_seconds(older_than)}")
    for job in gone_jobs:
        click.echo(f"  job {job}")
    for node in gone_nodes:
        click.echo(f"  node {node}")


def register(main: click.Group) -> None:
    main.add_command(budget_cmd, "budget")
    main.add_command(nodes_cmd, "nodes")
    main.add_command(prune_cmd, "prune")
