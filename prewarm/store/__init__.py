"""Store: verified layer bytes in, committed layer trees on the node's disk out.

:mod:`.layout` names every path under ``PREWARM_ROOT``; :mod:`.content` is the content
store (a layer's lifecycle, its landing table, span landing, whole-layer ingest, the
in-order hashes); :mod:`.layerfs` and :mod:`.landing` (with its C twin ``_landing``) write
files in overlay's diff format.  Hands on ready layers, each committed only after its
digests were checked, for the runtime to stack into snapshots.
"""
