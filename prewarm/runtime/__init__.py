"""Runtime: committed layers in, overlay snapshots served to containerd out.

:mod:`.images` records which images a node holds (and their chain IDs), :mod:`.snapshot`
states the snapshotter contract and implements it on overlay, :mod:`.shim` is its gRPC
face as a containerd proxy snapshotter, :mod:`.containerd` registers pre-warmed images
with containerd, and :mod:`.gc` removes what no image or snapshot uses.
"""
