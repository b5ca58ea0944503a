"""Shared fixtures: real redis-server and docker-registry processes.

The servers are started once per session (they take a moment) and each test gets a
clean slate: Redis is flushed around every test that uses it; registry tests use
repository names of their own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.services import RedisServer, Registry, run_redis, run_registry

if TYPE_CHECKING:
    from tests.tokenserver import TokenRegistry

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (golden vectors, docs)."""
    env = os.environ.get("PREWARM_SHARED_DIR")
    path = Path(env) if env else SHARED
    if not path.is_dir():
        raise RuntimeError(f"{path} is missing: CI and the README expect ../shared beside the checkout")
    return path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with run_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of an empty Redis database, flushed again after the test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.flushall()
    client.close()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous docker-registry on loopback, shared by the session."""
    with run_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry that requires htpasswd basic auth (user ``alice``)."""
    with run_registry(tmp_path_factory.mktemp("auth-registry"), htpasswd=("alice", "s3cret-pw")) as reg:
        yield reg


@pytest.fixture()
def repo_name() -> str:
    """A repository name no other test uses."""
    return f"test/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def _token_registry_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    from tests.tokenserver import TokenRegistry, TokenServer

    folder = tmp_path_factory.mktemp("token-registry")
    with (TokenServer(folder, users={"alice": "s3cret-pw"}, refresh_tokens={"rt-alice-1": "alice"}) as tokens,
          run_registry(folder / "registry", auth_config=tokens.auth_config()) as reg):
        yield TokenRegistry(reg, tokens)


@pytest.fixture()
def token_registry(_token_registry_session: TokenRegistry) -> Iterator[TokenRegistry]:
    """A docker-registry with bearer-token auth (token server in tests/tokenserver.py; alice / s3cret-pw,
    identity token ``rt-alice-1``; anonymous pull allowed).  Token server settings reset per test."""
    tokens = _token_registry_session.tokens
    tokens.issued.clear()
    tokens.refused = 0
    yield _token_registry_session
    tokens.registry_validity = None
    tokens.reported_lifetime = 300
    tokens.allow_anonymous = True
