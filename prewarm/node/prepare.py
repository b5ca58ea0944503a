"""Preparing span layers ahead of their spans: the one place that does it.

A span cannot land before its layer is prepared (the zTOC's TOC validated, the layer's
tree and landing table created), and for a layer of 50,000-70,000 files that takes
seconds under the layer's lock.  Two callers do it before the spans arrive, so the
landing never waits for it:

* the embedded run (:mod:`.local`) prepares every span layer of the plan, the largest
  TOC first, while its workers start and then land the layer quickest to prepare;
* a worker (:func:`prewarm.node.warm.prepare_ahead`) prepares the job's next span layer
  while the current one is still landing.

Both are only a head start: the layer's own tasks prepare it again (idempotent), so a
layer someone else is preparing is skipped rather than waited for, and a failure is
logged and left to those tasks, which report it in the job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prewarm.errors import PrewarmError

if TYPE_CHECKING:
    from prewarm.fleet.plan import LayerPlan
    from prewarm.index.ztoc import Ztoc
    from prewarm.store.content import ContentStore

log = logging.getLogger(__name__)


def prepare_layers_ahead(store: ContentStore, layers: Iterable[LayerPlan],
                         load_ztoc: Callable[[str], Ztoc]) -> list[str]:
    """Prepare the span layers among ``layers`` that nothing has touched yet, the largest TOC first.

    ``load_ztoc`` maps a zTOC digest to the zTOC (the node cache, or a fetch within the
    fleet's registry budget).  Never waits for a layer's lock and never raises a
    :class:`PrewarmError`: a layer that cannot be prepared here is logged and skipped.

    Returns:
        The digests of the layers now prepared (not those another process held).
    """
    todo: list[tuple[LayerPlan, Ztoc]] = []
    seen: set[str] = set()
    for lp in layers:
        if (lp.mode != "spans" or lp.ztoc_digest is None or lp.digest in seen
                or store.layer_state(lp.digest) != "absent"):
            continue
        seen.add(lp.digest)
        try:
            todo.append((lp, load_ztoc(lp.ztoc_digest)))
        except PrewarmError as err:
            log.info("zTOC %s of layer %s not loaded to prepare it ahead (its tasks will report it): %s",
                     lp.ztoc_digest, lp.digest, err)
    prepared = []
    for lp, z in sorted(todo, key=lambda t: -len(t[1].files)):
        try:
            if store.prepare_layer(lp.digest, z, diff_id=lp.diff_id, wait=False):
                prepared.append(lp.digest)
        except PrewarmError as err:
            log.info("layer %s not prepared ahead (its tasks will report it): %s", lp.digest, err)
    return prepared
