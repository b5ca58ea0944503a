"""Building many long-lived objects out of the cyclic garbage collector's sight.

Why: a layer's landing table holds objects for each of up to 100,000 entries.  The
cyclic GC ran every 700 allocations while they were built, and every full collection
afterwards walked them all again: 5% of a cold pre-warm's CPU (perf).  They hold no
reference cycles, so they are built with the GC off and then frozen out of its sight.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def long_lived() -> Iterator[None]:
    """Run the body with the GC off, then collect once and move what survives to the permanent generation.

    The one collection frees what was garbage, so nothing cyclic is kept for good;
    ``gc.freeze`` keeps later collections from walking the survivors, which reference
    counting still frees.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        gc.freeze()
        if was_enabled:
            gc.enable()
