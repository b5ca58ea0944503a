"""Store: verified layer bytes in, committed layer trees on the node's disk out.

:mod:`.layout` names every path under ``PREWARM_ROOT``; :mod:`.content` is the content
store's lifecycle (lock, state, commit) and the one face other packages import.  Its
steps live next door, one concern each: :mod:`.table` (a layer's landing table, derived
from its zTOC once and saved for the node's other processes), :mod:`.spans` (a span's
headers checked and its data written), :mod:`.inorder` (the layer digest over spans
landing in any order), :mod:`.ingest` (whole layers without a zTOC).  :mod:`.layerfs` and
:mod:`.landing` (with its C twin ``_landing``) write files in overlay's diff format.  Hands
on ready layers, each committed only after its digests were checked, for the runtime to
stack into snapshots.
"""
