"""The error tree of prewarm.  This module imports nothing of ours.

Every failure that crosses a boundary (registry, zTOC, store, snapshotter, CLI) is one
of these, so the CLI maps them to exit codes in one place and the workers know which
ones are worth a retry::

    PrewarmError
     +-- InvalidReference            the image reference as typed cannot be parsed
     +-- ConfigError                 a flag, environment variable or file is unusable
     +-- RegistryError               anything the registry said or did not say
     |    +-- AuthenticationFailed   401/403 after the credentials we have
     |    +-- NotFound
     |    |    +-- ManifestNotFound
     |    |    +-- BlobNotFound
     |    +-- UnsupportedManifest    schema 1, unknown media type, no matching platform
     |    |    +-- MalformedManifest  a manifest or config that is not JSON (exit 3, not 2)
     |    +-- RateLimited            (Transient) 429, carries retry_after
     |    +-- RegistryUnavailable    (Transient) connection errors, 5xx, timeouts
     |    +-- RangeNotHonored        the server cannot serve the byte range asked for
     +-- CorruptContent              bytes that do not match what vouches for them
     |    +-- DigestMismatch
     |    |    +-- DiffIdMismatch   a layer's tar stream is not the diff_id its config says (never retried)
     |    +-- BadSpan
     |    +-- BadZtoc
     |    +-- UnsafeArchive          a tar entry that would write outside its layer
     |    +-- BadTarHeader           a layer's tar stream is not a tar archive soci can index
     |    +-- PlanMismatch           a job's plan disagrees with the image the node verified itself
     +-- StoreError                  the node's content store
     |    +-- InsufficientSpace
     +-- BrokerError                 the fleet's Redis cannot be reached or refused what we asked
     +-- NotPrewarmed                an image this node's store does not hold (exit 1, "not found")
     +-- JobError                    a pre-warm job failed or was cancelled
     |    +-- JobNotFound            no job by that id (exit 1, "not found")
     |    +-- JobTimeout             --timeout passed before the job ended (it goes on)
     +-- SnapshotError
     |    +-- SnapshotNotFound
     |    +-- SnapshotExists
     |    +-- FailedPrecondition
     |    +-- InvalidSnapshotRequest  a malformed key, filter, label or field path
     +-- ContainerdError             registering a pre-warmed image in containerd failed
          +-- ContainerdUnavailable  (Transient) containerd's socket does not answer

``Transient`` is a mixin: tasks retry exactly the exceptions that carry it, so corrupt
data and auth errors fail loudly instead of being retried into a storm.
"""

from __future__ import annotations


class PrewarmError(Exception):
    """Root of every error prewarm raises on purpose.

    ``exit_code`` is what the CLI exits with when this reaches it.
    """

    exit_code = 1


class Transient:
    """Mixin for failures that may go away if the same thing is tried again later."""


class InvalidReference(PrewarmError):
    exit_code = 2


class ConfigError(PrewarmError):
    exit_code = 2


class RegistryError(PrewarmError):
    exit_code = 3

    def __init__(self, message: str, *, registry: str | None = None,
                 repository: str | None = None, digest: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.registry = registry
        self.repository = repository
        self.digest = digest
        self.status = status


class AuthenticationFailed(RegistryError):
    exit_code = 4


class NotFound(RegistryError):
    exit_code = 1


class ManifestNotFound(NotFound):
    pass


class BlobNotFound(NotFound):
    pass


class UnsupportedManifest(RegistryError):
    exit_code = 2


class MalformedManifest(UnsupportedManifest):
    """The registry answered a manifest or config request with bytes that are not a JSON
    object: the registry's fault, not the user's input, so exit 3 rather than 2."""

    exit_code = 3


class RegistryUnavailable(Transient, RegistryError):
    exit_code = 5


class RateLimited(Transient, RegistryError):
    exit_code = 5

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class RangeNotHonored(RegistryError):
    pass


class CorruptContent(PrewarmError):
    exit_code = 6


class PlanMismatch(CorruptContent):
    """What Redis says a job is (its plan) is not what the registry's verified image is."""


class DigestMismatch(CorruptContent):
    def __init__(self, message: str, *, expected: str | None = None,
                 actual: str | None = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class DiffIdMismatch(DigestMismatch):
    """A layer's decompressed stream does not hash to the diff_id its image config gives.

    Not a transit error: the layer's bytes matched their own digest, so fetching them
    again gives the same stream.  Workers fail the layer at once instead of retrying.
    """


class BadSpan(CorruptContent):
    pass


class BadZtoc(CorruptContent):
    pass


class UnsafeArchive(CorruptContent):
    pass


class BadTarHeader(CorruptContent):
    """A tar header (chain) that Go's archive/tar would reject, or an entry soci cannot index."""


class StoreError(PrewarmError):
    exit_code = 7


class InsufficientSpace(StoreError):
    pass


class BrokerError(PrewarmError):
    exit_code = 10


class JobError(PrewarmError):
    exit_code = 8


class JobNotFound(JobError):
    """No job by that id (never existed, or expired): "not found", exit 1 like an unknown image."""

    exit_code = 1


class NotPrewarmed(PrewarmError):
    """The image is not in this node's store (rm, mounts): "not found", exit 1."""

    exit_code = 1


class JobTimeout(JobError):
    exit_code = 11


class SnapshotError(PrewarmError):
    exit_code = 9


class SnapshotNotFound(SnapshotError):
    pass


class SnapshotExists(SnapshotError):
    pass


class FailedPrecondition(SnapshotError):
    pass


class InvalidSnapshotRequest(SnapshotError):
    """The request itself is wrong (bad filter, immutable field, parent not committed).

    The shim answers it with gRPC INVALID_ARGUMENT, which containerd reads as
    ``errdefs.ErrInvalidArgument``.
    """


class ContainerdError(PrewarmError):
    """containerd refused or could not be asked to register a pre-warmed image."""


class ContainerdUnavailable(Transient, ContainerdError):
    """containerd's socket does not answer (not running, wrong path, no permission)."""
