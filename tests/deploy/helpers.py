"""Paths, rendering and small accessors shared by the deployment tests."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from kms_service.settings import Settings
from tests.deploy.kustomize import Manifest, render

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
README = DEPLOY / "README.md"
CILIUM_VALUES = DEPLOY / "cilium" / "values.yaml"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"

# Every kustomization under deploy/kubernetes, rendered on its own.
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "network-portable": K8S / "network" / "portable",
    "network-cilium": K8S / "network" / "cilium",
    "overlay-example": K8S / "overlays" / "example",
}
# The ones that hold the workload (a Deployment and its Job).
WORKLOADS = ("base", "overlay-example")

NAMESPACE = "kms"
SERVICE_UID = 10001
API_PORT = 8400
API_SELECTOR = {"app.kubernetes.io/name": "kms-service", "app.kubernetes.io/component": "api"}
# RFC 5737 documentation ranges: the placeholders of the base policies.
PLACEHOLDER_NETS = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)


@cache
def _rendered(name: str) -> tuple[Manifest, ...]:
    return tuple(render(KUSTOMIZATIONS[name]))


def rendered(name: str) -> list[Manifest]:
    """The rendering of one kustomization (cached; callers must not mutate it)."""
    return list(_rendered(name))


def only(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def pod_spec(workload: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Init containers, then containers."""
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def main_container(workload: Manifest) -> dict[str, Any]:
    first: dict[str, Any] = pod_spec(workload)["containers"][0]
    return first


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels + matchExpressions) against a label set."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        present = expr["key"] in labels
        value = labels.get(expr["key"])
        op = expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and present and value in expr["values"]:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def mount_source(spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The volume that backs file ``path`` in ``container``, and the path inside the volume."""
    best: tuple[dict[str, Any], str] | None = None
    best_len = -1
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if (path == root or path.startswith(root + "/")) and len(root) > best_len:
            best = (volumes[mount["name"]], path[len(root) :].lstrip("/"))
            best_len = len(root)
    assert best is not None, f"{path} is not on any volume of container {container['name']}"
    return best


def is_placeholder(cidr: str) -> bool:
    net = ipaddress.ip_network(cidr, strict=False)
    return any(net.version == p.version and net.subnet_of(p) for p in PLACEHOLDER_NETS)  # type: ignore[arg-type]


def server_terminates_tls() -> bool:
    """Whether `kms serve` has its TLS settings yet (another engineer is adding them). The
    manifests already set KMS_TLS_*; once these settings exist the server will use them, and the
    probes, the ServiceMonitor and the Cilium HTTP rules must change with it (the tests say how)."""
    return "tls_cert_file" in Settings.model_fields
