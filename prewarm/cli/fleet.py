"""Fleet commands: ``prewarm nodes`` (membership) and ``prewarm budget`` (registry limits)."""

from __future__ import annotations

import click

from prewarm.cli._common import remember_broker


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


def register(main: click.Group) -> None:
    main.add_command(budget_cmd, "budget")
    main.add_command(nodes_cmd, "nodes")
