"""The README's curl and SDK examples, and docs/adapter.md's JSON edit, run as written
against the local stack.

Only the port (the stack runs on a free one) and the curl example's image path change.
The curl examples ask for the defaults (1664x928 for generation; the test stack maps "no
quality" to 2 steps), so this is the slowest adapter test; the examples run concurrently,
which the predictors allow (one CPU thread each).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from openai_adapter.settings import Settings
from tests.adapter_stack import Stack
from tests.servers import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
ADAPTER_DOCS = PROJECT_ROOT / "docs" / "adapter.md"
README_PORT = "127.0.0.1:8000"
README_IMAGE = "/path/to/your/image.png"


def fenced_blocks(language: str, document: Path = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", document.read_text(), re.M | re.S)


def curl_examples() -> list[str]:
    """The curl examples of the OpenAI API (the README's v2 example calls a predictor)."""
    return [
        block
        for block in fenced_blocks("bash")
        if block.lstrip().startswith("curl ") and README_PORT in block
    ]


def sdk_examples() -> list[str]:
    return [block for block in fenced_blocks("python") if "from openai import OpenAI" in block]


def decode(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def test_readme_has_the_examples():
    examples = curl_examples()
    assert len(examples) == 2 and len(sdk_examples()) == 1
    assert "/v1/images/generations" in examples[0] and "/v1/images/edits" in examples[1]
    assert '-F "prompt=make the cat wear a party hat"' in examples[1]
    assert all(README_PORT in block for block in [*examples, *sdk_examples()])


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("curl") is None and not os.environ.get("CI"),
    reason="curl is not installed (in CI this fails instead)",
)
def test_readme_examples_run(stack: Stack, image_path: Path, tmp_path: Path):
    port = f"127.0.0.1:{stack.port}"
    curls = [
        block.replace(README_PORT, port).replace(README_IMAGE, str(image_path))
        for block in curl_examples()
    ]
    (sdk,) = sdk_examples()
    commands = [["bash", "-c", block] for block in curls]
    commands.append([sys.executable, "-c", sdk.replace(README_PORT, port)])

    def run(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        generation, edit, sdk_run = pool.map(run, commands)

    for done in (generation, edit, sdk_run):
        assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(generation.stdout)
    assert (answer["size"], answer["output_format"]) == ("1664x928", "png")
    assert answer["data"][0]["seed"] == 42
    assert decode(answer["data"][0]).size == (1664, 928)
    answer = json.loads(edit.stdout)
    width, height = decode(answer["data"][0]).size
    assert abs(width / height - 320 / 192) < 0.05  # the input's aspect ratio
    written = sorted(path.name for path in tmp_path.iterdir())
    assert len(written) == 2, written
    for name in written:
        assert Image.open(tmp_path / name).format == "PNG"


@pytest.mark.skipif(
    shutil.which("curl") is None and not os.environ.get("CI"),
    reason="curl is not installed (in CI this fails instead)",
)
def test_the_json_edit_example_runs(stack: Stack, tmp_path: Path):
    """docs/adapter.md's JSON edit, with a photo-sized cat.png: its data URL (1.3 MB) is
    past what one command-line argument may hold (128 KiB), which the example must not
    need."""
    (example,) = [block for block in fenced_blocks("bash", ADAPTER_DOCS) if "edit.json" in block]
    noise = Image.frombytes("RGB", (640, 480), os.urandom(640 * 480 * 3))
    noise.save(tmp_path / "cat.png")
    assert (tmp_path / "cat.png").stat().st_size > 900_000
    done = subprocess.run(
        ["bash", "-c", example.replace(README_PORT, f"127.0.0.1:{stack.port}")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout)
    width, height = decode(answer["data"][0]).size
    assert abs(width / height - 640 / 480) < 0.05  # the input's aspect ratio


def test_the_readme_documents_every_adapter_setting_with_its_default():
    """The README's table of ``QWEN_ADAPTER_*`` variables is what an operator reads: each
    setting has its row, and the row's default is the code's."""
    readme = README.read_text()
    rows = set(re.findall(r"^\| `(QWEN_ADAPTER_\w+)` \|", readme, re.M))
    assert rows == {f"QWEN_ADAPTER_{name.upper()}" for name in Settings.model_fields}, rows
    for name, field in Settings.model_fields.items():
        variable = f"QWEN_ADAPTER_{name.upper()}"
        row = re.search(rf"^\| `{variable}` \| `?([^|`]*)`? \|", readme, re.M)
        assert row, f"no README row for {variable}"
        documented = row[1]
        if field.default is None:
            assert documented == "unset", (variable, documented)
        elif isinstance(field.default, str):
            assert documented == field.default, (variable, documented)
        elif isinstance(field.default, (int, float)):
            assert float(documented) == field.default, (variable, documented)
        else:
            assert json.loads(documented) == field.default, (variable, documented)
