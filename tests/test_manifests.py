"""Offline tests of manifests/: the plain-YAML deployment for users without Helm.

manifests/*.yaml must equal a fresh render of the chart's defaults by
scripts/render_manifests.py, every object must pass schema validation, and the examples in
manifests/examples/ must be valid and agree with each other and with the chart.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python
import pytest
import yaml

from tests.k8s_schemas import core_errors, custom_errors, is_custom, load_documents

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS_DIR = ROOT / "manifests"
EXAMPLES_DIR = MANIFESTS_DIR / "examples"
CHART_DIR = ROOT / "charts" / "qwen-image-serve"


def _load_render_script() -> ModuleType:
    path = ROOT / "scripts" / "render_manifests.py"
    spec = importlib.util.spec_from_file_location("render_manifests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_script = _load_render_script()
GENERATED = sorted(path.name for path in MANIFESTS_DIR.glob("*.yaml"))


def manifest_objects() -> list[dict[str, Any]]:
    """Every object of the generated manifests (not the kustomization)."""
    return [
        obj
        for name in GENERATED
        if name != "kustomization.yaml"
        for obj in load_documents((MANIFESTS_DIR / name).read_text())
    ]


def example_objects() -> list[dict[str, Any]]:
    """Every object of the hand-written examples."""
    return load_documents((EXAMPLES_DIR / "download-weights.yaml").read_text())


def test_manifests_equal_a_fresh_render() -> None:
    expected = render_script.render_manifests()
    current = render_script.generated_files_on_disk()
    assert sorted(current) == sorted(expected), "run: python scripts/render_manifests.py"
    for name, text in expected.items():
        assert current[name] == text, (
            f"manifests/{name} is stale: python scripts/render_manifests.py"
        )


def test_check_mode_agrees() -> None:
    assert render_script.main(["--check"]) == 0


def test_kustomization_lists_every_generated_file() -> None:
    kustomization = yaml.safe_load((MANIFESTS_DIR / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(set(GENERATED) - {"kustomization.yaml"})
    assert kustomization["resources"][0] == f"namespace-{render_script.NAMESPACE}.yaml"


def test_one_object_per_file_named_after_it() -> None:
    for name in GENERATED:
        if name == "kustomization.yaml":
            continue
        (obj,) = load_documents((MANIFESTS_DIR / name).read_text())
        assert render_script.file_name(obj) == name


@pytest.mark.parametrize("source", ["manifests", "examples"])
def test_core_objects_are_valid(source: str) -> None:
    objs = manifest_objects() if source == "manifests" else example_objects()
    errors = [error for obj in objs if not is_custom(obj) for error in core_errors(obj)]
    assert errors == []


def test_custom_objects_are_valid() -> None:
    objs = [obj for obj in manifest_objects() if is_custom(obj)]
    assert sorted(obj["kind"] for obj in objs) == ["InferenceService", "InferenceService"]
    errors = [error for obj in objs for error in custom_errors(obj)]
    assert errors == []


def test_fixed_release_and_namespace() -> None:
    namespace = render_script.NAMESPACE
    for obj in manifest_objects():
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == namespace
            continue
        assert obj["metadata"]["namespace"] == namespace
        assert obj["metadata"]["name"].startswith(render_script.RELEASE_NAME)
        assert "helm.sh/hook" not in obj["metadata"].get("annotations", {})
    adapter = next(obj for obj in manifest_objects() if obj["kind"] == "Deployment")
    env = {
        item["name"]: item.get("value")
        for item in adapter["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["QWEN_ADAPTER_GENERATION_URL"] == (
        f"http://{render_script.RELEASE_NAME}-generation-predictor.{namespace}.svc.cluster.local"
    )
    assert env["QWEN_ADAPTER_EDIT_URL"] == (
        f"http://{render_script.RELEASE_NAME}-edit-predictor.{namespace}.svc.cluster.local"
    )


def test_examples_agree_with_each_other_and_the_chart() -> None:
    claim = next(obj for obj in example_objects() if obj["kind"] == "PersistentVolumeClaim")
    job = next(obj for obj in example_objects() if obj["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    (volume,) = (item for item in pod["volumes"] if "persistentVolumeClaim" in item)
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    script = pod["containers"][0]["command"][-1]

    values = yaml.safe_load((EXAMPLES_DIR / "values-pvc.yaml").read_text())
    chart = helm_python.Chart.load(CHART_DIR)
    chart.validate_schema(values)
    for component, repo in (("generation", "Qwen/Qwen-Image"), ("edit", "Qwen/Qwen-Image-Edit")):
        pvc = values[component]["storage"]["pvc"]
        assert pvc["claimName"] == claim["metadata"]["name"]
        assert f"hf download {repo} --local-dir /models/{pvc['subPath']}\n" in script
    rendered = chart.render(
        values, name=render_script.RELEASE_NAME, namespace=render_script.NAMESPACE
    )
    isvcs = [
        obj
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for obj in load_documents(text)
        if obj["kind"] == "InferenceService"
    ]
    assert len(isvcs) == 2
    for isvc in isvcs:
        volumes = isvc["spec"]["predictor"]["volumes"]
        assert {
            "name": "model",
            "persistentVolumeClaim": {"claimName": "qwen-image-weights", "readOnly": True},
        } in volumes
