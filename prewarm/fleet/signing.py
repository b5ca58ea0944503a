"""Signed span tasks: a worker does only the work the scheduler signed.

Anyone who can write to the fleet's Redis can push task messages into a node's queue: a
compromised node, a leaked password, a pod that reaches the Redis service.  So the task
message bodies are signed with Celery's message signing (the ``auth`` serializer: an RSA
key and certificate on the scheduler, a store of trusted certificates on the workers),
and a worker that has a certificate store runs only bodies that verify against it.

The signer is the scheduler alone.  Workers release each other's windows and resend lost
tasks, so they must send task messages too; if they signed them, any worker's key could
forge work for every node.  Instead the scheduler signs every task body of the job once,
at launch (a body names the job, the image, the layer and its spans, never a node: the
queue it lands in is the node), and keeps the signed bodies with the job in Redis.  A
worker that releases task ``k`` publishes the scheduler's signed body for it as it is.
Only the message headers (task id, retries, eta) are the sender's own, and they decide
nothing the worker trusts.

Unsigned messages and bodies that do not verify are refused before any write and counted
(``prewarm_tasks_refused``).  The embedded mode makes its own key pair (kept under the
store root, which only root can read); a fleet gets one from a Kubernetes Secret
(deploy/kubernetes/10-secrets.yaml).
"""

from __future__ import annotations

import datetime
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prewarm.config import Settings
from prewarm.errors import ConfigError, InsufficientSpace, StoreError

#: The content type of an ``auth``-serialized (signed) message body.
SIGNED_CONTENT_TYPE = "application/data"
#: Celery's protocol-2 "embed" part of a body; ours carry no callbacks.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
#: The keyword argument the verifier adds to the body of a task whose signature verified.
#: Its value is this process's secret (inherited by the forked pool, never sent anywhere),
#: so a message cannot claim it: a task without it was not signed, whatever it says.
VERIFIED_KWARG = "_prewarm_verified"
VERIFIED = secrets.token_hex(16)


class TaskSigner:
    """Signs task bodies with the scheduler's key (Celery's ``SecureSerializer``)."""

    def __init__(self, key_pem: bytes, cert_pem: bytes) -> None:
        from celery.security.certificate import Certificate
        from celery.security.key import PrivateKey
        from celery.security.serialization import SecureSerializer

        self._serializer = SecureSerializer(PrivateKey(key_pem), Certificate(cert_pem.decode()), None,
                                            digest="sha256")

    @classmethod
    def from_files(cls, key: Path, cert: Path) -> TaskSigner:
        """Raises: ConfigError: a file is missing, unreadable, or not an RSA key and its certificate."""
        try:
            return cls(key.read_bytes(), cert.read_bytes())
        except OSError as err:
            raise ConfigError(f"cannot read the task-signing key or certificate ({err.filename}: {err.strerror}); "
                              "check PREWARM_SIGNING_KEY and PREWARM_SIGNING_CERT") from None
        except Exception as err:  # noqa: BLE001 - celery wraps cryptography's errors in its own
            raise ConfigError(f"the task-signing key {key} or certificate {cert} is unusable ({err}); it must be "
                              "an RSA private key in PEM and its certificate") from None

    def sign(self, kwargs: dict[str, Any]) -> bytes:
        """The signed protocol-2 body of a task called with ``kwargs`` (and no positional args)."""
        body = self._serializer.serialize(((), kwargs, _EMBED))
        return body if isinstance(body, bytes) else body.encode()


def signer_from(settings: Settings) -> TaskSigner | None:
    """The scheduler's signer from PREWARM_SIGNING_KEY and PREWARM_SIGNING_CERT, or None without them.

    Raises:
        ConfigError: only one of the two is set, or they are unusable.
    """
    if settings.signing_key is None and settings.signing_cert is None:
        return None
    if settings.signing_key is None or settings.signing_cert is None:
        raise ConfigError("set both PREWARM_SIGNING_KEY and PREWARM_SIGNING_CERT (the scheduler's task-signing "
                          "key and its certificate), or neither")
    return TaskSigner.from_files(settings.signing_key, settings.signing_cert)


def keypair_paths(folder: Path) -> tuple[Path, Path]:
    """Where :func:`ensure_keypair` keeps the key and the certificate in ``folder``."""
    return folder / "signing.key", folder / "signing.crt"


def ensure_keypair(folder: Path) -> tuple[Path, Path]:
    """The key and certificate in ``folder``, made the first time (RSA 2048, self-signed, key 0600).

    Both appear at once (a folder renamed into place), so a certificate that exists is whole
    and its key is beside it.

    Raises:
        StoreError: the folder cannot be written (InsufficientSpace: the disk is full);
            nothing is left half-written.
    """
    key, cert = keypair_paths(folder)
    if key.is_file() and cert.is_file():
        return key, cert
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"prewarm scheduler {secrets.token_hex(4)}")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .sign(private, hashes.SHA256()))
    # The pair is written into a folder of its own, renamed into place whole: two runs that
    # make a pair at once never leave one's key beside the other's certificate.
    staging: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        fd = os.open(staging / key.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        (staging / cert.name).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        try:
            os.rename(staging, folder)  # fails if another run's pair (or an old folder) is there
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (key.is_file() and cert.is_file()):
                raise
    except OSError as err:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)  # a full disk leaves no half-written pair
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientSpace(f"no space left in {folder.parent} to write a task-signing key "
                                    f"({err.strerror}); free some space or point PREWARM_ROOT elsewhere") from None
        raise StoreError(f"cannot write a task-signing key in {folder}: {err.strerror}") from None
    return key, cert


#: Set by the embedded scheduler on the workers it starts before its key pair exists: the
#: seconds a worker may wait for the certificate named by PREWARM_TRUSTED_CERTS to appear.
CERT_WAIT_ENV = "PREWARM_EMBEDDED_CERT_WAIT"


def wait_for_certificate(trusted: str, timeout: float) -> None:
    """Return once a file matches ``trusted`` (a glob), or after ``timeout`` seconds.

    Why: an embedded run on an empty store starts its workers first and makes the key pair
    while they import (a new RSA key takes 0.02-0.15 s of the scheduler's start-up, which
    the workers would otherwise wait out before they start at all).  A worker gets to its
    certificate check ~0.1 s in; the pair is usually there by then.  If it never comes, the
    check that follows fails with its usual message.
    """
    import glob
    import time

    deadline = time.monotonic() + timeout
    while not glob.glob(trusted) and time.monotonic() < deadline:
        time.sleep(0.005)


def trusted_store(trusted: str) -> Any:
    """Celery's certificate store of the certificates matching ``trusted`` (a glob).

    ``prewarm worker`` calls it before it starts anything, so a wrong PREWARM_TRUSTED_CERTS
    is one line and exit 2 rather than a Celery worker that fails to start.

    Raises:
        ConfigError: no certificate matches ``trusted``, or one is unreadable or expired.
    """
    from celery.security.certificate import FSCertStore

    try:
        store = FSCertStore(trusted)
    except Exception as err:  # noqa: BLE001 - celery's SecurityError and cryptography's errors
        raise ConfigError(f"PREWARM_TRUSTED_CERTS={trusted!r}: {err}; give the scheduler's certificate(s)") from None
    if not list(store.itercerts()):
        raise ConfigError(f"PREWARM_TRUSTED_CERTS={trusted!r} matches no certificate; give the path of the "
                          "scheduler's certificate (a glob may name several)")
    return store


def install_verifier(trusted: str, on_refused: Callable[[str], None]) -> None:
    """Make this process verify ``auth`` bodies against the certificates matching ``trusted`` (a glob).

    ``on_refused`` is told about each body whose signature does not verify (it is then
    refused by Celery, before the task runs).  This process can verify, never sign.

    Raises:
        ConfigError: no certificate matches ``trusted``, or one is unreadable or expired.
    """
    from celery.exceptions import SecurityError
    from celery.security.serialization import SecureSerializer
    from kombu.serialization import registry

    store = trusted_store(trusted)
    verifier = SecureSerializer(None, None, store, digest="sha256")

    def refuse_to_sign(_: object) -> bytes:
        raise SecurityError("a worker does not sign tasks: it sends the scheduler's signed bodies")

    def verify(data: bytes) -> object:
        try:
            args, kwargs, embed = verifier.deserialize(data)
        except SecurityError as err:
            on_refused(str(err))
            raise
        except (TypeError, ValueError) as err:  # it verified, but is not a task body
            on_refused(f"not a task body: {err}")
            raise SecurityError(f"a signed body that is not a task: {err}") from None
        if not isinstance(kwargs, dict):
            on_refused("not a task body")
            raise SecurityError("a signed body whose keyword arguments are not a mapping")
        return args, {**kwargs, VERIFIED_KWARG: VERIFIED}, embed

    registry.register("auth", refuse_to_sign, verify, content_type=SIGNED_CONTENT_TYPE, content_encoding="utf-8")
