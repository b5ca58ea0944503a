"""Resolve: an image reference in, a verified manifest and config out.

Takes what a user typed (``registry/repo:tag`` or ``@sha256:...``), parses it
(:mod:`.reference`), speaks the OCI distribution protocol to its registry
(:mod:`.registry`: auth, retries, range reads) and checks the manifest and config
against their digests (:mod:`.manifest`, :mod:`.digest`).  Hands on a
``ResolvedImage``: layers, diff_ids and sizes that later stages may trust.
"""
