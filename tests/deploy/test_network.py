"""Network policies (portable and Cilium) and the Cilium WireGuard values."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
import yaml

from tests.deploy.helpers import (
    API_PORT,
    API_SELECTOR,
    CILIUM_VALUES,
    KUSTOMIZATIONS,
    is_placeholder,
    matches,
    of_kind,
    only,
    pod_labels,
    rendered,
    server_terminates_tls,
)
from tests.deploy.kustomize import Manifest

AGENT_LABEL = {"kms-service.dev/agent": "true"}
ADMIN_LABEL = {"kms-service.dev/admin": "true"}
NS_LABEL_PREFIX = "k8s:io.cilium.k8s.namespace.labels."


def policies(name: str, kind: str) -> list[Manifest]:
    return of_kind(rendered(name), kind)


def api_pod_labels() -> dict[str, str]:
    return pod_labels(only(rendered("base"), "Deployment"))


def job_pod_labels() -> dict[str, str]:
    return pod_labels(only(rendered("base"), "Job"))


def test_default_deny_for_the_whole_namespace() -> None:
    for name in ("base", "overlay-example"):
        deny = only(rendered(name), "NetworkPolicy", "default-deny")
        assert deny["spec"]["podSelector"] == {}
        assert sorted(deny["spec"]["policyTypes"]) == ["Egress", "Ingress"]
        assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]


def test_overlay_uses_one_policy_flavour() -> None:
    """On Cilium an L3/L4 allow from a NetworkPolicy would switch off the CNP's HTTP rules for the
    same peers: the overlay must not carry NetworkPolicy allow rules besides the default deny."""
    overlay = rendered("overlay-example")
    assert of_kind(overlay, "CiliumNetworkPolicy")
    for np in of_kind(overlay, "NetworkPolicy"):
        assert not np["spec"].get("ingress") and not np["spec"].get("egress"), np["metadata"]["name"]


# --- portable NetworkPolicy -----------------------------------------------------------------------


def test_portable_ingress_only_from_agents_admins_and_prometheus() -> None:
    (ingress,) = [
        p for p in policies("network-portable", "NetworkPolicy") if "Ingress" in p["spec"]["policyTypes"]
    ]
    assert matches(ingress["spec"]["podSelector"], api_pod_labels())
    assert not matches(ingress["spec"]["podSelector"], job_pod_labels())
    rules = ingress["spec"]["ingress"]
    for rule in rules:
        assert [p["port"] for p in rule["ports"]] == [API_PORT]
        assert len(rule["from"]) == 1, "one peer per rule keeps AND/OR semantics obvious"
    peers = [rule["from"][0] for rule in rules]
    # Agents: pod label AND namespace label, in one peer (two peers would mean OR).
    assert {
        "namespaceSelector": {"matchLabels": AGENT_LABEL},
        "podSelector": {"matchLabels": AGENT_LABEL},
    } in peers
    assert {"namespaceSelector": {"matchLabels": ADMIN_LABEL}} in peers
    for peer in peers:
        assert "ipBlock" not in peer
        assert peer.get("namespaceSelector", {}).get("matchLabels"), "no cluster-wide peers"


def _egress_ports(rule: dict[str, Any]) -> set[int]:
    return {p["port"] for p in rule["ports"]}


def test_portable_egress_is_dns_postgres_and_backends_only() -> None:
    nps = {p["metadata"]["name"]: p for p in policies("network-portable", "NetworkPolicy")}
    api_egress, job_egress = nps["kms-api-egress"], nps["kms-migrate-egress"]
    assert matches(api_egress["spec"]["podSelector"], api_pod_labels())
    assert matches(job_egress["spec"]["podSelector"], job_pod_labels())
    assert [_egress_ports(r) for r in api_egress["spec"]["egress"]] == [{53}, {5432}, {443, 5696}]
    assert [_egress_ports(r) for r in job_egress["spec"]["egress"]] == [{53}, {5432}]
    for np in (api_egress, job_egress):
        for rule in np["spec"]["egress"]:
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    assert is_placeholder(peer["ipBlock"]["cidr"]), "base CIDRs are documented placeholders"
                    assert ipaddress.ip_network(peer["ipBlock"]["cidr"]).prefixlen >= 16
                else:
                    assert peer["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}


# --- CiliumNetworkPolicy --------------------------------------------------------------------------


def _cnp_ingress_rules() -> list[dict[str, Any]]:
    cnp = only(rendered("overlay-example"), "CiliumNetworkPolicy", "kms-api-ingress")
    assert cnp["spec"]["endpointSelector"] == {"matchLabels": API_SELECTOR}
    rules: list[dict[str, Any]] = cnp["spec"]["ingress"]
    return rules


def _port_rule_for(peer_key: str) -> dict[str, Any]:
    for rule in _cnp_ingress_rules():
        (peer,) = rule["fromEndpoints"]
        if peer_key in peer.get("matchLabels", {}):
            (port_rule,) = rule["toPorts"]
            return dict(port_rule)
    raise AssertionError(f"no ingress rule for {peer_key}")


@pytest.mark.parametrize(
    "peer_key",
    [
        NS_LABEL_PREFIX + "kms-service.dev/agent",
        NS_LABEL_PREFIX + "kms-service.dev/admin",
        "k8s:io.kubernetes.pod.namespace",  # Prometheus
    ],
)
def test_each_caller_reaches_only_the_api_port(peer_key: str) -> None:
    """`kms serve` terminates TLS, so the CNP holds callers at L3/L4: the API port over TCP and
    nothing else; which calls a caller may make is the service's decision (scoped credentials)."""
    port_rule = _port_rule_for(peer_key)
    assert port_rule["ports"] == [{"port": str(API_PORT), "protocol": "TCP"}]
    assert "rules" not in port_rule, "L7 rules cannot see inside TLS (deploy/README.md)"


def test_cnp_has_exactly_the_three_callers() -> None:
    assert len(_cnp_ingress_rules()) == 3


def test_cilium_peers_are_labelled_pods_in_labelled_namespaces() -> None:
    for rule in _cnp_ingress_rules():
        (peer,) = rule["fromEndpoints"]
        labels = peer.get("matchLabels", {})
        namespaced = "k8s:io.kubernetes.pod.namespace" in labels or any(
            k.startswith(NS_LABEL_PREFIX) for k in labels
        )
        assert namespaced, f"peer {peer} is not restricted by namespace"
        if any(k.startswith(NS_LABEL_PREFIX) for k in labels):
            # Cilium scopes fromEndpoints to the policy's own namespace unless told otherwise.
            assert {"key": "k8s:io.kubernetes.pod.namespace", "operator": "Exists"} in peer[
                "matchExpressions"
            ]
    agent_peer = _cnp_ingress_rules()[0]["fromEndpoints"][0]["matchLabels"]
    assert (
        agent_peer["kms-service.dev/agent"] == agent_peer[NS_LABEL_PREFIX + "kms-service.dev/agent"] == "true"
    )


def test_http_rules_only_while_the_port_speaks_http() -> None:
    """Envoy cannot read paths inside TLS: once `kms serve` terminates TLS, HTTP rules on its port
    would drop every request (deploy/README.md, "TLS and the network policy")."""
    for rule in _cnp_ingress_rules():
        for port_rule in rule["toPorts"]:
            has_http = "http" in port_rule.get("rules", {})
            if server_terminates_tls():
                assert not has_http or "terminatingTLS" in port_rule, (
                    "kms serve terminates TLS now: replace the CNP HTTP rules (see deploy/README.md)"
                )
            else:
                assert has_http, "while the API speaks HTTP, every caller is held to an HTTP allow-list"


def test_cilium_egress_covers_both_workloads_and_names_real_endpoints_in_the_overlay() -> None:
    base = {p["metadata"]["name"]: p for p in policies("network-cilium", "CiliumNetworkPolicy")}
    overlay = {p["metadata"]["name"]: p for p in policies("overlay-example", "CiliumNetworkPolicy")}
    for name in ("kms-egress-dns", "kms-egress-postgres"):
        selector = base[name]["spec"]["endpointSelector"]
        assert matches(selector, api_pod_labels()) and matches(selector, job_pod_labels()), name
    assert not matches(base["kms-egress-backends"]["spec"]["endpointSelector"], job_pod_labels())
    for name in ("kms-egress-postgres", "kms-egress-backends"):
        cidrs = [c["cidr"] for r in base[name]["spec"]["egress"] for c in r.get("toCIDRSet", [])]
        assert cidrs and all(is_placeholder(c) for c in cidrs), f"{name}: base egress is a placeholder"
    # The example overlay replaced every placeholder with named endpoints.
    for policy in overlay.values():
        for rule in policy["spec"].get("egress", []):
            for c in rule.get("toCIDRSet", []):
                assert not is_placeholder(c["cidr"]), f"{policy['metadata']['name']} keeps a placeholder"
    fqdns = {f["matchName"] for r in overlay["kms-egress-backends"]["spec"]["egress"] for f in r["toFQDNs"]}
    assert "kms.eu-central-1.amazonaws.com" in fqdns


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_no_policy_allows_the_world(name: str) -> None:
    for cnp in policies(name, "CiliumNetworkPolicy"):
        for direction in ("ingress", "egress"):
            for rule in cnp["spec"].get(direction, []):
                assert not {"world", "all", "cluster"} & set(
                    rule.get("fromEntities", []) + rule.get("toEntities", [])
                )
                for c in rule.get("toCIDRSet", []) + rule.get("fromCIDRSet", []):
                    assert ipaddress.ip_network(c["cidr"]).prefixlen >= 16, c
    for np in policies(name, "NetworkPolicy"):
        for rule in np["spec"].get("ingress", []) + np["spec"].get("egress", []):
            assert rule.get("from", rule.get("to")), "a rule without peers allows everyone"


# --- Cilium Helm values -------------------------------------------------------------------------


def _values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(CILIUM_VALUES.read_text())
    return values


def test_cilium_wireguard_strict_mode() -> None:
    enc = _values()["encryption"]
    assert enc["enabled"] is True
    assert enc["type"] == "wireguard"
    assert enc["nodeEncryption"] is True
    egress = enc["strictMode"]["egress"]
    assert egress["enabled"] is True
    assert egress["allowRemoteNodeIdentities"] is False
    strict = ipaddress.ip_network(egress["cidr"])
    assert strict.version == 4, "strict mode is IPv4 only"
    pod_cidrs = _values()["ipam"]["operator"]["clusterPoolIPv4PodCIDRList"]
    assert pod_cidrs and all(ipaddress.ip_network(c).subnet_of(strict) for c in pod_cidrs)  # type: ignore[arg-type]
    assert _values()["l7Proxy"] is True, "the toFQDNs egress rules need the DNS proxy (part of the L7 proxy)"


def test_cilium_values_do_not_use_the_removed_flat_strict_mode_keys() -> None:
    """Cilium 1.20 removed encryption.strictMode.{enabled,cidr,allowRemoteNodeIdentities}; Helm
    ignores unknown keys, so the old spelling would silently leave strict mode off."""
    strict = _values()["encryption"]["strictMode"]
    assert set(strict) <= {"egress", "ingress"}, (
        f"flat strict-mode keys: {sorted(set(strict) - {'egress', 'ingress'})}"
    )
