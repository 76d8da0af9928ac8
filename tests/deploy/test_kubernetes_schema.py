"""Every manifest validates: built-in kinds against the Kubernetes OpenAPI schemas (strict, so an
unknown or misspelt field fails), custom resources against a structural check of our own.

Built-in kinds are checked file by file as written, and again as rendered by every
kustomization. kubernetes-validate ships no schemas for ServiceMonitor (Prometheus Operator) or
CiliumNetworkPolicy (Cilium): for those, ``crd_errors`` checks the fields these manifests rely
on (allowed keys at each level, types, ports, protocols, selectors, durations, that regexes
compile) - not the full CRD schemas, which are not available offline.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.helpers import K8S, KUSTOMIZATIONS, rendered
from tests.deploy.kustomize import Manifest, load_documents

# The oldest Kubernetes these manifests support (preStop `sleep`, matchLabelKeys, nodeTaintsPolicy
# and unhealthyPodEvictionPolicy are all on by default from 1.30) and the newest schema shipped.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
MANIFEST_FILES = sorted(
    p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and "patches" not in p.parts
)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DURATION = re.compile(r"^([0-9]+(ms|s|m|h))+$")
CILIUM_PORT = re.compile(r"^([1-9][0-9]{0,4})$")


def _validate_builtin(manifest: Manifest, where: str) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            name = f"{manifest['kind']}/{manifest['metadata']['name']}"
            pytest.fail(f"{where}: {name} (k8s {version}): {path}: {exc.message}")


def _is_crd(manifest: Manifest) -> bool:
    return (manifest["apiVersion"], manifest["kind"]) in CRD_CHECKS


def test_manifest_files_are_found() -> None:
    names = {p.name for p in MANIFEST_FILES}
    assert {"deployment.yaml", "migrate-job.yaml", "networkpolicy.yaml", "ciliumnetworkpolicy.yaml"} <= names


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_each_file_validates_on_its_own(path: Path) -> None:
    docs = load_documents(path)
    assert docs, f"{path} holds no manifest"
    for manifest in docs:
        if _is_crd(manifest):
            assert not crd_errors(manifest), crd_errors(manifest)
        else:
            _validate_builtin(manifest, str(path.relative_to(K8S)))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_each_rendering_validates(name: str) -> None:
    for manifest in rendered(name):
        if _is_crd(manifest):
            assert not crd_errors(manifest), crd_errors(manifest)
        else:
            _validate_builtin(manifest, name)


# --- structural checks for the custom resources --------------------------------------------------


def _keys(obj: Any, allowed: set[str], where: str, errors: list[str], required: Collection[str] = ()) -> bool:
    if not isinstance(obj, dict):
        errors.append(f"{where}: not a mapping")
        return False
    if extra := set(obj) - allowed:
        errors.append(f"{where}: unknown keys {sorted(extra)}")
    if missing := set(required) - set(obj):
        errors.append(f"{where}: missing {sorted(missing)}")
    return True


def _metadata(manifest: Manifest, errors: list[str]) -> None:
    _keys(manifest, {"apiVersion", "kind", "metadata", "spec"}, "top level", errors, {"metadata", "spec"})
    meta = manifest.get("metadata", {})
    if _keys(meta, {"name", "namespace", "labels", "annotations"}, "metadata", errors, {"name"}):
        if not DNS_LABEL.match(str(meta.get("name", ""))):
            errors.append(f"metadata.name {meta.get('name')!r} is not a DNS label")
        for key, value in (meta.get("labels") or {}).items():
            if not isinstance(value, str) or len(value) > 63:
                errors.append(f"metadata.labels.{key}: not a string of at most 63 characters")


def _selector(sel: Any, where: str, errors: list[str]) -> None:
    if not _keys(sel, {"matchLabels", "matchExpressions"}, where, errors):
        return
    for key, value in (sel.get("matchLabels") or {}).items():
        if not isinstance(key, str) or not isinstance(value, str) or len(value) > 63:
            errors.append(f"{where}.matchLabels.{key}: values must be strings of at most 63 characters")
    for i, expr in enumerate(sel.get("matchExpressions") or []):
        w = f"{where}.matchExpressions[{i}]"
        _keys(expr, {"key", "operator", "values"}, w, errors, {"key", "operator"})
        op = expr.get("operator")
        if op not in {"In", "NotIn", "Exists", "DoesNotExist"}:
            errors.append(f"{w}: operator {op!r}")
        elif (op in {"In", "NotIn"}) != bool(expr.get("values")):
            errors.append(f"{w}: values are required for In/NotIn and forbidden otherwise")


def service_monitor_errors(manifest: Manifest) -> list[str]:
    errors: list[str] = []
    _metadata(manifest, errors)
    spec = manifest.get("spec", {})
    allowed = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels"}
    if not _keys(spec, allowed, "spec", errors, {"selector", "endpoints"}):
        return errors
    _selector(spec.get("selector"), "spec.selector", errors)
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return [*errors, "spec.endpoints: a non-empty list is required"]
    for i, ep in enumerate(endpoints):
        w = f"spec.endpoints[{i}]"
        allowed_ep = {"port", "path", "scheme", "interval", "scrapeTimeout", "tlsConfig", "honorLabels"}
        if not _keys(ep, allowed_ep, w, errors, {"port"}):
            continue
        if not isinstance(ep["port"], str):
            errors.append(f"{w}.port must be a Service port name")
        if ep.get("scheme", "http") not in {"http", "https"}:
            errors.append(f"{w}.scheme {ep.get('scheme')!r}")
        if not str(ep.get("path", "/metrics")).startswith("/"):
            errors.append(f"{w}.path must start with /")
        for field in ("interval", "scrapeTimeout"):
            if field in ep and not DURATION.match(str(ep[field])):
                errors.append(f"{w}.{field} {ep[field]!r} is not a duration")
    return errors


def _port_rules(rules: Any, where: str, errors: list[str]) -> None:
    if not isinstance(rules, list) or not rules:
        errors.append(f"{where}: a non-empty list is required")
        return
    for i, rule in enumerate(rules):
        w = f"{where}[{i}]"
        allowed = {"ports", "rules", "terminatingTLS", "originatingTLS", "serverNames"}
        if not _keys(rule, allowed, w, errors, {"ports"}):
            continue
        for j, port in enumerate(rule.get("ports") or []):
            pw = f"{w}.ports[{j}]"
            _keys(port, {"port", "protocol", "endPort"}, pw, errors, {"port"})
            if not isinstance(port.get("port"), str) or not CILIUM_PORT.match(port["port"]):
                errors.append(f"{pw}.port must be a quoted number")
            elif not 0 < int(port["port"]) < 65536:
                errors.append(f"{pw}.port out of range")
            if port.get("protocol", "ANY") not in {"TCP", "UDP", "SCTP", "ANY"}:
                errors.append(f"{pw}.protocol {port.get('protocol')!r}")
        l7 = rule.get("rules")
        if l7 is None:
            continue
        if not _keys(l7, {"http", "dns"}, f"{w}.rules", errors) or len(l7) != 1:
            errors.append(f"{w}.rules: exactly one of http, dns")
            continue
        for k, r in enumerate(l7.get("http") or []):
            hw = f"{w}.rules.http[{k}]"
            _keys(r, {"method", "path", "host", "headers"}, hw, errors)
            for field in ("method", "path"):
                try:
                    re.compile(str(r.get(field, "")))
                except re.error as exc:
                    errors.append(f"{hw}.{field}: {exc}")
        for k, r in enumerate(l7.get("dns") or []):
            _keys(r, {"matchName", "matchPattern"}, f"{w}.rules.dns[{k}]", errors)


def cilium_network_policy_errors(manifest: Manifest) -> list[str]:
    errors: list[str] = []
    _metadata(manifest, errors)
    spec = manifest.get("spec", {})
    if not _keys(
        spec, {"endpointSelector", "ingress", "egress", "description"}, "spec", errors, {"endpointSelector"}
    ):
        return errors
    _selector(spec["endpointSelector"], "spec.endpointSelector", errors)
    if not (spec.get("ingress") or spec.get("egress")):
        errors.append("spec: neither ingress nor egress rules")
    peers = {
        "ingress": {"fromEndpoints", "fromCIDRSet", "fromEntities"},
        "egress": {"toEndpoints", "toCIDRSet", "toFQDNs"},
    }
    for direction, peer_keys in peers.items():
        for i, rule in enumerate(spec.get(direction) or []):
            w = f"spec.{direction}[{i}]"
            if not _keys(rule, peer_keys | {"toPorts"}, w, errors):
                continue
            # Every rule names its peers: a rule with ports only would allow any peer.
            if not peer_keys & set(rule):
                errors.append(f"{w}: no peer ({', '.join(sorted(peer_keys))})")
            for key in ("fromEndpoints", "toEndpoints"):
                for j, sel in enumerate(rule.get(key) or []):
                    _selector(sel, f"{w}.{key}[{j}]", errors)
            for key in ("fromCIDRSet", "toCIDRSet"):
                for j, entry in enumerate(rule.get(key) or []):
                    if _keys(entry, {"cidr", "except"}, f"{w}.{key}[{j}]", errors, {"cidr"}):
                        try:
                            ipaddress.ip_network(entry["cidr"])
                        except ValueError as exc:
                            errors.append(f"{w}.{key}[{j}].cidr: {exc}")
            for j, fqdn in enumerate(rule.get("toFQDNs") or []):
                if _keys(fqdn, {"matchName", "matchPattern"}, f"{w}.toFQDNs[{j}]", errors) and len(fqdn) != 1:
                    errors.append(f"{w}.toFQDNs[{j}]: exactly one of matchName, matchPattern")
            if "toPorts" in rule:
                _port_rules(rule["toPorts"], f"{w}.toPorts", errors)
    return errors


CRD_CHECKS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): service_monitor_errors,
    ("cilium.io/v2", "CiliumNetworkPolicy"): cilium_network_policy_errors,
}


def crd_errors(manifest: Manifest) -> list[str]:
    return CRD_CHECKS[(manifest["apiVersion"], manifest["kind"])](manifest)


@pytest.mark.parametrize(
    ("kind", "mutate", "message"),
    [
        ("ServiceMonitor", lambda m: m["spec"]["endpoints"][0].update(port=8400), "port name"),
        ("ServiceMonitor", lambda m: m["spec"]["endpoints"][0].update(interval="30"), "duration"),
        (
            "CiliumNetworkPolicy",
            lambda m: m["spec"]["ingress"][0]["toPorts"][0]["ports"][0].update(port=8400),
            "quoted",
        ),
        ("CiliumNetworkPolicy", lambda m: m["spec"]["ingress"][0].pop("fromEndpoints"), "no peer"),
        ("CiliumNetworkPolicy", lambda m: m["spec"].update(ingres=[]), "unknown keys"),
    ],
)
def test_structural_checks_catch_mistakes(kind: str, mutate: Any, message: str) -> None:
    """The home-made CRD checks are not vacuous: typical mistakes are reported."""
    import copy

    manifest = copy.deepcopy(next(m for m in rendered("overlay-example") if m["kind"] == kind))
    assert crd_errors(manifest) == []
    mutate(manifest)
    assert any(message in e for e in crd_errors(manifest)), crd_errors(manifest)
