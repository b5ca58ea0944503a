"""``prewarm budget``: the fleet-wide limits for one registry host, held in Redis."""

from __future__ import annotations

import click


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
    from prewarm.broker import redis_client
    from prewarm.budget import clear_budget, get_budget, parse_size, set_budget
    from prewarm.progress import human_bytes

    r = redis_client(broker_url)
    if clear:
        clear_budget(r, registry)
    elif rate is not None or concurrency is not None:
        current = get_budget(r, registry)
        set_budget(r, registry,
                   rate=parse_size(rate) if rate is not None else (current.rate if current else 0),
                   burst=parse_size(burst) if burst else None,
                   concurrency=concurrency if concurrency is not None else (current.concurrency if current else 0))
    cfg = get_budget(r, registry)
    if cfg is None:
        click.echo(f"{registry}: no budget (unlimited)")
    else:
        rate_s = f"{human_bytes(cfg.rate)}/s" if cfg.rate else "unlimited"
        conc = str(cfg.concurrency) if cfg.concurrency else "unlimited"
        click.echo(f"{registry}: rate {rate_s}, burst {human_bytes(cfg.burst)}, concurrency {conc}")


def register(main: click.Group) -> None:
    main.add_command(budget_cmd, "budget")
