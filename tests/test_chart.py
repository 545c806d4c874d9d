"""Offline tests of the Helm chart charts/qwen-image-serve.

The chart is rendered with Helm's own Go SDK (helm_python) for its defaults and for every
values file in tests/chart_values/, linted in strict mode, every object is validated against
the Kubernetes (strict) or shared CRD schemas, and the semantics that matter in a cluster are
asserted: GPU requests, model storage, probes, the adapter's predictor URLs, security.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import typing
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import helm_python
import openai
import prometheus_client
import pytest
import yaml

from tests.adapter_stack import Stack, run_adapter, stop
from tests.k8s_schemas import core_errors, custom_errors, is_custom, load_documents
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = ROOT / "charts" / "qwen-image-serve"
VALUES_DIR = Path(__file__).parent / "chart_values"
RELEASE = "qis"
NAMESPACE = "imaging"
FULLNAME = "qis-qwen-image-serve"
GENERATION = f"{FULLNAME}-generation"
EDIT = f"{FULLNAME}-edit"
ADAPTER = f"{FULLNAME}-adapter"

# The kinds the chart renders that belong to no namespace.
CLUSTER_SCOPED = frozenset({"LocalModelCache"})
# The chart's defaults ("defaults") and every values file; a new file is tested automatically.
CASES = ["defaults", *sorted(path.stem for path in VALUES_DIR.glob("*.yaml"))]


@cache
def chart() -> helm_python.Chart:
    """The chart, loaded once."""
    return helm_python.Chart.load(CHART_DIR)


def case_values(case: str) -> dict[str, Any]:
    """The user values of a case ({} for the defaults)."""
    if case == "defaults":
        return {}
    return yaml.safe_load((VALUES_DIR / f"{case}.yaml").read_text()) or {}


@cache
def _render(case: str) -> tuple[tuple[str, str], ...]:
    rendered = chart().render(case_values(case), name=RELEASE, namespace=NAMESPACE)
    return tuple(sorted(rendered.items()))


def render_text(case: str) -> dict[str, str]:
    """Template path -> rendered text for a case."""
    return dict(_render(case))


def objects(case: str) -> list[dict[str, Any]]:
    """Every Kubernetes object the case renders (fresh copies, safe to modify)."""
    return [
        obj
        for path, text in _render(case)
        if path.endswith(".yaml")
        for obj in load_documents(text)
    ]


def render_values(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Objects rendered from ad-hoc values."""
    rendered = chart().render(values, name=RELEASE, namespace=NAMESPACE)
    return [
        obj
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for obj in load_documents(text)
    ]


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Objects of one kind, by name."""
    return {obj["metadata"]["name"]: obj for obj in objs if obj["kind"] == kind}


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The object of a kind and name; fails when absent."""
    found = by_kind(objs, kind)
    assert name in found, f"no {kind}/{name} among {sorted(found)}"
    return found[name]


def predictor(isvc: dict[str, Any]) -> dict[str, Any]:
    """spec.predictor of an InferenceService."""
    return isvc["spec"]["predictor"]


def container(isvc: dict[str, Any]) -> dict[str, Any]:
    """The kserve-container of an InferenceService."""
    (main,) = predictor(isvc)["containers"]
    return main


def env_of(cont: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's environment, by variable name."""
    return {item["name"]: item for item in cont.get("env", [])}


def env_values(cont: dict[str, Any]) -> dict[str, str]:
    """The literal values of a container's environment."""
    return {name: item["value"] for name, item in env_of(cont).items() if "value" in item}


def volumes_of(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A pod spec's volumes, by name."""
    return {volume["name"]: volume for volume in spec.get("volumes", [])}


def mounts_of(cont: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's volume mounts, by mount path."""
    return {mount["mountPath"]: mount for mount in cont.get("volumeMounts", [])}


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec the release creates, directly or through KServe."""
    for obj in objs:
        if obj["kind"] == "Deployment":
            yield f"Deployment/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            yield f"Pod/{obj['metadata']['name']}", obj["spec"]
        elif obj["kind"] == "InferenceService":
            yield f"InferenceService/{obj['metadata']['name']}", predictor(obj)


def location_env(isvc: dict[str, Any]) -> str:
    """The model location variable of an InferenceService's predictor."""
    return (
        "QWEN_IMAGE_EDIT_LOCATION"
        if "edit" in container(isvc)["command"][0]
        else "QWEN_IMAGE_LOCATION"
    )


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key repeated in one mapping, as the API server does
    (PyYAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        assert not repeated, f"keys {repeated} repeated at {node.start_mark}"
        return super().construct_mapping(node, deep)


# ----------------------------------------------------------------------------------------
# Lint, render, schema validation: every case.


@pytest.mark.parametrize("case", CASES)
def test_lint_strict(case: str) -> None:
    report = helm_python.lint(CHART_DIR, case_values(case), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    problems = [message for message in report["messages"] if message["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("case", CASES)
def test_core_objects_are_valid(case: str) -> None:
    objs = [obj for obj in objects(case) if not is_custom(obj)]
    assert objs
    errors = [error for obj in objs for error in core_errors(obj)]
    assert errors == []


@pytest.mark.parametrize("case", CASES)
def test_custom_objects_are_valid(case: str) -> None:
    objs = [obj for obj in objects(case) if is_custom(obj)]
    assert any(obj["kind"] == "InferenceService" for obj in objs)
    errors = [error for obj in objs for error in custom_errors(obj)]
    assert errors == []


@pytest.mark.parametrize("case", CASES)
def test_objects_are_namespaced_and_labelled(case: str) -> None:
    for obj in objects(case):
        meta = obj["metadata"]
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, obj["kind"]
        else:
            assert meta["namespace"] == NAMESPACE, obj["kind"]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "qwen-image-serve"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if obj["kind"] != "InferenceService":  # whose labels reach the predictor pods
            assert labels["app.kubernetes.io/version"] == chart().metadata["appVersion"]
            assert labels["helm.sh/chart"] == f"qwen-image-serve-{chart().version}"
        assert all(isinstance(value, str) for value in labels.values())


@pytest.mark.parametrize("case", CASES)
def test_restricted_pod_security_everywhere(case: str) -> None:
    for where, spec in pod_specs(objects(case)):
        pod_context = spec.get("securityContext", {})
        assert pod_context.get("runAsNonRoot") is True, where
        assert pod_context.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert spec.get("automountServiceAccountToken") is False, where
        writable = {
            path
            for path, mount in mounts_of(spec["containers"][0]).items()
            if not mount.get("readOnly")
        }
        for cont in spec["containers"]:
            context = cont["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert "privileged" not in context, where
        if not where.startswith("Pod/"):  # the test Pod runs one short Python command
            assert "/tmp" in writable, where


@pytest.mark.parametrize("case", CASES)
def test_adapter_urls_point_at_the_inference_services(case: str) -> None:
    objs = objects(case)
    values = chart().merge_values(case_values(case))
    env = env_values(one(objs, "Deployment", ADAPTER)["spec"]["template"]["spec"]["containers"][0])
    isvcs = by_kind(objs, "InferenceService")
    for component in ("generation", "edit"):
        key = component.upper()
        if not values[component]["enabled"]:
            # The URL of a predictor that runs elsewhere, or set and empty, so that the
            # adapter does not fall back to its local default URL.
            override = values["adapter"]["predictorUrls"][component]
            assert env[f"QWEN_ADAPTER_{key}_URL"] == override
            continue
        (isvc,) = (
            obj
            for obj in isvcs.values()
            if obj["metadata"]["labels"]["app.kubernetes.io/component"] == component
        )
        name = isvc["metadata"]["name"]
        assert (
            env[f"QWEN_ADAPTER_{key}_URL"]
            == f"http://{name}-predictor.{NAMESPACE}.svc.cluster.local"
        )
        args = container(isvc)["args"]
        assert env[f"QWEN_ADAPTER_{key}_MODEL"] == args[args.index("--model_name") + 1]


@pytest.mark.parametrize("case", CASES)
def test_predictor_probes_and_ports(case: str) -> None:
    for isvc in by_kind(objects(case), "InferenceService").values():
        main = container(isvc)
        args = main["args"]
        model = args[args.index("--model_name") + 1]
        assert args[args.index("--http_port") + 1] == "8080"
        assert args[args.index("--grpc_port") + 1] == "8081"
        assert main["name"] == "kserve-container"
        assert main["ports"][0] == {"name": "http1", "containerPort": 8080, "protocol": "TCP"}
        assert main["readinessProbe"]["httpGet"] == {
            "path": f"/v2/models/{model}/ready",
            "port": 8080,
        }
        # readiness fails for a predictor whose pipeline worker stopped (restart it);
        # KServe's /v2/health/live would answer it alive
        assert main["livenessProbe"]["httpGet"] == main["readinessProbe"]["httpGet"]
        assert main["startupProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
        startup = main["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "loads take minutes"
        assert predictor(isvc)["timeout"] >= 600
        limits = main["resources"]["limits"]
        assert {"cpu", "memory"} <= set(limits), (
            "KServe would default a missing limit to 1 CPU / 2Gi"
        )


@pytest.mark.parametrize("case", CASES)
def test_predictor_caches_are_writable(case: str) -> None:
    for isvc in by_kind(objects(case), "InferenceService").values():
        main = container(isvc)
        env = env_values(main)
        writable = [path for path, mount in mounts_of(main).items() if not mount.get("readOnly")]
        for variable in (
            "HF_HOME",
            "QWEN_TINY_CACHE_DIR",
            "TRITON_CACHE_DIR",
            "TORCHINDUCTOR_CACHE_DIR",
        ):
            assert any(env[variable].startswith(path) for path in writable), variable


@pytest.mark.parametrize("case", CASES)
def test_predictor_settings_are_variables_the_predictor_reads(case: str) -> None:
    """Every QWEN_* the chart sets is one that predictors/server.py declares (or a location)."""
    from predictors.generation import QwenImageGenerationModel
    from predictors.server import build_parser

    declared = {"QWEN_IMAGE_LOCATION", "QWEN_IMAGE_EDIT_LOCATION"} | {
        action.help.rsplit("(env ", 1)[1].rstrip(")")
        for action in build_parser(QwenImageGenerationModel)._actions
        if action.help and "(env " in action.help
    }
    for isvc in by_kind(objects(case), "InferenceService").values():
        used = {name for name in env_of(container(isvc)) if name.startswith("QWEN_")}
        assert used <= declared, used - declared


def predictor_options(isvc: dict[str, Any]) -> Any:
    """The options the predictor's own parser takes from an InferenceService's environment
    (literal values only, as in the pod; secrets and the rest of the host's environment
    left out)."""
    from predictors.server import build_parser, options_from_args

    command = container(isvc)["command"][0]
    model_class = _model_class(command)
    with mock.patch.dict(os.environ, env_values(container(isvc)), clear=True):
        return options_from_args(build_parser(model_class).parse_args([]))


def adapter_settings(objs: list[dict[str, Any]]) -> Any:
    """The settings the adapter reads from its Deployment's literal environment."""
    from openai_adapter.settings import Settings

    main = one(objs, "Deployment", ADAPTER)["spec"]["template"]["spec"]["containers"][0]
    with mock.patch.dict(os.environ, env_values(main), clear=True):
        return Settings()


def _model_class(command: str) -> type:
    from predictors.edit import QwenImageEditModel
    from predictors.generation import QwenImageGenerationModel

    return QwenImageEditModel if "edit" in command else QwenImageGenerationModel


@pytest.mark.parametrize("case", CASES)
def test_the_predictor_parses_every_setting_the_chart_renders(case: str) -> None:
    """The predictor's own parser takes each rendered variable to the option it names, and
    its start-up check accepts them with its request defaults."""
    from predictors.server import check_request_defaults

    for isvc in by_kind(objects(case), "InferenceService").values():
        env = env_values(container(isvc))
        options = predictor_options(isvc)
        check_request_defaults(_model_class(container(isvc)["command"][0]), options)
        speed, batching = options.acceleration, options.batching
        parsed = {
            "QWEN_MAX_QUEUE_SIZE": str(options.max_queue_size),
            "QWEN_MAX_SIZE": str(options.limits.max_size),
            "QWEN_MAX_BATCH_SIZE": str(batching.max_batch_size),
            "QWEN_BATCH_WAIT_MS": batching.batch_wait_ms,
            "QWEN_COMPILE": speed.compile,
            "QWEN_ATTENTION_BACKEND": speed.attention.unmasked,
            "QWEN_MASKED_ATTENTION_BACKEND": speed.attention.masked,
            "QWEN_TEXT_PADDING": speed.text_padding,
            "QWEN_QUANTIZATION": speed.quantization,
            "QWEN_CACHE": speed.cache,
            "QWEN_CACHE_THRESHOLD": speed.cache_threshold,
            "QWEN_LORA": speed.lora,
        }
        for variable, value in parsed.items():
            if isinstance(value, float):
                assert value == float(env[variable]), variable
            else:
                assert value == env.get(variable), variable


# ----------------------------------------------------------------------------------------
# The defaults.


def test_defaults_deploy_both_predictors_on_one_gpu_each() -> None:
    objs = objects("defaults")
    isvcs = by_kind(objs, "InferenceService")
    assert sorted(isvcs) == sorted([GENERATION, EDIT])
    for name, command, model, repo in (
        (GENERATION, "qwen-image-predictor", "qwen-image", "Qwen/Qwen-Image"),
        (EDIT, "qwen-image-edit-predictor", "qwen-image-edit", "Qwen/Qwen-Image-Edit"),
    ):
        isvc = isvcs[name]
        assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
        annotations = isvc["metadata"]["annotations"]
        assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
        assert "serving.kserve.io/autoscalerClass" not in annotations
        assert isvc["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
        spec = predictor(isvc)
        assert spec["timeout"] == 600
        assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 1)
        assert spec["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        main = container(isvc)
        assert main["command"] == [command]
        assert main["args"][:2] == ["--model_name", model]
        assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
        env = env_values(main)
        assert env[location_env(isvc)] == repo
        assert "HF_TOKEN" not in env_of(main)
        assert "STORAGE_URI" not in env
        assert env["QWEN_MAX_QUEUE_SIZE"] == "4"
        assert env["QWEN_MAX_SIZE"] == "2048"
        shm = volumes_of(spec)["dshm"]["emptyDir"]
        assert shm["medium"] == "Memory"
        assert mounts_of(main)["/dev/shm"]["name"] == "dshm"


def test_defaults_are_the_predictors_own() -> None:
    """With the chart's defaults, a predictor runs as with no settings at all: exact modes,
    no batching, no compilation, the same limits."""
    from predictors.model import PredictorOptions

    own = PredictorOptions()
    for isvc in by_kind(objects("defaults"), "InferenceService").values():
        options = predictor_options(isvc)
        assert options.acceleration == own.acceleration
        assert options.batching == own.batching
        assert (options.device, options.dtype, options.max_queue_size) == (
            own.device,
            own.dtype,
            own.max_queue_size,
        )
        assert options.limits.max_size == own.limits.max_size


def test_defaults_network_policy_admits_only_the_adapter() -> None:
    objs = objects("defaults")
    (policy,) = by_kind(objs, "NetworkPolicy").values()
    selector = policy["spec"]["podSelector"]["matchExpressions"]
    assert selector == [
        {
            "key": "serving.kserve.io/inferenceservice",
            "operator": "In",
            "values": [GENERATION, EDIT],
        }
    ]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    adapter_labels = one(objs, "Deployment", ADAPTER)["spec"]["template"]["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= adapter_labels.items()
    assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}]


def test_defaults_adapter_service_pdb_and_test_hook() -> None:
    objs = objects("defaults")
    deployment = one(objs, "Deployment", ADAPTER)
    pod = deployment["spec"]["template"]
    main = pod["spec"]["containers"][0]
    assert main["command"] == ["qwen-image-adapter"]
    assert main["args"] == ["--host", "0.0.0.0", "--port", "8000"]
    assert main["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert main["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    # Ready once the adapter runs: a loading predictor answers its own 503s instead of taking
    # the other model off the Service (adapter.readinessPath).
    assert main["readinessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert "annotations" not in pod["metadata"]  # no chart-created API key to track
    # The adapter answers (504, not to be retried) before the SDK gives up and resends.
    timeout = float(env_values(main)["QWEN_ADAPTER_REQUEST_TIMEOUT_SECONDS"])
    assert timeout < openai.DEFAULT_TIMEOUT.read
    assert "QWEN_ADAPTER_API_KEY" not in env_of(main)
    assert deployment["spec"]["replicas"] == 2
    assert pod["spec"]["serviceAccountName"] == ADAPTER
    assert one(objs, "ServiceAccount", ADAPTER)["automountServiceAccountToken"] is False

    service = one(objs, "Service", ADAPTER)
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    pdb = one(objs, "PodDisruptionBudget", ADAPTER)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]

    (test_pod,) = by_kind(objs, "Pod").values()
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    test_env = env_values(test_pod["spec"]["containers"][0])
    assert test_env["ADAPTER_URL"] == f"http://{ADAPTER}:8000"
    assert test_env["EXPECTED_MODELS"] == '["qwen-image","qwen-image-edit"]'
    for absent in ("Secret", "HorizontalPodAutoscaler", "Ingress", "HTTPRoute", "ServiceMonitor"):
        assert not by_kind(objs, absent), absent


def test_notes_give_port_forward_and_first_requests() -> None:
    notes = render_text("defaults")["qwen-image-serve/templates/NOTES.txt"]
    assert f"kubectl port-forward -n {NAMESPACE} svc/{ADAPTER} 8000:8000" in notes
    assert "curl -s http://localhost:8000/v1/images/generations" in notes
    assert 'OpenAI(base_url="http://localhost:8000/v1"' in notes
    assert 'client.images.generate(model="qwen-image"' in notes
    assert f"helm test {RELEASE}" in notes
    assert '-F "model=qwen-image-edit" -F "image=@fox.png"' in notes

    assert "speed modes" not in notes, "the defaults are the predictor's own"
    # The SDK example pasted into a shell: a here-document ends at a line that is its word
    # alone, and Python refuses an indented body.
    script = re.search(r"python3 - <<'PY'\n(.*?)\nPY\n", notes, re.S)
    assert script, notes
    compile(script[1], "NOTES.txt", "exec")

    edit_only = chart().render(
        {"generation": {"enabled": False}}, name=RELEASE, namespace=NAMESPACE
    )
    notes = edit_only["qwen-image-serve/templates/NOTES.txt"]
    assert "/v1/images/generations" not in notes
    assert "curl -s http://localhost:8000/v1/images/edits" in notes


def test_notes_follow_the_models_the_adapter_serves() -> None:
    """A model whose predictor runs elsewhere (adapter.predictorUrls) is served, listed and
    given its example; `helm test` is offered only where its Pod is rendered."""
    elsewhere = {
        "generation": {"enabled": False},
        "edit": {"enabled": False},
        "adapter": {"predictorUrls": {"generation": "http://elsewhere:8080"}},
        "tests": {"enabled": False},
    }
    notes = chart().render(elsewhere, name=RELEASE, namespace=NAMESPACE)[
        "qwen-image-serve/templates/NOTES.txt"
    ]
    assert (
        'model "qwen-image" from the predictor at http://elsewhere:8080 '
        "(adapter.predictorUrls.generation)" in notes
    )
    assert 'client.images.generate(model="qwen-image"' in notes
    assert "/v1/images/edits" not in notes
    assert "serves no model" not in notes
    assert "helm test" not in notes

    nothing = {"generation": {"enabled": False}, "edit": {"enabled": False}}
    notes = chart().render(nothing, name=RELEASE, namespace=NAMESPACE)[
        "qwen-image-serve/templates/NOTES.txt"
    ]
    assert "The adapter serves no model" in notes
    assert "/v1/images/generations" not in notes and "/v1/images/edits" not in notes


@pytest.mark.parametrize("release", ["team-ml-platform-prod", "a" * 53])
def test_names_stay_dns_labels_for_long_release_names(release: str) -> None:
    """KServe names the predictor's Deployment and Service <name>-predictor and labels its
    pods app=isvc.<name>-predictor: each must stay within 63 characters."""
    rendered = chart().render({}, name=release, namespace=NAMESPACE)
    objs = [
        obj
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for obj in load_documents(text)
    ]
    isvcs = by_kind(objs, "InferenceService")
    assert len(isvcs) == 2
    for name in isvcs:
        assert len(f"isvc.{name}-predictor") <= 63, name
    assert all(len(obj["metadata"]["name"]) <= 63 for obj in objs)


def test_an_inference_service_name_may_be_as_long_as_a_derived_one() -> None:
    """generation.name / edit.name take names as long as the chart derives from a long
    release name: the most that KServe's pod label app=isvc.<name>-predictor allows."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    rendered = chart().render({}, name="a" * 53, namespace=NAMESPACE)
    derived = by_kind(
        load_documents(rendered["qwen-image-serve/templates/inferenceservice.yaml"]),
        "InferenceService",
    )
    longest = max(len(name) for name in derived)
    assert len(f"isvc.{'a' * longest}-predictor") == 63
    for component in ("generation", "edit"):
        assert schema["properties"][component]["properties"]["name"]["maxLength"] == longest
        values = {component: {"name": "a" * longest}}
        assert "a" * longest in by_kind(render_values(values), "InferenceService")
        with pytest.raises(helm_python.HelmValuesError, match=f"/{component}/name"):
            chart().validate_schema({component: {"name": "a" * (longest + 1)}})


def test_notes_say_that_helm_test_waits_for_a_cold_start_when_scaled_to_zero() -> None:
    """The test's readiness check wakes a predictor scaled to zero, whose start loads the
    model for minutes: longer than the test's default 120 s."""
    notes = render_text("knative")["qwen-image-serve/templates/NOTES.txt"]
    assert "generation and edit may be scaled to zero" in notes
    assert "tests.timeoutSeconds, 120 s now, and helm test --timeout above it." in notes
    notes = render_text("defaults")["qwen-image-serve/templates/NOTES.txt"]
    assert "scaled to zero" not in notes


def test_notes_read_an_api_key_whose_name_has_dots() -> None:
    """kubectl's JSONPath reads a dot as a step into the object: a Secret key with dots needs
    them escaped, or the command prints nothing."""
    values = {"adapter": {"apiKey": {"existingSecret": "keys", "secretKey": "openai.api.key"}}}
    notes = chart().render(values, name=RELEASE, namespace=NAMESPACE)[
        "qwen-image-serve/templates/NOTES.txt"
    ]
    assert "keys -o jsonpath='{.data.openai\\.api\\.key}' | base64 -d" in notes


def test_inference_service_labels_do_not_change_with_the_chart_version() -> None:
    """KServe copies the InferenceService's labels onto the predictor pods: a label that
    changes with the chart's version would restart the GPU predictors at every upgrade."""
    for isvc in by_kind(objects("defaults"), "InferenceService").values():
        labels = isvc["metadata"]["labels"]
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels
        assert labels["app.kubernetes.io/instance"] == RELEASE
    adapter = one(objects("defaults"), "Deployment", ADAPTER)
    assert "helm.sh/chart" in adapter["metadata"]["labels"]


def test_upgrade_notes_lead_to_the_charts_version() -> None:
    """docs/deployment.md's upgrade notes name the version they lead to: the chart's own."""
    docs = (ROOT / "docs" / "deployment.md").read_text()
    (old, new) = re.findall(r"Upgrading from chart (\S+) to (\S+) ", docs)[0]
    assert new == chart().version != old


# ----------------------------------------------------------------------------------------
# Storage choices.


def test_pvc_storage_mounts_the_claim_read_only() -> None:
    objs = objects("pvc")
    for name, sub_path, mount_path in (
        (GENERATION, "Qwen-Image", "/models/qwen-image"),
        (EDIT, "Qwen-Image-Edit", "/mnt/models"),
    ):
        isvc = one(objs, "InferenceService", name)
        volume = volumes_of(predictor(isvc))["model"]
        assert volume["persistentVolumeClaim"] == {
            "claimName": "qwen-image-weights",
            "readOnly": True,
        }
        mount = mounts_of(container(isvc))[mount_path]
        assert mount == {
            "name": "model",
            "mountPath": mount_path,
            "readOnly": True,
            "subPath": sub_path,
        }
        env = env_values(container(isvc))
        assert env[location_env(isvc)] == mount_path
        assert "STORAGE_URI" not in env
        assert predictor(isvc)["deploymentStrategy"] == {"type": "Recreate"}
        assert env["QWEN_COMPILE"] == "auto"
        # The compiler caches live on their own claim, writable, shared by both models.
        assert volumes_of(predictor(isvc))["compile-cache"]["persistentVolumeClaim"] == {
            "claimName": "qwen-image-compile-cache"
        }
        assert mounts_of(container(isvc))["/cache/compile"] == {
            "name": "compile-cache",
            "mountPath": "/cache/compile",
            "subPath": "kernels",
        }
        assert env["TORCHINDUCTOR_CACHE_DIR"] == "/cache/compile/torchinductor"
        assert env["TRITON_CACHE_DIR"] == "/cache/compile/triton"


def test_pvc_case_creates_the_api_key_secret() -> None:
    objs = objects("pvc")
    secret = one(objs, "Secret", f"{FULLNAME}-api-key")
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "test-key-not-secret"
    main = one(objs, "Deployment", ADAPTER)["spec"]["template"]["spec"]["containers"][0]
    assert env_of(main)["QWEN_ADAPTER_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{FULLNAME}-api-key",
        "key": "api-key",
    }
    (test_pod,) = by_kind(objs, "Pod").values()
    assert env_of(test_pod["spec"]["containers"][0])["API_KEY"]["valueFrom"]["secretKeyRef"][
        "name"
    ] == (f"{FULLNAME}-api-key")


def test_an_api_key_secret_key_that_looks_like_a_number_stays_text() -> None:
    """A Secret's data keys and secretKeyRef's key are strings: a key such as 0123 must not
    render as the YAML number 83."""
    objs = render_values({"adapter": {"apiKey": {"value": "k", "secretKey": "0123"}}})
    secret = one(objs, "Secret", f"{FULLNAME}-api-key")
    assert list(secret["data"]) == ["0123"]
    main = one(objs, "Deployment", ADAPTER)["spec"]["template"]["spec"]["containers"][0]
    assert env_of(main)["QWEN_ADAPTER_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "0123"
    (test_pod,) = by_kind(objs, "Pod").values()
    reference = env_of(test_pod["spec"]["containers"][0])["API_KEY"]["valueFrom"]["secretKeyRef"]
    assert reference["key"] == "0123"


def test_the_helm_test_pod_checks_a_real_adapter_and_its_predictors(
    stack: Stack, tmp_path: Path
) -> None:
    """The test Pod's script, run as the Pod runs it, against a real adapter in front of the
    local stack's predictors, whose Secret holds two keys (a rotation): it passes while the
    predictors are ready and every model is listed, and fails when a predictor is down, a
    model is missing, or the key is revoked."""
    keys = "new-key, old-key"
    (pod,) = by_kind(render_values({"adapter": {"apiKey": {"value": keys}}}), "Pod").values()
    (test,) = pod["spec"]["containers"]
    assert test["command"][:2] == ["python", "-c"]

    def run_test_pod(adapter_url: str, **changes: str) -> subprocess.CompletedProcess:
        env = {**env_values(test), "API_KEY": keys, "ADAPTER_URL": adapter_url, **changes}
        return subprocess.run(
            [sys.executable, "-c", test["command"][2]],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    predictors = {
        "QWEN_ADAPTER_GENERATION_URL": stack.generation_url,
        "QWEN_ADAPTER_EDIT_URL": f"http://127.0.0.1:{stack.edit_port}",
    }
    closed = f"http://127.0.0.1:{free_port()}"
    down = {**predictors, "QWEN_ADAPTER_EDIT_URL": closed}
    up_process, up = run_adapter(tmp_path / "up.log", {**predictors, "QWEN_ADAPTER_API_KEY": keys})
    down_process, half_down = run_adapter(
        tmp_path / "down.log", {**down, "QWEN_ADAPTER_API_KEY": keys}
    )
    try:
        passed = run_test_pod(up.removesuffix("/v1"))
        assert passed.returncode == 0, passed.stderr
        assert "listed: ['qwen-image', 'qwen-image-edit']" in passed.stdout
        missing = run_test_pod(
            up.removesuffix("/v1"), EXPECTED_MODELS='["qwen-image", "qwen-image-2"]'
        )
        assert missing.returncode == 1, missing.stderr
        unauthorized = run_test_pod(up.removesuffix("/v1"), API_KEY="revoked-key")
        assert unauthorized.returncode == 1 and "401" in unauthorized.stderr
        not_ready = run_test_pod(half_down.removesuffix("/v1"), TIMEOUT="6")
        assert not_ready.returncode == 1
        assert "not ready: 503" in not_ready.stderr and "qwen-image-edit" in not_ready.stderr
    finally:
        stop(up_process, signal.SIGTERM)
        stop(down_process, signal.SIGTERM)


def test_a_new_api_key_restarts_the_adapter_pods() -> None:
    def checksum(key: str) -> str:
        objs = render_values({"adapter": {"apiKey": {"value": key}}})
        return one(objs, "Deployment", ADAPTER)["spec"]["template"]["metadata"]["annotations"][
            "checksum/api-key"
        ]

    assert checksum("first-key") != checksum("second-key")
    existing = render_values({"adapter": {"apiKey": {"existingSecret": "mine"}}})
    template = one(existing, "Deployment", ADAPTER)["spec"]["template"]
    assert "checksum/api-key" not in template["metadata"].get("annotations", {})


def test_annotations_the_chart_also_sets_render_once() -> None:
    """An annotation key in the values that the chart sets too renders once (the API server
    refuses a repeated key): the user's value, except where the chart's must hold
    (deploymentMode, which the rest of the InferenceService follows, and the API key's
    checksum, which restarts the adapter on a new key)."""
    values = {
        "predictor": {
            "annotations": {
                "serving.kserve.io/deploymentMode": "Knative",
                "serving.kserve.io/autoscalerClass": "external",
                "team": "ml",
            },
            "autoscaling": {"autoscalerClass": "keda"},
        },
        "adapter": {
            "apiKey": {"value": "first-key"},
            "podAnnotations": {"checksum/api-key": "mine", "team": "ml"},
        },
    }
    rendered = chart().render(values, name=RELEASE, namespace=NAMESPACE)
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            list(yaml.load_all(text, Loader=UniqueKeyLoader))
    objs = render_values(values)
    for isvc in by_kind(objs, "InferenceService").values():
        assert isvc["metadata"]["annotations"] == {
            "serving.kserve.io/deploymentMode": "Standard",
            "serving.kserve.io/autoscalerClass": "external",
            "team": "ml",
        }
    template = one(objs, "Deployment", ADAPTER)["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "checksum/api-key": hashlib.sha256(b"first-key").hexdigest(),
        "team": "ml",
    }


def test_readiness_on_the_predictors_is_a_choice() -> None:
    objs = render_values({"adapter": {"readinessPath": "/health/ready"}})
    main = one(objs, "Deployment", ADAPTER)["spec"]["template"]["spec"]["containers"][0]
    assert main["readinessProbe"]["httpGet"]["path"] == "/health/ready"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"predictor": {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}},
            "predictor.autoscaling.minReplicas \\(3\\) is larger than maxReplicas \\(2\\)",
        ),
        (
            {"adapter": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
            "adapter.autoscaling.minReplicas \\(5\\) is larger than maxReplicas \\(2\\)",
        ),
        (  # KEDA could scale to zero, and then never back: no pod exports the queue depth
            {
                "predictor": {
                    "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "autoscalerClass": "keda"}
                }
            },
            "predictor.autoscaling.minReplicas 0 for generation needs deploymentMode Knative",
        ),
    ],
)
def test_min_replicas_above_max_is_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmError, match=message):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


def route_timeouts(request: str, backend_request: str) -> dict[str, Any]:
    route = {"enabled": True, "parentRefs": [{"name": "gateway"}]}
    return {
        "httpRoute": {**route, "timeouts": {"request": request, "backendRequest": backend_request}}
    }


@pytest.mark.parametrize(
    ("request_timeout", "backend_request_timeout"),
    [("600s", "700s"), ("10m", "10m1s"), ("1h", "1h500ms"), ("9m31s", "9m31s1ms")],
)
def test_an_httproute_try_longer_than_its_request_is_refused(
    request_timeout: str, backend_request_timeout: str
) -> None:
    """The HTTPRoute CRD's own rule (CEL, which JSON schemas cannot express): the API server
    would refuse the release at install."""
    values = route_timeouts(request_timeout, backend_request_timeout)
    message = f"httpRoute.timeouts.backendRequest \\({backend_request_timeout}\\) is longer"
    with pytest.raises(helm_python.HelmError, match=message):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    ("request_timeout", "backend_request_timeout", "shorter"),
    [
        ("60s", "60s", "request"),  # a gateway's usual default
        ("0s", "1m", "backendRequest"),
        ("630s", "569s", "backendRequest"),
        ("9m29s", "9m", "request"),
    ],
)
def test_an_httproute_timeout_shorter_than_the_adapters_is_refused(
    request_timeout: str, backend_request_timeout: str, shorter: str
) -> None:
    """The gateway would cut a request that the adapter still serves, with its own error
    rather than the adapter's (570 s by default)."""
    values = route_timeouts(request_timeout, backend_request_timeout)
    message = f"httpRoute.timeouts.{shorter} \\(.*\\) is shorter than adapter.requestTimeoutSeconds"
    with pytest.raises(helm_python.HelmError, match=message):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    ("request_timeout", "backend_request_timeout"),
    [("700s", "600s"), ("10m", "600s"), ("1h", "59m59s999ms"), ("0s", "700s")],
)
def test_an_httproute_try_within_its_request_renders(
    request_timeout: str, backend_request_timeout: str
) -> None:
    """Equal, shorter, or under no request timeout at all (0s)."""
    values = route_timeouts(request_timeout, backend_request_timeout)
    (route,) = [doc for doc in render_values(values) if doc["kind"] == "HTTPRoute"]
    assert route["spec"]["rules"][0]["timeouts"] == {
        "request": request_timeout,
        "backendRequest": backend_request_timeout,
    }


def test_pods_stop_only_after_the_requests_they_hold() -> None:
    """A rollout or a drain must not cut accepted requests: each pod's grace period covers
    the adapter's request timeout, and the adapter keeps serving while the Service drops it."""
    objs = objects("defaults")
    pod = one(objs, "Deployment", ADAPTER)["spec"]["template"]["spec"]
    (adapter,) = pod["containers"]
    timeout = int(env_values(adapter)["QWEN_ADAPTER_REQUEST_TIMEOUT_SECONDS"])
    assert adapter["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert pod["terminationGracePeriodSeconds"] == timeout + 5 + 25
    for isvc in by_kind(objs, "InferenceService").values():
        grace = predictor(isvc)["terminationGracePeriodSeconds"]
        assert container(isvc)["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
        drain = int(env_values(container(isvc))["QWEN_SHUTDOWN_GRACE_SECONDS"])
        # after the sleep, and with 5 s left to exit before the SIGKILL
        assert drain == grace - 5 - 5 and drain >= timeout
    for isvc in by_kind(objects("knative"), "InferenceService").values():
        # Knative's grace period, of which the queue-proxy's drain (a preStop that Knative
        # adds) takes 30 s before the server's SIGTERM: the server answers before the SIGKILL.
        timeout_s = predictor(isvc)["timeout"]
        assert env_values(container(isvc))["QWEN_SHUTDOWN_GRACE_SECONDS"] == str(timeout_s - 35)
        assert "lifecycle" not in container(isvc), "Knative drains its pods itself"
    no_predictor_sleep = render_values({"predictor": {"preStopSleepSeconds": 0}})
    for isvc in by_kind(no_predictor_sleep, "InferenceService").values():
        assert "lifecycle" not in container(isvc)
        assert predictor(isvc)["terminationGracePeriodSeconds"] == timeout + 25
        assert env_values(container(isvc))["QWEN_SHUTDOWN_GRACE_SECONDS"] == str(timeout + 20)
    # The predictors' grace period follows the adapter's timeout, as the adapter's does.
    for isvc in by_kind(objects("ingress-httproute"), "InferenceService").values():
        assert predictor(isvc)["terminationGracePeriodSeconds"] == 840 + 5 + 25
        assert env_values(container(isvc))["QWEN_SHUTDOWN_GRACE_SECONDS"] == str(840 + 20)
    for grace, refused in ((500, True), (579, True), (580, False)):  # 570 + 5 + 5 to exit
        values = {"predictor": {"terminationGracePeriodSeconds": grace}}
        if refused:
            with pytest.raises(
                helm_python.HelmError, match=rf"terminationGracePeriodSeconds \({grace}\) for"
            ):
                chart().render(values, name=RELEASE, namespace=NAMESPACE)
        else:
            for isvc in by_kind(render_values(values), "InferenceService").values():
                assert env_values(container(isvc))["QWEN_SHUTDOWN_GRACE_SECONDS"] == "570"
    knative_too_short = {"deploymentMode": "Knative", "adapter": {"requestTimeoutSeconds": 700}}
    with pytest.raises(helm_python.HelmError, match=r"predictor.timeout \(600\) for"):
        chart().render(knative_too_short, name=RELEASE, namespace=NAMESPACE)

    values = {"adapter": {"preStopSleepSeconds": 0}}
    no_sleep = chart().render(values, name=RELEASE, namespace=NAMESPACE)
    assert "preStop" not in no_sleep["qwen-image-serve/templates/adapter-deployment.yaml"]
    longer = render_values({"adapter": {"requestTimeoutSeconds": 900}})
    pod = one(longer, "Deployment", ADAPTER)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 930, "follows the request timeout"
    with pytest.raises(helm_python.HelmError, match=r"terminationGracePeriodSeconds \(60\)"):
        chart().render(
            {"adapter": {"terminationGracePeriodSeconds": 60}}, name=RELEASE, namespace=NAMESPACE
        )


def test_lora_models_leave_quality_to_their_steps() -> None:
    """With a LoRA, OpenAI's quality must not turn its 8 steps into 50: the adapter gets an
    empty quality table for each such model."""
    from openai_adapter.settings import Settings

    settings = adapter_settings(objects("fast"))
    assert settings.model_quality_steps == {"qwen-image": {}, "qwen-image-edit": {}}
    assert settings.quality_table("qwen-image") == {}
    assert adapter_settings(objects("defaults")).quality_steps == Settings().quality_steps
    assert adapter_settings(objects("defaults")).model_quality_steps == {}


def test_the_edit_predictor_takes_its_input_image_limit() -> None:
    """settings.maxInputImages reaches the edit predictor's parser, not the generation one."""
    for case, limit in (("defaults", 3), ("overrides", 2)):
        objs = objects(case)
        edit = next(
            isvc
            for isvc in by_kind(objs, "InferenceService").values()
            if "edit" in container(isvc)["command"][0]
        )
        assert predictor_options(edit).limits.max_input_images == limit
        for isvc in by_kind(objs, "InferenceService").values():
            if isvc is not edit:
                assert "QWEN_MAX_INPUT_IMAGES" not in env_of(container(isvc))


def test_a_smaller_default_size_lets_the_generation_predictor_cap_sizes() -> None:
    """settings.maxSize below the generation default (1664x928) is refused at install, as
    the predictor would refuse to start; settings.defaultSize, for generation only, allows it."""
    # The chart's copy of the default size is the predictor's own.
    from predictors.contract import GENERATION_DEFAULTS

    widest = max(GENERATION_DEFAULTS.width, GENERATION_DEFAULTS.height)
    render_values({"predictor": {"settings": {"maxSize": widest}}})
    with pytest.raises(helm_python.HelmError, match=r"defaultSize auto \(1664x928\) for gen"):
        render_values({"predictor": {"settings": {"maxSize": widest - 16}}})
    capped = {"predictor": {"settings": {"maxSize": 1024}}}
    with pytest.raises(helm_python.HelmError, match=r"to predictor.settings.maxSize \(1024\)"):
        chart().render(capped, name=RELEASE, namespace=NAMESPACE)
    capped["predictor"]["settings"]["defaultSize"] = "1024x768"
    objs = render_values(capped)
    generation = one(objs, "InferenceService", GENERATION)
    assert predictor_options(generation).default_size == (1024, 768)
    assert predictor_options(one(objs, "InferenceService", EDIT)).default_size is None
    assert (
        predictor_options(one(objects("defaults"), "InferenceService", GENERATION)).default_size
        is None
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"predictor": {"settings": {"defaultSize": "1000x1000"}}},
            r"settings.defaultSize \(1000x1000\) for generation is not a size",
        ),
        (
            {"predictor": {"settings": {"defaultSize": "1024x240"}}},
            r"settings.defaultSize \(1024x240\) for generation is not a size",
        ),
        (
            {"predictor": {"performance": {"warmupSizes": "0x0"}}},
            r"performance.warmupSizes \(0x0\) for generation is not a size",
        ),
        (
            {"predictor": {"performance": {"warmupSizes": "1024x1024,100x100"}}},
            r"performance.warmupSizes \(100x100\) for generation is not a size",
        ),
        (
            {
                "generation": {"enabled": False},
                "predictor": {"performance": {"warmupSizes": "2064x1024"}},
            },
            r"performance.warmupSizes \(2064x1024\) for edit is not a size .* \(2048\)",
        ),
    ],
)
def test_sizes_no_request_may_ask_for_are_refused(values: dict[str, Any], message: str) -> None:
    """A predictor refuses to start with a default or warm-up size whose sides are not
    multiples of 16, or a default size outside 256 .. settings.maxSize, which no request may
    ask for (a warm-up there compiles for nothing): the chart refuses them at install
    instead of a crash-looping pod."""
    with pytest.raises(helm_python.HelmError, match=message):
        render_values(values)


def test_sizes_within_the_limits_reach_the_predictors() -> None:
    """The bounds themselves are sizes, and warm-up sizes may be written WxH or WXH."""
    values = {
        "predictor": {
            "settings": {"defaultSize": "256x2048"},
            "performance": {"warmupSizes": "256x256,2048X2048"},
        }
    }
    generation = one(render_values(values), "InferenceService", GENERATION)
    options = predictor_options(generation)
    assert options.default_size == (256, 2048)
    assert options.acceleration.warmup_sizes == ((256, 256), (2048, 2048))


def test_a_predictor_may_admit_no_waiting_request() -> None:
    """settings.maxQueueSize 0 (only the running batch) is the predictor's own choice too."""
    values = {"predictor": {"settings": {"maxQueueSize": 0}}}
    chart().validate_schema(values)
    for isvc in by_kind(render_values(values), "InferenceService").values():
        assert predictor_options(isvc).max_queue_size == 0


def test_model_aliases_reach_the_adapter() -> None:
    settings = adapter_settings(objects("ingress-httproute"))
    assert settings.aliases(settings.generation_model) == ["gpt-image-1", "dall-e-3"]
    assert settings.aliases(settings.edit_model) == ["gpt-image-1", "dall-e-2"]
    defaults = adapter_settings(objects("defaults"))
    assert (defaults.generation_model_aliases, defaults.edit_model_aliases) == ([], [])
    notes = render_text("ingress-httproute")["qwen-image-serve/templates/NOTES.txt"]
    assert 'model "qwen-image" (also "gpt-image-1", "dall-e-3")  storage' in notes
    assert 'model "qwen-image-edit" (also "gpt-image-1", "dall-e-2")  storage' in notes


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"edit": {"modelName": "qwen-image"}},
            r"edit.modelName \(qwen-image\) is generation.modelName too",
        ),
        (
            {"generation": {"modelAliases": ["gpt-image-1", "qwen-image-edit"]}},
            r"generation.modelAliases names qwen-image-edit, a model id",
        ),
        (
            {"edit": {"modelAliases": ["qwen-image-edit"]}},
            r"edit.modelAliases names qwen-image-edit, a model id",
        ),
    ],
)
def test_model_names_the_adapter_cannot_tell_apart_are_refused(
    values: dict[str, Any], message: str
) -> None:
    """The adapter refuses an alias that is a model id at start, and two models of one id
    would share one predictor URL: the chart refuses both at install."""
    with pytest.raises(helm_python.HelmError, match=message):
        render_values(values)


def test_image_url_hosts_and_cors_origins_reach_the_adapter() -> None:
    """The hosts the adapter may fetch edit images from, and the origins that may call it
    from a browser: none unless the values list them."""
    settings = adapter_settings(objects("ingress-httproute"))
    assert settings.image_url_hosts == ["images.example.com", "*.s3.example.com"]
    assert settings.cors_origins == ["https://app.example.com"]
    defaults = adapter_settings(objects("defaults"))
    assert (defaults.image_url_hosts, defaults.cors_origins) == ([], [])


def test_notes_list_each_predictors_speed_modes() -> None:
    notes = render_text("fast")["qwen-image-serve/templates/NOTES.txt"]
    lines = notes.splitlines()
    generation = lines.index(next(line for line in lines if GENERATION in line))
    edit = lines.index(next(line for line in lines if EDIT in line))
    lightning = "LoRA lightx2v/Qwen-Image-Lightning"
    assert lines[generation + 1].split(": ", 1) == [
        "    speed modes",
        f"batches of up to 4 images, fp8, {lightning}",
    ]
    edit_modes = f"batches of up to 2 images, fp8, {lightning}"
    assert lines[edit + 1].split(": ", 1)[1] == edit_modes, "the edit override's own batch size"

    eager = chart().render(
        {"predictor": {"performance": {"compile": "off"}}}, name=RELEASE, namespace=NAMESPACE
    )["qwen-image-serve/templates/NOTES.txt"]
    assert eager.count("speed modes: compile off") == 2, "compile off is not the default"


def test_notes_name_the_gpu_resource_each_predictor_asks_for() -> None:
    values = {
        "edit": {"overrides": {"gpu": {"count": 1, "resourceName": "nvidia.com/mig-3g.71gb"}}}
    }
    notes = chart().render(values, name=RELEASE, namespace=NAMESPACE)[
        "qwen-image-serve/templates/NOTES.txt"
    ]
    assert '"Insufficient nvidia.com/gpu" or "nvidia.com/mig-3g.71gb"' in notes
    assert (
        '"Insufficient nvidia.com/mig-3g.71gb")'
        in render_text("mig")["qwen-image-serve/templates/NOTES.txt"]
    )


def test_the_step_cache_with_batching_is_refused() -> None:
    """The predictor refuses it at start (a request's image would depend on its
    batch-mates): the chart says so at install instead of a crash-looping pod."""
    values = {"predictor": {"performance": {"cache": "first_block", "maxBatchSize": 4}}}
    with pytest.raises(helm_python.HelmError, match=r"needs maxBatchSize 1, not 4, for gener"):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)
    values["predictor"]["performance"]["maxBatchSize"] = 1
    assert by_kind(render_values(values), "InferenceService")


def test_fp8_without_a_gpu_is_refused() -> None:
    values = {"predictor": {"gpu": {"count": 0}, "performance": {"quantization": "fp8"}}}
    with pytest.raises(helm_python.HelmError, match=r"fp8 needs a GPU, but gpu\.count is 0"):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


def test_fast_modes_reach_each_predictor() -> None:
    from predictors.acceleration import Acceleration
    from predictors.engine import BatchPolicy

    objs = objects("fast")
    generation = predictor_options(one(objs, "InferenceService", GENERATION))
    assert generation.batching == BatchPolicy(max_batch_size=4, batch_wait_ms=20.0)
    assert generation.acceleration == Acceleration(
        compile="auto",
        warmup_sizes=((1024, 1024), (1328, 1328)),
        quantization="fp8",
        lora="lightx2v/Qwen-Image-Lightning",
        lora_weight_name="Qwen-Image-Lightning-8steps-V1.0.safetensors",
        lora_steps=8,
    )
    edit = predictor_options(one(objs, "InferenceService", EDIT))
    assert edit.batching == BatchPolicy(max_batch_size=2, batch_wait_ms=20.0)
    assert edit.acceleration == Acceleration(
        compile="auto",
        quantization="fp8",
        lora="lightx2v/Qwen-Image-Lightning",
        lora_weight_name="Qwen-Image-Edit-Lightning-8steps-V1.0.safetensors",
    )


def test_extra_env_replaces_the_charts_variable_of_the_same_name() -> None:
    """The InferenceService's env is a list keyed by name (the API server refuses a name
    twice): an extraEnv entry replaces the chart's own variable."""
    values = {
        "predictor": {
            "extraEnv": [
                {"name": "QWEN_MAX_INPUT_IMAGES", "value": "5"},
                {"name": "QWEN_MAX_SIZE", "value": "1024"},
            ]
        }
    }
    objs = render_values(values)
    for name in (GENERATION, EDIT):
        isvc = one(objs, "InferenceService", name)
        names = [item["name"] for item in container(isvc)["env"]]
        assert len(names) == len(set(names)), names
        assert predictor_options(isvc).limits.max_size == 1024
    edit = one(objs, "InferenceService", EDIT)
    assert predictor_options(edit).limits.max_input_images == 5


def test_extra_env_reaches_the_predictor_as_documented() -> None:
    """The experimental CUDA graphs mode has no chart value: docs/deployment.md sets it with
    predictor.extraEnv, which the predictor's parser must then read."""
    values = {"predictor": {"extraEnv": [{"name": "QWEN_CUDA_GRAPHS", "value": "on"}]}}
    objs = render_values(values)
    for name in (GENERATION, EDIT):
        isvc = one(objs, "InferenceService", name)
        assert predictor_options(isvc).acceleration.cuda_graphs == "on"


def test_adapter_extra_env_replaces_the_charts_variable_of_the_same_name() -> None:
    """As for the predictors: the Deployment's env is keyed by name, so an adapter.extraEnv
    entry replaces the chart's variable instead of repeating it."""
    values = {
        "adapter": {
            "extraEnv": [
                {"name": "QWEN_ADAPTER_REQUEST_TIMEOUT_SECONDS", "value": "300"},
                {"name": "QWEN_ADAPTER_MAX_CONNECTIONS", "value": "16"},
            ]
        }
    }
    objs = render_values(values)
    main = one(objs, "Deployment", ADAPTER)["spec"]["template"]["spec"]["containers"][0]
    names = [item["name"] for item in main["env"]]
    assert len(names) == len(set(names)), names
    settings = adapter_settings(objs)
    assert (settings.request_timeout_seconds, settings.max_connections) == (300, 16)


def test_schema_offers_the_predictors_choices() -> None:
    """The schema's enums are the predictor's and the adapter's own lists, so neither drifts
    from the other."""
    from openai_adapter import protocol
    from predictors import acceleration
    from predictors.contract import Limits

    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    performance = schema["definitions"]["performance"]["properties"]
    for key, choices in (
        ("compile", acceleration.COMPILE_CHOICES),
        ("attentionBackend", acceleration.MASK_FREE_BACKENDS),
        ("maskedAttentionBackend", acceleration.MASK_CAPABLE_BACKENDS),
        ("textPadding", acceleration.TEXT_PADDINGS),
        ("quantization", acceleration.QUANTIZATIONS),
        ("cache", tuple(acceleration.CACHES)),
    ):
        assert tuple(performance[key]["enum"]) == tuple(choices), key
    quality_steps = schema["properties"]["adapter"]["properties"]["qualitySteps"]
    assert tuple(quality_steps["properties"]) == typing.get_args(protocol.Quality)
    # Steps the predictors take (a LoRA's default, each quality's), at their default limits.
    limits = Limits()
    steps = schema["definitions"]["steps"]
    assert (steps["minimum"], steps["maximum"]) == (limits.min_steps, limits.max_steps)
    assert schema["definitions"]["lora"]["properties"]["steps"] == {"$ref": "#/definitions/steps"}
    assert {json.dumps(entry) for entry in quality_steps["properties"].values()} == {
        json.dumps({"$ref": "#/definitions/steps"})
    }


def test_storage_uri_goes_through_kserve_storage_initializer() -> None:
    objs = objects("storage-uri")
    for name, uri in (
        (GENERATION, "pvc://qwen-image-weights/Qwen-Image"),
        (EDIT, "hf://Qwen/Qwen-Image-Edit"),
    ):
        isvc = one(objs, "InferenceService", name)
        env = env_values(container(isvc))
        assert env["STORAGE_URI"] == uri
        assert env[location_env(isvc)] == "/mnt/models"
        assert "model" not in volumes_of(predictor(isvc))
        assert predictor(isvc)["serviceAccountName"] == "qwen-image-storage"


def test_a_local_model_cache_keeps_the_weights_on_the_nodes() -> None:
    """KServe matches an InferenceService to a LocalModelCache by its STORAGE_URI, so the
    cache must name exactly that URI; it is rendered only where asked for."""
    objs = objects("storage-uri")
    (cache,) = by_kind(objs, "LocalModelCache").values()
    generation_uri = env_values(container(one(objs, "InferenceService", GENERATION)))
    assert cache["spec"] == {
        "sourceModelUri": generation_uri["STORAGE_URI"],
        "modelSize": "60Gi",
        "nodeGroups": ["gpu-nvme"],
    }
    # KServe links an InferenceService to a cache as it admits it, and Helm would create
    # this kind after the InferenceServices: a hook before them, kept by Helm's hook policy
    # (its default would delete the cache in use before creating it again)
    assert cache["metadata"]["annotations"] == {
        "helm.sh/hook": "pre-install,pre-upgrade",
        "helm.sh/hook-weight": "-10",
        "helm.sh/hook-delete-policy": "hook-failed",
    }
    name = cache["metadata"]["name"]
    assert name.startswith("qis-qwen-image-serve-gen") and len(name) <= 33, name
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
    notes = render_text("storage-uri")["qwen-image-serve/templates/NOTES.txt"]
    assert f"weights cached on node groups gpu-nvme: kubectl get localmodelcache {name}" in notes
    assert notes.count("weights cached on node groups") == 1  # the edit weights are not

    # sourceModelUri is immutable: another URI is another cache, not an update.
    values = case_values("storage-uri")
    values["generation"]["storage"]["storageUri"]["uri"] = "hf://Qwen/Qwen-Image"
    (moved,) = by_kind(render_values(values), "LocalModelCache").values()
    assert moved["spec"]["sourceModelUri"] == "hf://Qwen/Qwen-Image"
    assert moved["metadata"]["name"] != name
    assert not by_kind(objects("defaults"), "LocalModelCache")


def test_host_path_storage() -> None:
    objs = objects("hostpath")
    for name, path, mount_path in (
        (GENERATION, "/data/models/Qwen-Image", "/mnt/models"),
        (EDIT, "/data/models/Qwen-Image-Edit", "/models/edit"),
    ):
        isvc = one(objs, "InferenceService", name)
        assert volumes_of(predictor(isvc))["model"]["hostPath"] == {
            "path": path,
            "type": "Directory",
        }
        assert mounts_of(container(isvc))[mount_path]["readOnly"] is True
        assert env_values(container(isvc))[location_env(isvc)] == mount_path
    # The schema's empty type (Kubernetes' "no check") leaves the field out.
    host_path = {"path": "/data/e", "type": ""}
    values = {"edit": {"storage": {"kind": "hostPath", "hostPath": host_path}}}
    edit = one(render_values(values), "InferenceService", EDIT)
    assert volumes_of(predictor(edit))["model"]["hostPath"] == {"path": "/data/e"}
    assert custom_errors(edit) == []


def test_hugging_face_storage_with_token_and_cache_claim() -> None:
    objs = objects("huggingface")
    generation = one(objs, "InferenceService", GENERATION)
    edit = one(objs, "InferenceService", EDIT)
    assert env_values(container(generation))["QWEN_IMAGE_LOCATION"] == "Qwen/Qwen-Image"
    assert env_values(container(edit))["QWEN_IMAGE_EDIT_LOCATION"] == "Qwen/Qwen-Image-Edit"
    assert env_of(container(generation))["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "hf-token",
        "key": "token",
    }
    assert env_of(container(edit))["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "hf-token",
        "key": "HF_TOKEN",
    }
    hf_home = env_values(container(generation))["HF_HOME"]
    assert mounts_of(container(generation))[hf_home] == {
        "name": "hf-cache",
        "mountPath": hf_home,
        "subPath": "hub-cache",
    }
    assert volumes_of(predictor(generation))["hf-cache"]["persistentVolumeClaim"] == {
        "claimName": "hf-cache"
    }
    assert "hf-cache" not in volumes_of(predictor(edit))


def test_a_download_to_node_disk_requests_the_room_for_it() -> None:
    """Storage kind huggingFace without a cache claim downloads ~58 GB into the cache
    emptyDir: the pod asks the scheduler for that disk, unless its requests name their own."""
    for isvc in by_kind(objects("defaults"), "InferenceService").values():
        assert container(isvc)["resources"]["requests"]["ephemeral-storage"] == "100Gi"
    objs = objects("huggingface")
    with_claim = [
        isvc
        for isvc in by_kind(objs, "InferenceService").values()
        if "hf-cache" in volumes_of(predictor(isvc))
    ]
    assert with_claim
    for isvc in with_claim:
        assert "ephemeral-storage" not in container(isvc)["resources"]["requests"]
    own = {"predictor": {"resources": {"requests": {"ephemeral-storage": "150Gi"}}}}
    for isvc in by_kind(render_values(own), "InferenceService").values():
        assert container(isvc)["resources"]["requests"]["ephemeral-storage"] == "150Gi"
    # A limit alone is the request too (Kubernetes' default): a larger one would be invalid.
    limit = {"predictor": {"resources": {"limits": {"ephemeral-storage": "80Gi"}}}}
    for isvc in by_kind(render_values(limit), "InferenceService").values():
        assert "ephemeral-storage" not in container(isvc)["resources"]["requests"]


def test_a_storage_uri_download_requests_the_room_for_it() -> None:
    """KServe's storage initializer downloads a storage URI (hf://, s3://, ...) into an
    emptyDir on the node; a pvc:// claim is mounted, an oci:// image is a modelcar, and a
    LocalModelCache's copy is on the node already: those download nothing."""

    def requested(uri: str, cache: bool = False) -> str | None:
        storage_uri: dict[str, Any] = {"uri": uri}
        if cache:
            storage_uri["localModelCache"] = {"enabled": True, "nodeGroups": ["gpu-nvme"]}
        values = {"generation": {"storage": {"kind": "storageUri", "storageUri": storage_uri}}}
        generation = one(render_values(values), "InferenceService", GENERATION)
        return container(generation)["resources"]["requests"].get("ephemeral-storage")

    assert requested("hf://Qwen/Qwen-Image") == "100Gi"
    assert requested("s3://models/Qwen-Image") == "100Gi"
    assert requested("pvc://qwen-weights/Qwen-Image") is None
    assert requested("oci://registry.example.com/qwen-image:v1") is None
    assert requested("hf://Qwen/Qwen-Image", cache=True) is None


def test_the_adapter_serves_a_predictor_that_runs_elsewhere() -> None:
    """adapter.predictorUrls serves a model whose InferenceService the chart does not deploy;
    the helm test expects it too."""
    remote = "http://qwen-image-edit-predictor.shared-gpus.svc.cluster.local"
    values = {
        "edit": {"enabled": False, "modelAliases": ["dall-e-2"]},
        "adapter": {"predictorUrls": {"edit": remote}},
    }
    objs = render_values(values)
    assert list(by_kind(objs, "InferenceService")) == [GENERATION]
    settings = adapter_settings(objs)
    assert settings.edit_url == remote
    assert settings.models == ["qwen-image", "qwen-image-edit"]
    assert settings.aliases("qwen-image-edit") == ["dall-e-2"]
    (test_pod,) = by_kind(objs, "Pod").values()
    assert env_values(test_pod["spec"]["containers"][0])["EXPECTED_MODELS"] == (
        '["qwen-image","qwen-image-edit"]'
    )
    off = adapter_settings(render_values({"edit": {"enabled": False}}))
    assert off.models == ["qwen-image"]


def test_tiny_storage_runs_without_gpu_or_weights() -> None:
    for isvc in by_kind(objects("tiny"), "InferenceService").values():
        main = container(isvc)
        env = env_values(main)
        assert "QWEN_IMAGE_LOCATION" not in env
        assert "QWEN_IMAGE_EDIT_LOCATION" not in env
        assert (env["QWEN_DEVICE"], env["QWEN_DTYPE"]) == ("cpu", "float32")
        assert set(main["resources"]["limits"]) == {"cpu", "memory"}
        assert "tolerations" not in predictor(isvc)
        assert "dshm" not in volumes_of(predictor(isvc))
        assert "/dev/shm" not in mounts_of(main)


# ----------------------------------------------------------------------------------------
# Deployment mode, GPUs, exposure, overrides.


def test_knative_mode() -> None:
    objs = objects("knative")
    for isvc in by_kind(objs, "InferenceService").values():
        annotations = isvc["metadata"]["annotations"]
        assert annotations["serving.kserve.io/deploymentMode"] == "Knative"
        assert "serving.kserve.io/autoscalerClass" not in annotations
        assert isvc["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"
        spec = predictor(isvc)
        assert spec["annotations"]["serving.knative.dev/progress-deadline"] == "2400s"
        assert spec["containerConcurrency"] == 4
        assert (spec["minReplicas"], spec["maxReplicas"]) == (0, 3)
        assert (spec["scaleMetric"], spec["scaleTarget"]) == ("concurrency", 2)
        # Fields Knative Serving rejects in a pod spec.
        assert "deploymentStrategy" not in spec
        assert "terminationGracePeriodSeconds" not in spec
        assert "fsGroupChangePolicy" not in spec["securityContext"]
    (policy,) = by_kind(objs, "NetworkPolicy").values()
    (rule,) = policy["spec"]["ingress"]
    namespaces = [
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for peer in rule["from"]
        if "namespaceSelector" in peer
    ]
    assert namespaces == ["knative-serving", "kourier-system", "istio-system"]
    assert "ports" not in rule, "Knative traffic arrives on the queue-proxy port"
    monitors = by_kind(objs, "ServiceMonitor")
    assert sorted(monitors) == [ADAPTER], "KServe's Knative Services have no http1 port to scrape"


def test_legacy_raw_deployment_name_is_standard_mode() -> None:
    objs = render_values(
        {
            "deploymentMode": "RawDeployment",
            "predictor": {"deploymentStrategy": {"type": "Recreate"}},
        }
    )
    for isvc in by_kind(objs, "InferenceService").values():
        assert (
            isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
        )
        assert predictor(isvc)["deploymentStrategy"] == {"type": "Recreate"}
        assert "containerConcurrency" not in predictor(isvc)
        assert predictor(isvc)["terminationGracePeriodSeconds"] == 600
        assert predictor(isvc)["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_mig_slices_and_gpu_scheduling() -> None:
    for isvc in by_kind(objects("mig"), "InferenceService").values():
        spec = predictor(isvc)
        limits = container(isvc)["resources"]["limits"]
        assert limits["nvidia.com/mig-3g.71gb"] == 1
        assert "nvidia.com/gpu" not in limits
        assert spec["nodeSelector"] == {
            "nvidia.com/mig.strategy": "mixed",
            "nvidia.com/gpu.product": "NVIDIA-H200",
        }
        assert spec["runtimeClassName"] == "nvidia"
        assert spec["priorityClassName"] == "inference-high"
        assert len(spec["tolerations"]) == 2
        assert "podAntiAffinity" in spec["affinity"]


def test_ingress_httproute_hpa_and_monitoring() -> None:
    objs = objects("ingress-httproute")
    service = one(objs, "Service", ADAPTER)
    port_names = {port["name"]: port["port"] for port in service["spec"]["ports"]}

    ingress = one(objs, "Ingress", ADAPTER)
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["metadata"]["annotations"] == {
        "nginx.ingress.kubernetes.io/proxy-read-timeout": "900",  # the adapter's 840 + 60
        "nginx.ingress.kubernetes.io/proxy-send-timeout": "900",
        "nginx.ingress.kubernetes.io/proxy-body-size": "128m",
        "example.com/team": "imaging",
    }
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "images.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == ADAPTER
    assert backend["port"]["name"] in port_names
    assert ingress["spec"]["tls"][0]["secretName"] == "images-example-com-tls"

    route = one(objs, "HTTPRoute", ADAPTER)
    (route_rule,) = route["spec"]["rules"]
    assert route_rule["timeouts"] == {"request": "15m", "backendRequest": "15m"}
    assert route_rule["backendRefs"] == [{"name": ADAPTER, "port": port_names["http"]}]
    assert route["spec"]["parentRefs"][0]["name"] == "public-gateway"

    deployment = one(objs, "Deployment", ADAPTER)
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = one(objs, "HorizontalPodAutoscaler", ADAPTER)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": ADAPTER,
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)

    main = deployment["spec"]["template"]["spec"]["containers"][0]
    assert env_values(main)["QWEN_ADAPTER_REQUEST_TIMEOUT_SECONDS"] == "840"
    assert env_of(main)["QWEN_ADAPTER_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "qwen-image-api-key",
        "key": "key",
    }
    assert not by_kind(objs, "Secret"), "an existing Secret is referenced, not created"
    for isvc in by_kind(objs, "InferenceService").values():
        assert predictor(isvc)["timeout"] == 900

    monitors = by_kind(objs, "ServiceMonitor")
    predictors_monitor = monitors[f"{FULLNAME}-predictors"]
    assert predictors_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = predictors_monitor["spec"]["selector"]
    assert selector["matchLabels"] == {"component": "predictor"}
    assert selector["matchExpressions"][0]["values"] == [GENERATION, EDIT]
    isvc_port = container(one(objs, "InferenceService", GENERATION))["ports"][0]["name"]
    assert predictors_monitor["spec"]["endpoints"][0]["port"] == isvc_port
    assert predictors_monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    adapter_monitor = monitors[ADAPTER]
    assert adapter_monitor["spec"]["endpoints"][0]["port"] in port_names
    assert (
        adapter_monitor["spec"]["selector"]["matchLabels"].items()
        <= service["metadata"]["labels"].items()
    )

    (policy,) = by_kind(objs, "NetworkPolicy").values()
    peers = policy["spec"]["ingress"][0]["from"]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    } in peers


def test_an_ingress_gets_ingress_nginxs_timeouts_from_the_adapters() -> None:
    """ingress-nginx's defaults (60 s, 1 MB) would cut requests and uploads before the
    adapter answers them."""
    ingress = one(render_values({"ingress": {"enabled": True}}), "Ingress", ADAPTER)
    assert ingress["metadata"]["annotations"] == {
        "nginx.ingress.kubernetes.io/proxy-read-timeout": "630",
        "nginx.ingress.kubernetes.io/proxy-send-timeout": "630",
        "nginx.ingress.kubernetes.io/proxy-body-size": "64m",
    }


def test_ingress_and_httproute_expose_only_the_openai_api_by_default() -> None:
    """Clients reach /v1; the adapter's unauthenticated /metrics, /health and /docs stay
    inside the cluster."""
    from openai_adapter.app import create_app

    objs = render_values(
        {
            "ingress": {"enabled": True},
            "httpRoute": {"enabled": True, "parentRefs": [{"name": "g"}]},
        }
    )
    (rule,) = one(objs, "Ingress", ADAPTER)["spec"]["rules"]
    (ingress_path,) = rule["http"]["paths"]
    (route_rule,) = one(objs, "HTTPRoute", ADAPTER)["spec"]["rules"]
    (route_match,) = route_rule["matches"]
    assert (ingress_path["path"], ingress_path["pathType"]) == ("/v1", "Prefix")
    assert route_match["path"] == {"type": "PathPrefix", "value": "/v1"}
    paths = create_app().openapi()["paths"]
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/models"} <= set(paths)
    assert {"/health/live", "/health/ready"} <= set(paths)  # served, but not routed


def test_service_monitors_scrape_the_predictors_and_the_adapters_metrics_route() -> None:
    from fastapi.testclient import TestClient

    from openai_adapter.app import create_app

    objs = render_values({"metrics": {"serviceMonitor": {"enabled": True}}})
    monitors = by_kind(objs, "ServiceMonitor")
    assert sorted(monitors) == sorted([f"{FULLNAME}-predictors", ADAPTER])
    (endpoint,) = monitors[ADAPTER]["spec"]["endpoints"]
    with TestClient(create_app()) as adapter:
        scraped = adapter.get(endpoint["path"])
    assert scraped.status_code == 200 and "qwen_image_adapter_requests_total" in scraped.text
    only_predictors = {"metrics": {"serviceMonitor": {"enabled": True, "adapter": False}}}
    assert sorted(by_kind(render_values(only_predictors), "ServiceMonitor")) == [
        f"{FULLNAME}-predictors"
    ]


def exported_series() -> dict[str, set[str]]:
    """The series names of every metric the adapter and the predictors export, by family."""
    from openai_adapter import metrics as adapter_metrics
    from predictors import metrics as predictor_metrics

    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_count", "_sum"]}
    series = {}
    for module in (adapter_metrics, predictor_metrics):
        for value in vars(module).values():
            if isinstance(value, prometheus_client.metrics.MetricWrapperBase):
                (family,) = value.describe()
                series[family.name] = {family.name + end for end in suffixes[family.type]}
    return series


def test_grafana_dashboard_charts_every_exported_metric_and_no_other() -> None:
    objs = objects("ingress-httproute")
    config_map = one(objs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["qwen-image-serve.json"])
    assert dashboard == json.loads((CHART_DIR / "dashboards" / "qwen-image-serve.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert all('namespace="$namespace"' in expr for expr in exprs)
    used = set(re.findall(r"\bqwen_image_[a-z_]+", " ".join(exprs)))
    series = exported_series()
    assert used <= set().union(*series.values()), used - set().union(*series.values())
    assert {family for family, names in series.items() if names & used} == set(series)
    assert not by_kind(render_values({}), "ConfigMap"), "off by default"


def test_keda_scales_a_predictor_on_its_queue() -> None:
    from predictors import metrics

    objs = objects("keda-queue")
    generation = one(objs, "InferenceService", GENERATION)
    assert generation["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
    (metric,) = predictor(generation)["autoScaling"]["metrics"]
    query = metric["external"]["metric"]["query"]
    assert f'namespace="{NAMESPACE}"' in query and 'model_name="qwen-image"' in query
    assert "qwen_image_queue_depth" in query
    assert metrics.QUEUE_DEPTH._name == "qwen_image_queue_depth", "the metric the query reads"
    edit = one(objs, "InferenceService", EDIT)
    assert "autoScaling" not in predictor(edit), "the edit predictor keeps the shared settings"
    monitor = one(objs, "ServiceMonitor", f"{FULLNAME}-predictors")  # Prometheus scrapes it
    assert GENERATION in monitor["spec"]["selector"]["matchExpressions"][0]["values"]
    (policy,) = by_kind(objs, "NetworkPolicy").values()
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    } in (peers)


def test_network_policy_off_and_one_predictor() -> None:
    objs = objects("no-networkpolicy")
    assert not by_kind(objs, "NetworkPolicy")
    assert sorted(by_kind(objs, "InferenceService")) == [GENERATION]
    env = env_values(one(objs, "Deployment", ADAPTER)["spec"]["template"]["spec"]["containers"][0])
    assert env["QWEN_ADAPTER_EDIT_URL"] == "", "an empty URL switches the model off"
    assert not by_kind(objs, "Pod"), "tests.enabled=false drops the test hook"


def test_per_predictor_overrides() -> None:
    objs = objects("overrides")
    generation = one(objs, "InferenceService", "txt2img")
    edit = one(objs, "InferenceService", EDIT)

    assert generation["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
    assert (predictor(generation)["minReplicas"], predictor(generation)["maxReplicas"]) == (2, 4)
    assert predictor(generation)["autoScaling"]["metrics"][0]["resource"]["name"] == "cpu"
    assert container(generation)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nodeSelector" not in predictor(generation)

    assert "serving.kserve.io/autoscalerClass" not in edit["metadata"]["annotations"]
    assert container(edit)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert predictor(edit)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    env = env_values(container(edit))
    assert (env["QWEN_DTYPE"], env["QWEN_MAX_QUEUE_SIZE"], env["QWEN_MAX_SIZE"]) == (
        "bfloat16",
        "2",
        "1536",
    )
    assert env["QWEN_IMAGE_EDIT_LOCATION"] == "Qwen/Qwen-Image-Edit-2509"
    assert (
        container(edit)["readinessProbe"]["httpGet"]["path"]
        == "/v2/models/qwen-image-edit-2509/ready"
    )

    (policy,) = by_kind(objs, "NetworkPolicy").values()
    assert policy["spec"]["podSelector"]["matchExpressions"][0]["values"] == ["txt2img", EDIT]


# ----------------------------------------------------------------------------------------
# values.schema.json rejects bad values.


def test_image_pull_secrets_reach_every_pod() -> None:
    """A private registry: the GPU predictors need the secret as much as the adapter."""
    secrets = [{"name": "regcred"}]
    specs = dict(pod_specs(render_values({"imagePullSecrets": secrets})))
    assert len(specs) == 4, sorted(specs)  # adapter, test pod, two InferenceServices
    for where, spec in specs.items():
        assert spec.get("imagePullSecrets") == secrets, where


def test_common_labels_reach_every_object_and_pod() -> None:
    objs = render_values({"commonLabels": {"team": "ml"}})
    assert objs
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"]["labels"].get("team") == "ml", where
    adapter = one(objs, "Deployment", f"{FULLNAME}-adapter")
    assert adapter["spec"]["template"]["metadata"]["labels"].get("team") == "ml"


BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "string GPU count": ({"predictor": {"gpu": {"count": "2"}}}, "/predictor/gpu/count"),
    "string GPU count in an override": (
        {"edit": {"overrides": {"gpu": {"count": "one", "resourceName": "nvidia.com/gpu"}}}},
        "/edit/overrides/gpu/count",
    ),
    "unknown storage kind": (
        {"generation": {"storage": {"kind": "s3"}}},
        "/generation/storage/kind",
    ),
    "pvc without a claim": ({"edit": {"storage": {"kind": "pvc"}}}, "claimName"),
    "storageUri without a scheme": (
        {"generation": {"storage": {"kind": "storageUri", "storageUri": {"uri": "models/qwen"}}}},
        "uri",
    ),
    "a local model cache of weights that are not a storage URI": (
        {
            "edit": {
                "storage": {
                    "kind": "huggingFace",
                    "storageUri": {"localModelCache": {"enabled": True, "nodeGroups": ["a"]}},
                }
            }
        },
        "/edit/storage/kind",
    ),
    "a local model cache on no node group": (
        {
            "generation": {
                "storage": {
                    "kind": "storageUri",
                    "storageUri": {
                        "uri": "hf://Qwen/Qwen-Image",
                        "localModelCache": {"enabled": True},
                    },
                }
            }
        },
        "/generation/storage/storageUri/localModelCache/nodeGroups",
    ),
    "unknown deployment mode": ({"deploymentMode": "Serverful"}, "/deploymentMode"),
    "misspelt top-level key": ({"predictors": {}}, "predictors"),
    "misspelt predictor key": (
        {"predictor": {"tolerations": [], "nodeSelecter": {}}},
        "nodeSelecter",
    ),
    "HTTPRoute without a Gateway": ({"httpRoute": {"enabled": True}}, "/httpRoute/parentRefs"),
    "bad dtype": ({"predictor": {"settings": {"dtype": "int4"}}}, "/predictor/settings/dtype"),
    "compile as an unquoted YAML off": (
        {"predictor": {"performance": {"compile": False}}},
        "/predictor/performance/compile",
    ),
    "an attention backend diffusers mis-packs for Qwen": (
        {"predictor": {"performance": {"attentionBackend": "flash_varlen"}}},
        "/predictor/performance/attentionBackend",
    ),
    "malformed warm-up sizes": (
        {"predictor": {"performance": {"warmupSizes": "1024"}}},
        "/predictor/performance/warmupSizes",
    ),
    "a partial performance override": (
        {"edit": {"overrides": {"performance": {"compile": "on"}}}},
        "/edit/overrides/performance': missing properties 'maxBatchSize'",
    ),
    "misspelt LoRA key": (
        {"generation": {"lora": {"path": "/mnt/models/lightning.safetensors"}}},
        "/generation/lora': additional properties 'path'",
    ),
    "unknown quality in the adapter's table": (
        {"adapter": {"qualitySteps": {"ultra": 80}}},
        "/adapter/qualitySteps",
    ),
    "a URL in place of an image host": (
        {"adapter": {"imageUrlHosts": ["https://images.example.com"]}},
        "/adapter/imageUrlHosts/0",
    ),
    "an origin with a path": (
        {"adapter": {"corsOrigins": ["https://app.example.com/"]}},
        "/adapter/corsOrigins/0",
    ),
    "a chart label in commonLabels": (
        {"commonLabels": {"app.kubernetes.io/instance": "other"}},
        "invalid propertyName 'app.kubernetes.io/instance'",
    ),
    "a selector label in the adapter's pod labels": (
        {"adapter": {"podLabels": {"app.kubernetes.io/component": "api"}}},
        "invalid propertyName 'app.kubernetes.io/component'",
    ),
    "a batch wait past the predictor's bound": (
        {"predictor": {"performance": {"batchWaitMs": 20000}}},
        "/predictor/performance/batchWaitMs",
    ),
    "more LoRA steps than the predictor takes": (
        {"generation": {"lora": {"source": "lightx2v/Qwen-Image-Lightning", "steps": 120}}},
        "/generation/lora/steps",
    ),
    "a LoRA of one step": (
        {"generation": {"lora": {"source": "lightx2v/Qwen-Image-Lightning", "steps": 1}}},
        "/generation/lora/steps",
    ),
    "one step for a quality": (
        {"adapter": {"qualitySteps": {"low": 1}}},
        "/adapter/qualitySteps/low",
    ),
    "more steps for a quality than the predictor takes": (
        {"adapter": {"qualitySteps": {"max": 150}}},
        "/adapter/qualitySteps/max",
    ),
    "a default size that is not WxH": (
        {"predictor": {"settings": {"defaultSize": "1024"}}},
        "/predictor/settings/defaultSize",
    ),
    "a max size below the predictor's least size": (
        {"predictor": {"settings": {"maxSize": 128}}},
        "/predictor/settings/maxSize': minimum",
    ),
    "a step cache threshold that never skips": (
        {"predictor": {"performance": {"cache": "first_block", "cacheThreshold": 0}}},
        "/predictor/performance/cacheThreshold",
    ),
    "unknown readiness path": (
        {"adapter": {"readinessPath": "/healthz"}},
        "/adapter/readinessPath",
    ),
    # Kubernetes requires 1 for liveness and startup probes, and has no grace period on
    # readiness probes: the API server would refuse the pods at install.
    "liveness success threshold other than 1": (
        {"predictor": {"probes": {"liveness": {"successThreshold": 2}}}},
        "/predictor/probes/liveness/successThreshold",
    ),
    "grace period on a readiness probe": (
        {"adapter": {"probes": {"readiness": {"terminationGracePeriodSeconds": 30}}}},
        "terminationGracePeriodSeconds",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(case: str) -> None:
    values, where = BAD_VALUES[case]
    with pytest.raises(helm_python.HelmValuesError, match=where):
        chart().validate_schema(values)
    with pytest.raises(helm_python.HelmValuesError):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("case", CASES)
def test_schema_accepts_every_values_file(case: str) -> None:
    chart().validate_schema(case_values(case))


def test_every_values_field_is_documented() -> None:
    """Every value in values.yaml carries a ``# --`` comment (helm-docs style).

    Structural sections (a key whose children are keys) need none; everything inside a
    documented value (a default map or list) is that value's content.
    """
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    undocumented = []
    stack: list[tuple[int, bool]] = []  # (indent, is a documented value) of the open keys
    for index, line in enumerate(lines):
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stripped.startswith("- ") or any(documented for _, documented in stack):
            continue
        comments = []
        for above in reversed(lines[:index]):
            if not above.strip().startswith("#"):
                break
            comments.append(above.strip())
        documented = any(comment.startswith("# --") for comment in comments)
        following = [
            other
            for other in lines[index + 1 :]
            if other.strip() and not other.strip().startswith("#")
        ]
        is_section = (
            stripped.endswith(":")
            and bool(following)
            and len(following[0]) - len(following[0].lstrip()) > indent
            and not following[0].lstrip().startswith("- ")
        )
        if not documented and not is_section:
            undocumented.append(f"values.yaml:{index + 1}: {stripped}")
        stack.append((indent, documented))
    assert undocumented == []
