"""Schema validation of Kubernetes objects, shared by the chart and manifest tests.

Core kinds (Deployment, Service, NetworkPolicy, ...) go through ``kubernetes-validate`` in
strict mode, which rejects unknown fields. That package knows no custom resources (it raises
``SchemaNotFoundError`` for them), so InferenceService, HTTPRoute and ServiceMonitor objects
are checked with ``jsonschema.Draft7Validator`` against the strict CRD schemas kept in
``../shared/schemas/{group}/{kind_lower}_{version}.json`` beside the project root.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
SCHEMAS_DIR = SHARED_DIR / "schemas"

# API groups whose kinds are custom resources, validated with the shared CRD schemas.
CUSTOM_GROUPS = frozenset(
    {"serving.kserve.io", "gateway.networking.k8s.io", "monitoring.coreos.com", "keda.sh"}
)

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest known to
# kubernetes-validate.
KUBE_VERSIONS = ("1.28", kubernetes_validate.latest_version())


def require_shared_schemas() -> Path:
    """Return the shared schema directory, or skip the calling test when it is absent."""
    if not SCHEMAS_DIR.is_dir():
        pytest.skip(
            f"CRD schemas not found at {SCHEMAS_DIR} (the ../shared directory beside the "
            "project root); custom resources cannot be validated without them"
        )
    return SCHEMAS_DIR


def load_documents(text: str) -> list[dict[str, Any]]:
    """Parse a multi-document YAML string, dropping empty documents."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def is_custom(obj: dict[str, Any]) -> bool:
    """Whether the object is a custom resource (validated with the shared CRD schemas)."""
    group = obj["apiVersion"].rpartition("/")[0]
    return group in CUSTOM_GROUPS


def describe(obj: dict[str, Any]) -> str:
    """A short ``Kind/name`` label for messages."""
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


@cache
def _custom_validator(group: str, kind: str, version: str) -> jsonschema.Draft7Validator | None:
    path = SCHEMAS_DIR / group / f"{kind.lower()}_{version}.json"
    if not path.is_file():
        return None
    schema = json.loads(path.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def custom_errors(obj: dict[str, Any]) -> list[str]:
    """Validation errors of a custom resource against its shared CRD schema."""
    require_shared_schemas()
    group, _, version = obj["apiVersion"].rpartition("/")
    validator = _custom_validator(group, obj["kind"], version)
    if validator is None:
        return [f"{describe(obj)}: no schema for {obj['apiVersion']} {obj['kind']}"]
    return [
        f"{describe(obj)}: {'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(obj)
    ]


def core_errors(obj: dict[str, Any]) -> list[str]:
    """Validation errors of a core object, strict, for every version in KUBE_VERSIONS."""
    errors = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(map(str, error.path))
            errors.append(f"{describe(obj)} (Kubernetes {version}): {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{describe(obj)}: {error.message}")
    return errors
