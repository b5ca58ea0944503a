"""prewarm: get huge container images onto a fleet of nodes before pods need them.

Data flows one way: reference -> registry -> manifest + zTOC -> plan -> dispatch ->
Redis -> workers.tasks -> range read -> digest check -> inflate -> store -> snapshot ->
shim -> containerd.  Imports follow that direction, or go sideways into ``errors``
and ``digest``; nothing here imports ``prewarm.cli``, ``workers`` or ``prewarm.shim``.
"""

__version__ = "0.1.0"
