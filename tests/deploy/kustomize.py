"""A deliberately small kustomize renderer: exactly the features deploy/kubernetes uses.

kustomize and helm cannot be installed where these tests run, so the overlays are rendered here.
Supported, with kustomize's semantics as far as this file goes:

- ``resources``: YAML files (multi-document) and directories holding a ``kustomization.yaml``,
  rendered recursively first; the parent's transformations then apply to their output.
- ``namespace``: set on every namespaced object. A ``Namespace`` object must already carry that
  name (kustomize versions differ on renaming it, so the manifests never rely on either).
- ``labels`` with ``includeSelectors: false`` (and no ``includeTemplates``/``fields``): added to
  every object's ``metadata.labels`` only. ``commonLabels`` is refused (it rewrites selectors).
- ``images``: ``name`` matched against the image name (without tag/digest) of containers and init
  containers of Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob; ``newName``,
  ``newTag`` and ``digest`` applied.
- ``patches`` with ``path`` and a ``target`` of exactly ``kind`` and ``name`` (which must also be
  the patch's own kind and name, and must match exactly one object): a strategic merge patch.
  For built-in API groups, maps merge deeply, ``null`` deletes a key, and the lists ``containers``,
  ``initContainers``, ``volumes`` and ``env`` (key ``name``) and ``volumeMounts`` (key
  ``mountPath``) merge by key; lists that Kubernetes merges by a key this file does not implement
  (``ports``, ``tolerations``-like keyed lists, ...) are refused; other lists are replaced. For
  custom resources (no strategic-merge schema) it is a JSON merge patch (RFC 7386): maps merge,
  lists are replaced, as kustomize does.
- Transformations run in kustomize's order: patches, namespace, labels, images.

Anything else (generators, ``commonLabels``, JSON 6902 patches, ``$patch`` directives,
components, remote resources, replicas, name prefixes...) raises ``UnsupportedKustomization``, so
a manifest change that needs more than this fails the tests instead of rendering differently
from kustomize.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = frozenset({"apiVersion", "kind", "namespace", "resources", "labels", "images", "patches"})
CLUSTER_SCOPED_KINDS = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PriorityClass",
        "StorageClass",
        "PersistentVolume",
        "IngressClass",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "CiliumClusterwideNetworkPolicy",
    }
)
# API groups whose objects kustomize patches with Kubernetes' strategic-merge schema.
BUILTIN_GROUPS = frozenset(
    {
        "",
        "apps",
        "batch",
        "policy",
        "autoscaling",
        "networking.k8s.io",
        "rbac.authorization.k8s.io",
        "storage.k8s.io",
        "scheduling.k8s.io",
    }
)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
}
# Lists Kubernetes merges by a key (patchMergeKey) that this renderer does not implement.
UNIMPLEMENTED_MERGE_LISTS = frozenset(
    {
        "ports",
        "ephemeralContainers",
        "imagePullSecrets",
        "hostAliases",
        "topologySpreadConstraints",
        "volumeDevices",
        "finalizers",
        "ownerReferences",
        "resourceClaims",
        "conditions",
    }
)
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class UnsupportedKustomization(Exception):
    """The kustomization uses something this renderer does not implement (or is invalid)."""


def load_documents(path: Path) -> list[Manifest]:
    """Every non-empty YAML document of a file; each must be a mapping."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise UnsupportedKustomization(f"{path}: a document is not a mapping")
    return docs


def dump_documents(manifests: list[Manifest]) -> str:
    text: str = yaml.safe_dump_all(manifests, sort_keys=False)
    return text


def kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise UnsupportedKustomization(f"{directory}: no kustomization.yaml")


def render(directory: Path) -> list[Manifest]:
    """Render the kustomization in ``directory`` like ``kustomize build`` would."""
    kfile = kustomization_file(directory)
    spec = yaml.safe_load(kfile.read_text()) or {}
    if not isinstance(spec, dict):
        raise UnsupportedKustomization(f"{kfile}: not a mapping")
    unknown = set(spec) - SUPPORTED_FIELDS
    if unknown:
        raise UnsupportedKustomization(f"{kfile}: unsupported fields {sorted(unknown)}")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise UnsupportedKustomization(f"{kfile}: kind {spec.get('kind')!r} (components are not supported)")

    manifests: list[Manifest] = []
    for entry in spec.get("resources", []):
        if not isinstance(entry, str) or "://" in entry or entry.startswith(("github.com/", "git@")):
            raise UnsupportedKustomization(f"{kfile}: unsupported resource {entry!r}")
        path = (directory / entry).resolve()
        if path.is_dir():
            manifests.extend(render(path))
        elif path.is_file():
            manifests.extend(copy.deepcopy(load_documents(path)))
        else:
            raise UnsupportedKustomization(f"{kfile}: resource {entry!r} does not exist")
    _check_unique(manifests, kfile)

    for patch_spec in spec.get("patches", []):
        _apply_patch(manifests, patch_spec, directory, kfile)
    if "namespace" in spec:
        _set_namespace(manifests, spec["namespace"], kfile)
    for label_spec in spec.get("labels", []):
        _add_labels(manifests, label_spec, kfile)
    for image_spec in spec.get("images", []):
        _set_images(manifests, image_spec, kfile)
    _check_unique(manifests, kfile)
    return manifests


def object_id(manifest: Manifest) -> tuple[str, str, str]:
    meta = manifest.get("metadata") or {}
    return (manifest.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))


def _check_unique(manifests: list[Manifest], kfile: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for manifest in manifests:
        oid = object_id(manifest)
        if not all(oid[i] for i in (0, 2)):
            raise UnsupportedKustomization(f"{kfile}: an object without kind or metadata.name")
        if oid in seen:
            raise UnsupportedKustomization(f"{kfile}: duplicate object {oid}")
        seen.add(oid)


def _api_group(manifest: Manifest) -> str:
    api_version = str(manifest.get("apiVersion", ""))
    return api_version.rpartition("/")[0]


def _apply_patch(manifests: list[Manifest], patch_spec: Any, directory: Path, kfile: Path) -> None:
    if not isinstance(patch_spec, dict) or set(patch_spec) != {"path", "target"}:
        raise UnsupportedKustomization(f"{kfile}: patches need exactly `path` and `target`: {patch_spec!r}")
    target = patch_spec["target"]
    if not isinstance(target, dict) or set(target) != {"kind", "name"}:
        raise UnsupportedKustomization(f"{kfile}: patch targets need exactly `kind` and `name`: {target!r}")
    docs = load_documents(directory / patch_spec["path"])
    if len(docs) != 1:
        raise UnsupportedKustomization(f"{kfile}: {patch_spec['path']} must hold exactly one patch")
    patch = docs[0]
    if patch.get("kind") != target["kind"] or (patch.get("metadata") or {}).get("name") != target["name"]:
        raise UnsupportedKustomization(f"{kfile}: {patch_spec['path']} does not name its target {target}")
    matches = [m for m in manifests if m.get("kind") == target["kind"] and object_id(m)[2] == target["name"]]
    if len(matches) != 1:
        raise UnsupportedKustomization(f"{kfile}: patch target {target} matches {len(matches)} objects")
    found = matches[0]
    if patch.get("apiVersion") != found.get("apiVersion"):
        raise UnsupportedKustomization(f"{kfile}: {patch_spec['path']} apiVersion differs from its target")
    strategic = _api_group(found) in BUILTIN_GROUPS
    merged = _merge(found, patch, strategic=strategic, key="")
    found.clear()
    found.update(merged)


def _merge(base: Any, patch: Any, *, strategic: bool, key: str) -> Any:
    if isinstance(patch, dict):
        for directive in patch:
            if isinstance(directive, str) and directive.startswith("$"):
                raise UnsupportedKustomization(f"patch directive {directive!r} is not supported")
        if not isinstance(base, dict):
            return _strip_nulls(patch)
        out = copy.deepcopy(base)
        for k, value in patch.items():
            if value is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _merge(out[k], value, strategic=strategic, key=k)
            else:
                out[k] = _strip_nulls(copy.deepcopy(value))
        return out
    if isinstance(patch, list) and strategic:
        if key in UNIMPLEMENTED_MERGE_LISTS:
            raise UnsupportedKustomization(f"strategic merge of the list {key!r} is not implemented")
        if key in MERGE_KEYS and isinstance(base, list):
            return _merge_list_by_key(base, patch, MERGE_KEYS[key])
    return copy.deepcopy(patch)


def _merge_list_by_key(base: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    out = copy.deepcopy(base)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise UnsupportedKustomization(f"a patched list item has no {merge_key!r}: {item!r}")
        for index, existing in enumerate(out):
            if isinstance(existing, dict) and existing.get(merge_key) == item[merge_key]:
                out[index] = _merge(existing, item, strategic=True, key="")
                break
        else:
            out.append(_strip_nulls(copy.deepcopy(item)))
    return out


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _set_namespace(manifests: list[Manifest], namespace: str, kfile: Path) -> None:
    for manifest in manifests:
        meta = manifest.setdefault("metadata", {})
        if manifest.get("kind") == "Namespace":
            if meta.get("name") != namespace:
                raise UnsupportedKustomization(
                    f"{kfile}: Namespace {meta.get('name')!r} differs from namespace {namespace!r}"
                )
        elif manifest.get("kind") not in CLUSTER_SCOPED_KINDS:
            meta["namespace"] = namespace


def _add_labels(manifests: list[Manifest], label_spec: Any, kfile: Path) -> None:
    if not isinstance(label_spec, dict) or set(label_spec) - {"pairs", "includeSelectors"}:
        raise UnsupportedKustomization(f"{kfile}: labels support only `pairs` and `includeSelectors`")
    if label_spec.get("includeSelectors", False) is not False:
        raise UnsupportedKustomization(f"{kfile}: labels with includeSelectors: true are not supported")
    pairs = label_spec.get("pairs") or {}
    for manifest in manifests:
        manifest.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry port is not a tag."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = None
    if ":" in last:
        name, _, tag = name.rpartition(":")
    return name, tag, digest or None


def _set_images(manifests: list[Manifest], image_spec: Any, kfile: Path) -> None:
    if not isinstance(image_spec, dict) or "name" not in image_spec:
        raise UnsupportedKustomization(f"{kfile}: images entries need a name")
    if set(image_spec) - {"name", "newName", "newTag", "digest"}:
        raise UnsupportedKustomization(f"{kfile}: unsupported images fields in {image_spec!r}")
    if "digest" in image_spec and not _DIGEST.match(str(image_spec["digest"])):
        raise UnsupportedKustomization(f"{kfile}: digest must be sha256:<64 hex>")
    for manifest in manifests:
        path = POD_SPEC_PATHS.get(manifest.get("kind", ""))
        if path is None:
            continue
        pod_spec: Any = manifest
        for part in path:
            pod_spec = pod_spec.get(part, {}) if isinstance(pod_spec, dict) else {}
        for field in ("initContainers", "containers"):
            for container in pod_spec.get(field, []):
                name, tag, digest = split_image(container["image"])
                if name != image_spec["name"]:
                    continue
                new_name = image_spec.get("newName", name)
                if "digest" in image_spec:
                    container["image"] = f"{new_name}@{image_spec['digest']}"
                elif "newTag" in image_spec:
                    container["image"] = f"{new_name}:{image_spec['newTag']}"
                else:
                    suffix = f"@{digest}" if digest else (f":{tag}" if tag else "")
                    container["image"] = f"{new_name}{suffix}"
