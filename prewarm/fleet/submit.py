"""Submitting a job: from an image name to a launched job, and to its end if asked.

    parse the reference (once) and resolve it for the platform
    === choose the nodes: named ones, every node up, or those whose labels match
    === find each layer's zTOC by the index policy, and plan (:func:`plan_job`)
    === launch: record the job in Redis, release each node's first window
    === wait, if asked: poll the job until it ends, reporting each status

:func:`submit` is ``prewarm schedule`` with a broker.  The embedded run
(:func:`prewarm.node.local.run_embedded`) takes the same :func:`plan_job`,
:func:`~prewarm.fleet.schedule.launch` and :func:`~prewarm.fleet.schedule.wait_for_job`
on its private Redis, with the one-machine index policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import redis

from prewarm.config import Settings
from prewarm.errors import ConfigError
from prewarm.fleet import schedule
from prewarm.fleet.broker import redis_client
from prewarm.fleet.jobs import NODE_NAME_LABEL, JobStatus
from prewarm.fleet.nodes import NODE_TTL, NodeInfo, list_nodes, parse_labels, select_nodes
from prewarm.fleet.plan import ImagePlan, SpanLayer, plan_resolved
from prewarm.fleet.signing import signer_from
from prewarm.resolve.reference import parse_reference
from prewarm.resolve.registry.client import RegistryClient, ResolvedImage

#: ``auto``: the registry's SOCI index; without one a fleet builds and pushes the zTOCs,
#: one machine fetches layers whole.  ``build``: always build missing zTOCs.  ``none``:
#: every layer whole.
IndexPolicy = Literal["auto", "build", "none"]


def _silent(msg: str) -> None:
    pass


def plan_job(settings: Settings, client: RegistryClient, resolved: ResolvedImage, *, index: IndexPolicy,
             fleet: bool, say: Callable[[str], None] = _silent) -> ImagePlan:
    """The job's plan: the layers' zTOCs found as ``index`` says, then spans and whole layers.

    Why the policy depends on ``fleet``: a fleet builds missing zTOCs once and pushes them
    as a SOCI index, one extra download of the image for all its nodes, after which each
    node fetches spans in parallel.  On one machine building them would download every
    layer twice, so without a SOCI index in the registry its layers go whole unless
    ``index`` is ``build``, and nothing is pushed.
    """
    span_layers: dict[str, SpanLayer] = {}
    if index != "none":
        span_layers, _ = schedule.find_ztocs(settings, client, resolved, build=fleet or index == "build",
                                             push=fleet, say=say)
    return plan_resolved(resolved, span_layers, spans_per_task=settings.spans_per_task)


@dataclasses.dataclass(frozen=True)
class NodeChoice:
    """Which nodes of the fleet a job is for: ``names``, ``every`` node up, or those matching ``selectors``.

    With none of them, every node the fleet has registered.
    """

    names: tuple[str, ...] = ()
    every: bool = False
    #: KEY=VALUE pairs, all of which a node's labels must match
    selectors: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Submission:
    """A launched job: its id, plan and nodes, and its final status when it was waited for."""

    job_id: str
    plan: ImagePlan
    nodes: tuple[str, ...]
    status: JobStatus | None = None


def submit(settings: Settings, image: str, choice: NodeChoice, *, index: IndexPolicy = "auto",
           window: int | None = None, keep: bool = False, say: Callable[[str], None] = _silent,
           wait: bool = False, on_progress: Callable[[JobStatus], None] | None = None,
           timeout: float | None = None, node_down_limit: float | None = None) -> Submission:
    """Pre-warm ``image`` on the chosen nodes of the fleet at ``settings.broker_url``.

    ``keep`` makes the job standing: nodes that join later and match ``choice.selectors``
    are warmed too.  With ``wait`` the job is followed to its end (``on_progress`` gets
    each status) and its final status returned; a failed job is returned, not raised.
    ``timeout`` bounds the wait; ``node_down_limit`` fails a node whose heartbeat stopped
    that long ago (see :func:`prewarm.fleet.schedule.wait_for_job`).  ``--keep`` with named
    nodes keeps warming those nodes only (they are its selector).

    Raises:
        InvalidReference: ``image`` is not an image reference.
        ConfigError: no broker URL, a malformed selector, no node up matches it, or a named
            node never registered.
        JobTimeout: ``timeout`` passed before the job ended.
        PrewarmError: no node to pre-warm; the registry's errors as it reports them.
    """
    r = redis_client(_broker(settings), reachable=True)  # the fleet first: nothing is asked of a registry for naught
    client, resolved = _resolve(settings, image)
    targets, fleet = _choose(r, choice)
    signer = signer_from(settings)
    strict = [n.name for n in fleet if n.name in targets and n.signed_only]
    if strict and signer is None:
        raise ConfigError(f"node(s) {', '.join(strict)} run only signed tasks: give the scheduler its signing key "
                          "(PREWARM_SIGNING_KEY and PREWARM_SIGNING_CERT)")
    skipped = _skipped_down(fleet, choice)
    if skipped:
        say(f"skipping node(s) down (no heartbeat for {NODE_TTL:.0f}s): {', '.join(skipped)}; "
            "`prewarm nodes` lists them")
    down = [n.name for n in fleet if n.name in targets and not n.up]
    if down:
        say(f"node(s) down (no recent heartbeat): {', '.join(down)}; their share waits until their workers "
            "are back" + (f", or fails after {node_down_limit:.0f}s" if wait and node_down_limit else ""))
    plan = plan_job(settings, client, resolved, index=index, fleet=True, say=say)
    job_id = schedule.launch(r, _broker(settings), plan, image, targets, window=window,
                             keep=_standing_selector(choice) if keep else None, signer=signer)
    status = schedule.wait_for_job(r, job_id, on_update=on_progress, timeout=timeout,
                                   node_down_limit=node_down_limit) if wait else None
    return Submission(job_id, plan, tuple(targets), status)


def dry_run(settings: Settings, image: str, choice: NodeChoice) -> tuple[list[schedule.DryRunLine], int]:
    """What :func:`submit` would do per node (present, to fetch, free disk after, time), fetching nothing.

    Raises:
        The same errors as :func:`submit`, before anything is launched.
    """
    r = redis_client(_broker(settings), reachable=True)
    _, resolved = _resolve(settings, image)
    targets, fleet = _choose(r, choice)
    info = {n.name: n for n in fleet}
    rows = [(t, info[t].layers if t in info else frozenset(), info[t].free_bytes if t in info else None)
            for t in targets]
    from prewarm.fleet.peers import sharing_nodes

    return schedule.dry_run(plan_resolved(resolved, {}), rows, sharing=sharing_nodes(r, targets))


def _skipped_down(fleet: list[NodeInfo], choice: NodeChoice) -> list[str]:
    """Nodes ``--all-nodes`` or ``--selector`` would take but for their heartbeat (named nodes are never skipped)."""
    if not (choice.every or choice.selectors):
        return []
    selector = parse_labels(list(choice.selectors))
    return [n.name for n in fleet if not n.up and all(n.labels.get(k) == v for k, v in selector.items())]


def _standing_selector(choice: NodeChoice) -> dict[str, str | list[str]]:
    """What nodes joining later must match: the selectors, or the named nodes themselves."""
    if choice.names:
        return {NODE_NAME_LABEL: sorted(set(choice.names))}
    return dict(parse_labels(list(choice.selectors)))


def _broker(settings: Settings) -> str:
    if not settings.broker_url:
        raise ConfigError("a fleet job needs the fleet's Redis: set PREWARM_BROKER_URL")
    return settings.broker_url


def _resolve(settings: Settings, image: str) -> tuple[RegistryClient, ResolvedImage]:
    ref = parse_reference(image)
    client = RegistryClient.from_settings(settings)
    return client, client.resolve(ref, settings.platform)


def _choose(r: redis.Redis, choice: NodeChoice) -> tuple[list[str], list[NodeInfo]]:
    """The target node names, and the fleet's registered nodes they were chosen from."""
    fleet = list_nodes(r)
    if choice.selectors or choice.every:
        chosen = select_nodes(fleet, parse_labels(list(choice.selectors)))
        if not chosen:
            raise ConfigError(f"no node that is up matches {' '.join(choice.selectors) or '--all-nodes'} "
                              "(prewarm nodes lists them)")
        return [n.name for n in chosen], fleet
    return schedule.require_nodes(r, choice.names), fleet
