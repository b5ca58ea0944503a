"""The service fixtures start the real things."""

import redis
import requests


def test_redis_is_real_and_empty(redis_url: str) -> None:
    # Given a fresh database
    client = redis.Redis.from_url(redis_url)
    # Then it answers and holds nothing
    assert client.dbsize() == 0
    assert client.info("server")["redis_version"]


def test_registry_answers_v2(registry) -> None:
    resp = requests.get(f"{registry.url}/v2/", timeout=5)
    assert resp.status_code == 200
    assert resp.headers.get("Docker-Distribution-API-Version") == "registry/2.0"


def test_auth_registry_demands_credentials(auth_registry) -> None:
    resp = requests.get(f"{auth_registry.url}/v2/", timeout=5)
    assert resp.status_code == 401
    assert requests.get(f"{auth_registry.url}/v2/", auth=("alice", "s3cret-pw"), timeout=5).status_code == 200
