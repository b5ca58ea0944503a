"""Credentials from Docker's ``config.json``, read on the node that uses them.

Credentials stay on the node: tasks carry reference strings only, and each process
reads its own ``config.json`` (``$DOCKER_CONFIG/config.json``, default ``~/.docker``).
Supported: ``auths`` entries with base64 ``auth`` (``user:password``), separate
``username``/``password``, ``identitytoken`` (an OAuth2 refresh token), and the
``credHelpers``/``credsStore`` programs (``docker-credential-<name> get``).

:class:`Credential` never shows its secrets in ``repr`` or ``str``, so an accidental
log line or exception message cannot leak them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prewarm.errors import ConfigError

#: Docker Hub's server address: its key in config.json as ``docker login`` writes it, and
#: what Docker hands a credential helper for Hub.
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
#: Other keys Hub's credentials are found under, after :data:`DOCKER_HUB_SERVER`.
DOCKER_HUB_KEYS = (DOCKER_HUB_SERVER, "https://index.docker.io/v1", "index.docker.io", "docker.io",
                   "registry-1.docker.io", "https://registry-1.docker.io")
_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
#: How long a credential helper may take before we give up on it.
HELPER_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class Credential:
    """A username/password pair or an identity token for one registry."""

    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    identity_token: str | None = dataclasses.field(default=None, repr=False)

    def __str__(self) -> str:
        kind = "identity token" if self.identity_token else "password"
        return f"credential for {self.username or '(token)'} ({kind})"


def _host_key(key: str) -> str:
    """``https://host:port/v1/`` -> ``host:port``: how ``auths`` keys are matched."""
    key = key.strip()
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0].lower()


class DockerConfig:
    """The ``auths`` / ``credHelpers`` / ``credsStore`` of one ``config.json``."""

    def __init__(self, raw: Mapping[str, Any] | None = None, source: str = "config.json") -> None:
        raw = raw or {}
        self.source = source
        auths = raw.get("auths") or {}
        helpers = raw.get("credHelpers") or {}
        if not isinstance(auths, Mapping) or not isinstance(helpers, Mapping):
            raise ConfigError(f"{source}: 'auths' and 'credHelpers' must be JSON objects")
        # Exact keys first (Docker's own lookup), then by host for the other spellings.
        self._auths_exact = {str(k): v for k, v in auths.items() if isinstance(v, Mapping)}
        self._auths = {_host_key(k): v for k, v in auths.items() if isinstance(v, Mapping)}
        self._helpers_exact = {str(k): str(v) for k, v in helpers.items()}
        self._helpers = {_host_key(k): str(v) for k, v in helpers.items()}
        store = raw.get("credsStore")
        self._store = str(store) if store else None

    @classmethod
    def load(cls, config_dir: Path | None) -> DockerConfig:
        """Read ``config_dir/config.json``; a missing file means no credentials.

        Raises:
            ConfigError: the file exists but is not a JSON object (its content is not echoed).
        """
        if config_dir is None:
            config_dir = Path.home() / ".docker"
        path = Path(config_dir) / "config.json"
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls({}, str(path))
        except OSError as err:
            raise ConfigError(f"cannot read {path}: {err.strerror}; fix its permissions or set DOCKER_CONFIG") \
                from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON (line {err.lineno}); fix it or set DOCKER_CONFIG "
                              "to another directory") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls(raw, str(path))

    def credential_for(self, registry: str) -> Credential | None:
        """The credential for ``registry`` (as users name it, e.g. ``docker.io``), or None.

        Raises:
            ConfigError: an entry is malformed, or a credential helper fails.
        """
        hub = registry.lower() in _HUB_NAMES
        # Docker Hub is known to config.json and to credential helpers by its server
        # address, not by a host name: ask for it the way Docker does.
        server = DOCKER_HUB_SERVER if hub else registry
        exact = [DOCKER_HUB_SERVER] if hub else [registry]
        keys = list(dict.fromkeys(_host_key(k) for k in DOCKER_HUB_KEYS)) if hub else [registry.lower()]
        for key in exact:
            if key in self._helpers_exact:
                return self._from_helper(self._helpers_exact[key], server)
        for key in keys:
            if key in self._helpers:
                return self._from_helper(self._helpers[key], server)
        for table, names in ((self._auths_exact, exact), (self._auths, keys)):
            for key in names:
                if key in table:
                    cred = self._from_entry(table[key], registry)
                    if cred is not None:
                        return cred
        if self._store:
            return self._from_helper(self._store, server)
        return None

    def _from_entry(self, entry: Mapping[str, Any], registry: str) -> Credential | None:
        token = entry.get("identitytoken") or None
        username, password = entry.get("username"), entry.get("password")
        encoded = entry.get("auth")
        if encoded:
            try:
                decoded = base64.b64decode(encoded, validate=False).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise ConfigError(f"{self.source}: the 'auth' entry for {registry} is not base64 of "
                                  "user:password; run docker login again") from None
            if ":" not in decoded:
                raise ConfigError(f"{self.source}: the 'auth' entry for {registry} does not hold "
                                  "user:password; run docker login again")
            username, password = decoded.split(":", 1)
        if token:
            return Credential(username=username or None, identity_token=str(token))
        if username and password is not None:
            return Credential(username=str(username), password=str(password))
        return None

    def _from_helper(self, helper: str, registry: str) -> Credential | None:
        program = f"docker-credential-{helper}"
        try:
            proc = subprocess.run([program, "get"], input=registry.encode(), capture_output=True,
                                  timeout=HELPER_TIMEOUT, check=False)
        except FileNotFoundError:
            raise ConfigError(f"{self.source} names credential helper {program!r} for {registry}, "
                              "but it is not on PATH; install it or remove the entry") from None
        except subprocess.TimeoutExpired:
            raise ConfigError(f"credential helper {program} did not answer for {registry} within "
                              f"{HELPER_TIMEOUT:.0f}s") from None
        if proc.returncode != 0:
            if b"credentials not found" in proc.stdout.lower() + proc.stderr.lower():
                return None
            raise ConfigError(f"credential helper {program} failed for {registry} "
                              f"(exit {proc.returncode})")
        try:
            raw = json.loads(proc.stdout)
            username, secret = raw.get("Username"), raw.get("Secret")
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f"credential helper {program} answered {registry} with something that is "
                              "not JSON {Username, Secret}") from None
        if not secret:
            return None
        if username == "<token>":
            return Credential(identity_token=str(secret))
        return Credential(username=str(username), password=str(secret))
