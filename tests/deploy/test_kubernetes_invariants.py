"""Security and availability invariants of the rendered workload (base and the example overlay)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from kms_service.settings import Settings
from tests.deploy.helpers import (
    API_PORT,
    API_SELECTOR,
    NAMESPACE,
    README,
    SERVICE_UID,
    WORKLOADS,
    containers,
    env_of,
    main_container,
    matches,
    mount_source,
    of_kind,
    only,
    pod_labels,
    pod_spec,
    rendered,
    server_terminates_tls,
)
from tests.deploy.kustomize import Manifest, split_image

HEALTH = "/v1/sys/health"
# Read by the service outside Settings (kms_service/seal.py).
NOT_SETTINGS = {"KMS_SEAL_SECRETS_FILE"}


def workloads(name: str) -> list[Manifest]:
    manifests = rendered(name)
    return [only(manifests, "Deployment", "kms"), only(manifests, "Job", "kms-migrate")]


def _cpu(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _mem(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(value[: -len(suffix)]) * factor
    return int(value)


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_container_is_locked_down(name: str) -> None:
    for workload in workloads(name):
        spec = pod_spec(workload)
        pod_sc = spec.get("securityContext", {})
        where = f"{name}: {workload['kind']}/{workload['metadata']['name']}"
        assert spec.get("automountServiceAccountToken") is False, where
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for c in containers(spec):
            sc = c.get("securityContext", {})
            cw = f"{where} container {c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, cw
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) == SERVICE_UID, cw
            assert sc.get("readOnlyRootFilesystem") is True, cw
            assert sc.get("allowPrivilegeEscalation") is False, cw
            assert sc.get("privileged", False) is False, cw
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], cw
            assert not sc.get("capabilities", {}).get("add"), cw
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", cw
            resources = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{cw}: {kind}"
            assert _cpu(resources["limits"]["cpu"]) >= _cpu(resources["requests"]["cpu"]), cw
            assert _mem(resources["limits"]["memory"]) >= _mem(resources["requests"]["memory"]), cw
            _, tag, digest = split_image(c["image"])
            assert (tag and tag != "latest") or digest, f"{cw}: image {c['image']} is not pinned"


@pytest.mark.parametrize("name", WORKLOADS)
def test_writable_paths_are_volumes(name: str) -> None:
    """Read-only root: /tmp and the data directory are emptyDir volumes in the long-running pod."""
    deployment = only(rendered(name), "Deployment")
    spec, kms = pod_spec(deployment), main_container(deployment)
    data_dir = env_of(kms)["KMS_DATA_DIR"]["value"]
    for path in ("/tmp", data_dir):
        volume, _ = mount_source(spec, kms, path + "/x")
        assert "emptyDir" in volume, f"{path} is not on an emptyDir"
    job = only(rendered(name), "Job")
    volume, _ = mount_source(pod_spec(job), main_container(job), "/tmp/x")
    assert "emptyDir" in volume


@pytest.mark.parametrize("name", WORKLOADS)
def test_replicas_spread_and_disruption_budget(name: str) -> None:
    manifests = rendered(name)
    deployment = only(manifests, "Deployment")
    spec = deployment["spec"]
    labels = pod_labels(deployment)
    assert spec["replicas"] >= 3
    assert spec["selector"]["matchLabels"] == API_SELECTOR
    assert matches(spec["selector"], labels)
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    spread = {c["topologyKey"]: c for c in pod_spec(deployment)["topologySpreadConstraints"]}
    assert set(spread) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in spread.values():
        assert constraint["maxSkew"] == 1
        assert matches(constraint["labelSelector"], labels)

    pdb = only(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == spec["selector"]
    if "maxUnavailable" in pdb["spec"]:
        assert pdb["spec"]["maxUnavailable"] == 1
    else:
        assert 2 <= pdb["spec"]["minAvailable"] < spec["replicas"]

    hpa = only(manifests, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kms"}
    assert hpa["spec"]["minReplicas"] == spec["replicas"], "kubectl apply would fight the HPA"
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]


@pytest.mark.parametrize("name", WORKLOADS)
def test_probes(name: str) -> None:
    deployment = only(rendered(name), "Deployment")
    kms = main_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in kms["ports"]}
    assert ports == {"api": API_PORT}
    expected_scheme = "HTTPS" if server_terminates_tls() else "HTTP"
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = kms[probe_name]["httpGet"]
        assert ports.get(probe["port"], probe["port"]) == API_PORT, probe_name
        assert probe.get("scheme", "HTTP") == expected_scheme, (
            f"{probe_name}: `kms serve` {'now' if expected_scheme == 'HTTPS' else 'does not yet'} "
            "terminate TLS: probes must use " + expected_scheme
        )
    assert kms["readinessProbe"]["httpGet"]["path"] == HEALTH
    # The health endpoint answers 503 while the database is down: liveness must not use it, or a
    # database outage would restart every pod.
    assert kms["livenessProbe"]["httpGet"]["path"] != HEALTH
    assert kms["startupProbe"]["httpGet"]["path"] != HEALTH


@pytest.mark.parametrize("name", WORKLOADS)
def test_service_and_service_monitor_select_the_api_pods(name: str) -> None:
    manifests = rendered(name)
    deployment, job = only(manifests, "Deployment"), only(manifests, "Job")
    service = only(manifests, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert matches({"matchLabels": service["spec"]["selector"]}, pod_labels(deployment))
    assert not matches({"matchLabels": service["spec"]["selector"]}, pod_labels(job))
    (port,) = service["spec"]["ports"]
    assert port["port"] == API_PORT
    assert {p["name"]: p["containerPort"] for p in main_container(deployment)["ports"]}[
        port["targetPort"]
    ] == API_PORT
    monitor = only(manifests, "ServiceMonitor")
    assert matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] == "/metrics"
    assert endpoint.get("scheme", "http") == ("https" if server_terminates_tls() else "http")


@pytest.mark.parametrize("name", WORKLOADS)
def test_secrets_come_from_files(name: str) -> None:
    deployment = only(rendered(name), "Deployment")
    spec, kms = pod_spec(deployment), main_container(deployment)
    env = env_of(kms)
    for workload in workloads(name):
        for c in containers(pod_spec(workload)):
            names = set(env_of(c))
            assert "KMS_DATABASE_URL" not in names, "the database URL (with its password) must be a file"
            for e in c.get("env", []):
                secretish = re.search(r"PASSWORD|TOKEN|SECRET|KEY$", e["name"]) and not e["name"].endswith(
                    "_FILE"
                )
                assert not secretish or "value" not in e, e
    # Database URL: a file on a Secret volume, readable by the service's group only.
    volume, key = mount_source(spec, kms, env["KMS_DATABASE_URL_FILE"]["value"])
    assert "secret" in volume
    assert {i["path"]: i["key"] for i in volume["secret"]["items"]}[key] == "url"
    # Master secret: the sealed file (default) from a Secret, copied to <data dir> with mode 0600.
    data_dir = env["KMS_DATA_DIR"]["value"]
    (installer,) = pod_spec(deployment)["initContainers"]
    source, target = installer["command"][-2:]
    assert installer["command"][:3] == ["install", "-m", "0600"]
    assert target == f"{data_dir}/master.sealed.json"
    volume, key = mount_source(spec, installer, source)
    assert volume["secret"]["secretName"] == "kms-master-sealed"
    assert mount_source(spec, installer, target)[0] == mount_source(spec, kms, target)[0]
    volume, key = mount_source(spec, kms, env["KMS_SEAL_SECRETS_FILE"]["value"])
    assert volume["secret"]["secretName"] == "kms-seal-secrets"
    assert "KMS_SEAL_SECRETS" not in env, "the seal secrets are a file, not an environment value"
    assert "KMS_MASTER_SECRET_FILE" not in env, "the sealed master secret is the default"
    # Secret and CA files: never readable by others.
    for v in spec["volumes"]:
        for kind in ("secret", "configMap"):
            if kind in v:
                assert v[kind]["defaultMode"] & 0o007 == 0 or kind == "configMap", v["name"]
                assert v[kind]["defaultMode"] & 0o222 == 0, v["name"]


@pytest.mark.parametrize("name", WORKLOADS)
def test_tls_material_is_planned_from_a_secret(name: str) -> None:
    deployment = only(rendered(name), "Deployment")
    spec, kms = pod_spec(deployment), main_container(deployment)
    env = env_of(kms)
    for var in ("KMS_TLS_CERT_FILE", "KMS_TLS_KEY_FILE", "KMS_TLS_CLIENT_CA_FILE"):
        path = env[var]["value"]
        assert path.startswith("/etc/kms/tls/"), var
        volume, key = mount_source(spec, kms, path)
        assert volume["secret"]["secretName"] == "kms-tls"
        assert key in {i["path"] for i in volume["secret"]["items"]}
    # Verified TLS to PostgreSQL unless the URL says otherwise (asyncpg reads PGSSLMODE).
    assert env["PGSSLMODE"]["value"] == "verify-full"
    volume, _ = mount_source(spec, kms, env["PGSSLROOTCERT"]["value"])
    assert "configMap" in volume or "secret" in volume


@pytest.mark.parametrize("name", WORKLOADS)
def test_kms_environment_names_are_real_settings(name: str) -> None:
    """Settings ignore unknown KMS_* names, so a typo would silently do nothing."""
    known = {f"KMS_{field.upper()}" for field in Settings.model_fields}
    values: dict[str, Any] = {}
    for workload in workloads(name):
        for c in containers(pod_spec(workload)):
            for var in c.get("env", []):
                if var["name"].startswith("KMS_"):
                    assert var["name"] in known | NOT_SETTINGS, f"{var['name']} is not a kms setting"
                    if (
                        var["name"] in known
                        and "value" in var
                        # Files are not read here, except that the TLS ones are only paths at
                        # validation (their combination is checked: cert+key, CA for client certs).
                        and (
                            not var["name"].endswith(("_FILE", "_DIR")) or var["name"].startswith("KMS_TLS_")
                        )
                    ):
                        values[var["name"][4:].lower()] = var["value"]
    Settings(**values)  # the literal values validate (listen, workers, log level ...)


@pytest.mark.parametrize("name", WORKLOADS)
def test_migration_job(name: str) -> None:
    manifests = rendered(name)
    deployment, job = only(manifests, "Deployment"), only(manifests, "Job")
    migrate = main_container(job)
    assert migrate["args"] == ["migrate"]
    assert main_container(deployment)["args"] == ["serve"]
    assert migrate["image"] == main_container(deployment)["image"], (
        "migrate with the release being rolled out"
    )
    assert all(c["image"] == migrate["image"] for c in containers(pod_spec(deployment)))
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] <= 3 and job["spec"]["activeDeadlineSeconds"] > 0
    assert (
        env_of(migrate)["KMS_DATABASE_URL_FILE"]
        == env_of(main_container(deployment))["KMS_DATABASE_URL_FILE"]
    )
    # Neither the Service, the PDB nor the HPA's Deployment selects the Job's pod.
    pdb = only(manifests, "PodDisruptionBudget")
    assert not matches(pdb["spec"]["selector"], pod_labels(job))


@pytest.mark.parametrize("name", WORKLOADS)
def test_namespace_service_account_and_pod_security(name: str) -> None:
    manifests = rendered(name)
    namespace = only(manifests, "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for m in manifests:
        if m["kind"] != "Namespace":
            assert m["metadata"]["namespace"] == NAMESPACE, m["metadata"]["name"]
    account = only(manifests, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for workload in workloads(name):
        assert pod_spec(workload)["serviceAccountName"] == account["metadata"]["name"]
    assert not of_kind(manifests, "RoleBinding") and not of_kind(manifests, "ClusterRoleBinding")


@pytest.mark.parametrize("name", WORKLOADS)
def test_referenced_secrets_and_config_maps_are_documented(name: str) -> None:
    """They are created outside these manifests: deploy/README.md must say which, with which keys."""
    readme = README.read_text()
    for workload in workloads(name):
        spec = pod_spec(workload)
        refs: set[tuple[str, str]] = set()
        for v in spec.get("volumes", []):
            if "secret" in v:
                refs |= {(v["secret"]["secretName"], i["key"]) for i in v["secret"].get("items", [])}
            if "configMap" in v:
                refs |= {(v["configMap"]["name"], i["key"]) for i in v["configMap"].get("items", [])}
        for c in containers(spec):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
        for obj, key in refs:
            assert re.search(rf"`{re.escape(obj)}`[^\n]*`{re.escape(key)}`", readme), (
                f"deploy/README.md does not document `{obj}` with key `{key}`"
            )


def test_overlay_changes_what_it_says() -> None:
    base, overlay = rendered("base"), rendered("overlay-example")
    b, o = only(base, "Deployment"), only(overlay, "Deployment")
    assert o["spec"]["replicas"] > b["spec"]["replicas"]
    assert main_container(o)["resources"] != main_container(b)["resources"]
    assert main_container(o)["image"].startswith("registry.example.com/")
    # Only the kms container was patched: the init container keeps its small budget.
    assert pod_spec(o)["initContainers"] == [
        {**pod_spec(b)["initContainers"][0], "image": main_container(o)["image"]}
    ]
