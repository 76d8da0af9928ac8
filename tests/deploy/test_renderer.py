"""The test-side kustomize renderer does what it claims, and refuses what it does not implement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.kustomize import UnsupportedKustomization, render, split_image

DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "app", "labels": {"a": "1"}},
    "spec": {
        "replicas": 1,
        "selector": {"matchLabels": {"a": "1"}},
        "template": {
            "metadata": {"labels": {"a": "1"}},
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": "registry.local:5000/team/app:1.0",
                        "ports": [{"containerPort": 80}],
                        "env": [{"name": "KEEP", "value": "k"}, {"name": "CHANGE", "value": "old"}],
                        "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
                    },
                    {"name": "side", "image": "other:2"},
                ],
                "volumes": [{"name": "tmp", "emptyDir": {}}],
            },
        },
    },
}
CRD: dict[str, Any] = {
    "apiVersion": "example.com/v1",
    "kind": "Thing",
    "metadata": {"name": "thing"},
    "spec": {"items": [{"name": "a", "x": 1}, {"name": "b"}], "keep": True},
}


def write(directory: Path, kustomization: dict[str, Any], files: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    for name, docs in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump_all(docs if isinstance(docs, list) else [docs]))
    return directory


def test_patches_merge_maps_and_lists_by_key(tmp_path: Path) -> None:
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "app"},
        "spec": {
            "replicas": 3,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "env": [{"name": "CHANGE", "value": "new"}, {"name": "ADDED", "value": "a"}],
                            "resources": {"limits": {"memory": "2Gi"}},
                        }
                    ],
                    "volumes": [{"name": "data", "emptyDir": {"medium": "Memory"}}],
                }
            },
        },
    }
    out = render(
        write(
            tmp_path,
            {
                "resources": ["app.yaml"],
                "patches": [{"path": "p.yaml", "target": {"kind": "Deployment", "name": "app"}}],
            },
            {"app.yaml": DEPLOYMENT, "p.yaml": patch},
        )
    )
    spec = out[0]["spec"]
    assert spec["replicas"] == 3
    main, side = spec["template"]["spec"]["containers"]
    assert side == {"name": "side", "image": "other:2"}
    assert main["env"] == [
        {"name": "KEEP", "value": "k"},
        {"name": "CHANGE", "value": "new"},
        {"name": "ADDED", "value": "a"},
    ]
    assert main["resources"] == {"limits": {"cpu": "1", "memory": "2Gi"}}
    assert [v["name"] for v in spec["template"]["spec"]["volumes"]] == ["tmp", "data"]


def test_custom_resources_get_a_json_merge_patch(tmp_path: Path) -> None:
    patch = {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "thing"}}
    patch["spec"] = {"items": [{"name": "b", "y": 2}], "keep": None}
    out = render(
        write(
            tmp_path,
            {
                "resources": ["crd.yaml"],
                "patches": [{"path": "p.yaml", "target": {"kind": "Thing", "name": "thing"}}],
            },
            {"crd.yaml": CRD, "p.yaml": patch},
        )
    )
    assert out[0]["spec"] == {"items": [{"name": "b", "y": 2}]}


def test_namespace_labels_images_and_nested_kustomizations(tmp_path: Path) -> None:
    write(
        tmp_path / "base", {"resources": ["app.yaml", "crd.yaml"]}, {"app.yaml": DEPLOYMENT, "crd.yaml": CRD}
    )
    overlay = write(
        tmp_path / "overlay",
        {
            "namespace": "ns",
            "resources": ["../base"],
            "labels": [{"pairs": {"team": "t"}, "includeSelectors": False}],
            "images": [
                {"name": "registry.local:5000/team/app", "newName": "r.example/app", "newTag": "2.0"},
                {"name": "other", "digest": "sha256:" + "a" * 64},
            ],
        },
        {},
    )
    app, thing = render(overlay)
    assert app["metadata"]["namespace"] == thing["metadata"]["namespace"] == "ns"
    assert app["metadata"]["labels"] == {"a": "1", "team": "t"}
    assert app["spec"]["selector"] == {"matchLabels": {"a": "1"}}  # selectors untouched
    assert app["spec"]["template"]["metadata"]["labels"] == {"a": "1"}
    images = [c["image"] for c in app["spec"]["template"]["spec"]["containers"]]
    assert images == ["r.example/app:2.0", "other@sha256:" + "a" * 64]


@pytest.mark.parametrize(
    ("image", "parts"),
    [
        ("app", ("app", None, None)),
        ("app:1", ("app", "1", None)),
        ("host:5000/app", ("host:5000/app", None, None)),
        ("host:5000/a/app:1.2@sha256:ab", ("host:5000/a/app", "1.2", "sha256:ab")),
    ],
)
def test_split_image(image: str, parts: tuple[str, str | None, str | None]) -> None:
    assert split_image(image) == parts


@pytest.mark.parametrize(
    ("kustomization", "patch", "message"),
    [
        ({"commonLabels": {"a": "b"}}, None, "unsupported fields"),
        ({"configMapGenerator": []}, None, "unsupported fields"),
        ({"labels": [{"pairs": {"a": "b"}, "includeSelectors": True}]}, None, "includeSelectors"),
        ({"namespace": "other", "resources": ["ns.yaml"]}, None, "differs from namespace"),
        ({}, {"metadata": {"name": "wrong"}}, "does not name its target"),
        (
            {},
            {
                "spec": {
                    "template": {"spec": {"containers": [{"name": "main", "ports": [{"containerPort": 81}]}]}}
                }
            },
            "ports",
        ),
        ({}, {"spec": {"$patch": "replace"}}, "directive"),
    ],
)
def test_refuses_what_it_does_not_implement(
    tmp_path: Path, kustomization: dict[str, Any], patch: dict[str, Any] | None, message: str
) -> None:
    files: dict[str, Any] = {
        "app.yaml": DEPLOYMENT,
        "ns.yaml": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}},
    }
    spec: dict[str, Any] = {"resources": ["app.yaml"], **kustomization}
    if patch is not None:
        files["p.yaml"] = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "app"},
            **patch,
        }
        spec["patches"] = [{"path": "p.yaml", "target": {"kind": "Deployment", "name": "app"}}]
    with pytest.raises(UnsupportedKustomization, match=message):
        render(write(tmp_path, spec, files))
