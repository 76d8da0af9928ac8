"""checkov (Kubernetes framework) finds nothing in the rendered manifests beyond an explicit,
justified allow-list - and every allow-list entry is still needed.

checkov lives in its own venv (.venv-tools, its pins clash with ours); it runs once for this
module on the renderings of every kustomization, written to a temporary directory.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import peer_missing
from tests.deploy.helpers import KUSTOMIZATIONS, REPO, WORKLOADS, rendered
from tests.deploy.kustomize import dump_documents

CHECKOV = REPO / ".venv-tools" / "bin" / "checkov"

# (check id, checkov resource id "Kind.namespace.name") -> why the finding is accepted.
ACCEPTED: dict[tuple[str, str], str] = {
    # CKV_K8S_43 "Image should use digest": digests cannot be looked up where these manifests are
    # written (offline). Images are pinned by an immutable release tag; the release pipeline sets
    # `digest:` in the overlay's `images` (kustomize), which this check would then pass.
    ("CKV_K8S_43", "Deployment.kms.kms"): "image pinned by tag; digest set at release (offline here)",
    ("CKV_K8S_43", "Job.kms.kms-migrate"): "image pinned by tag; digest set at release (offline here)",
    # CKV_K8S_15 "Image Pull Policy should be Always": every storage agent's unlock depends on this
    # service, so a registry outage must not stop its pods from restarting or rescheduling on a
    # node that has the image. With immutable tags/digests, Always re-checks nothing useful.
    ("CKV_K8S_15", "Deployment.kms.kms"): "IfNotPresent: restarts must not depend on the registry",
    ("CKV_K8S_15", "Job.kms.kms-migrate"): "IfNotPresent: same image and reasoning as the Deployment",
}


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not CHECKOV.exists():
        peer_missing(f"checkov is not installed at {CHECKOV} (./dev.sh test creates .venv-tools)")
    out = tmp_path_factory.mktemp("rendered")
    for name in KUSTOMIZATIONS:
        (out / f"{name}.yaml").write_text(dump_documents(rendered(name)))
    proc = subprocess.run(
        # Not --quiet: the passed checks show that every rendering was really scanned.
        [
            str(CHECKOV),
            "-d",
            str(out),
            "--framework",
            "kubernetes",
            "--compact",
            "-o",
            "json",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        output = f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        pytest.fail(f"checkov gave no JSON (exit {proc.returncode}):\n{output}")
    if isinstance(report, list):  # one entry per framework
        (report,) = [r for r in report if r.get("check_type") == "kubernetes"]
    assert isinstance(report, dict)
    return report


def _findings(report: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    found: dict[tuple[str, str], set[str]] = {}
    for check in report["results"]["failed_checks"]:
        found.setdefault((check["check_id"], check["resource"]), set()).add(Path(check["file_path"]).name)
    return found


def test_checkov_scanned_every_rendering(checkov_report: dict[str, Any]) -> None:
    summary = checkov_report["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 100, summary
    # checkov has checks for workloads, not for NetworkPolicy or custom resources.
    scanned = {Path(c["file_path"]).name for c in checkov_report["results"]["passed_checks"]}
    assert scanned >= {f"{name}.yaml" for name in WORKLOADS}


def test_no_findings_beyond_the_accepted_ones(checkov_report: dict[str, Any]) -> None:
    unexpected = {
        f"{check_id} {resource} in {sorted(files)}"
        for (check_id, resource), files in _findings(checkov_report).items()
        if (check_id, resource) not in ACCEPTED
    }
    assert not unexpected, "checkov findings to fix (or justify in ACCEPTED):\n" + "\n".join(
        sorted(unexpected)
    )


def test_every_accepted_finding_still_occurs(checkov_report: dict[str, Any]) -> None:
    stale = set(ACCEPTED) - set(_findings(checkov_report))
    assert not stale, f"no longer reported, remove from ACCEPTED: {sorted(stale)}"
    assert all(reason.strip() for reason in ACCEPTED.values())
