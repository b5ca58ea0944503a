"""deploy/: the Kubernetes manifests validate against the API schema and keep their promises."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


def _docs() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def test_every_manifest_validates_strictly() -> None:
    docs = _docs()
    assert len(docs) >= 8
    for (kind, name), doc in docs.items():
        # raises ValidationError naming the field on any schema violation
        kubernetes_validate.validate(doc, "1.30", strict=True)


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_worker_daemonset_runs_a_worker_and_the_shim_per_node() -> None:
    ds = _docs()[("DaemonSet", "prewarm-worker")]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in ds["containers"]}
    worker, shim = containers["worker"], containers["snapshotter"]
    assert worker["command"][:2] == ["prewarm", "worker"]
    assert shim["command"][:2] == ["prewarm", "snapshotter"]
    env = _env(worker)
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["PREWARM_BROKER_URL"]["value"].startswith("redis://:$(REDIS_PASSWORD)@")
    volumes = {v["name"]: v for v in ds["volumes"]}
    assert volumes["store"]["hostPath"]["path"] == "/var/lib/prewarm"
    assert volumes["containerd-sock"]["hostPath"]["path"] == "/run/containerd/containerd.sock"
    assert {"operator": "Exists"} in ds["tolerations"]
    for c in (worker, shim):
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_redis_is_persistent_and_password_protected() -> None:
    sts = _docs()[("StatefulSet", "prewarm-redis")]["spec"]
    args = sts["template"]["spec"]["containers"][0]["args"]
    assert "--requirepass" in args and "--appendonly" in args
    assert sts["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]


def test_flower_requires_auth_and_has_a_service() -> None:
    docs = _docs()
    flower = docs[("Deployment", "prewarm-flower")]["spec"]["template"]["spec"]["containers"][0]
    assert any(a.startswith("--basic-auth=") for a in flower["args"])
    assert docs[("Service", "prewarm-flower")]["spec"]["ports"][0]["port"] == 5555


def test_no_registry_credential_is_in_the_manifests() -> None:
    text = "\n".join(p.read_text() for p in DEPLOY.glob("*.yaml")).lower()
    assert "dockerconfigjson" not in text
    assert "registry_password" not in text


def test_workers_trust_only_the_schedulers_certificate_and_never_see_its_key() -> None:
    docs = _docs()
    worker = docs[("DaemonSet", "prewarm-worker")]["spec"]["template"]["spec"]
    job = docs[("Job", "prewarm-schedule-example")]["spec"]["template"]["spec"]
    secret = docs[("Secret", "prewarm-signing")]
    assert set(secret["stringData"]) == {"signing.key", "signing.crt"}
    # The worker runs only signed tasks, and its volume of the Secret holds the certificate alone
    env = _env(next(c for c in worker["containers"] if c["name"] == "worker"))
    assert env["PREWARM_TRUSTED_CERTS"]["value"].endswith("signing.crt")
    volumes = [v for v in worker["volumes"] if v.get("secret", {}).get("secretName") == "prewarm-signing"]
    assert volumes and all([i["key"] for i in v["secret"]["items"]] == ["signing.crt"] for v in volumes)
    # The schedule Job signs: key and certificate, read-only
    jenv = _env(job["containers"][0])
    assert jenv["PREWARM_SIGNING_KEY"]["value"].endswith("signing.key")
    assert jenv["PREWARM_SIGNING_CERT"]["value"].endswith("signing.crt")
