"""Node: a span task from Redis in, bytes fetched, verified and landed in the store out.

:mod:`.warm` is one task's work on a node (fetch, verify, inflate, land, account);
:mod:`.embedded` starts a private Redis and workers for a one-machine run, which
:mod:`.local` drives from image name to recorded image; :mod:`.prepare` prepares span
layers ahead of their spans; :mod:`.restart` keeps a node's worker alive; :mod:`.metrics` counts what it did.
"""
