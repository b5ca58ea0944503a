"""The containerd proxy snapshotter: a gRPC face on :mod:`prewarm.runtime.snapshot`.

:mod:`.server` binds the unix socket, :mod:`.service` is the thin adapter (one error
conversion per method), :mod:`.convert` translates between protobuf and our dataclasses.
The protobuf modules are generated into ``_proto`` by ``scripts/gen-protos``.
"""
