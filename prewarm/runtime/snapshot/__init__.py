"""Overlay snapshots for containerd: the contract, the sqlite metadata, the pre-warmed layers.

:mod:`.snapshotter` states the contract, :mod:`.overlay` implements it, :mod:`.prewarmed`
is the one reader and writer of the chain records that connect the content store to it.
"""
