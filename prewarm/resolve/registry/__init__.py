"""Talking to OCI registries: the client, its auth, retries and credentials.

``client.RegistryClient`` is the one entry point other modules use; ``auth`` answers
registry challenges (bearer tokens, basic), ``dockerconfig`` finds the node's own
credentials, ``retry`` says when and how long to wait, and ``status`` turns HTTP
answers into :mod:`prewarm.errors`.
"""
