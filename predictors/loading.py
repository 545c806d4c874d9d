"""Where a pipeline comes from and where it runs: location, device and dtype."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from predictors.tiny import TinyKind, tiny_pipeline_dir

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelLocationError(RuntimeError):
    """The model location cannot be loaded; the message says why and what to give instead."""


class PlacementError(RuntimeError):
    """The device or dtype asked for cannot be used here; the message says what can."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when it is available, else the CPU; ``cpu``, ``cuda`` and
    ``cuda:N`` must name a device this machine has."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise PlacementError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise PlacementError(
                f"device {device!r} is not available: this machine has {count} CUDA device(s)"
            )
    elif resolved.type != "cpu":
        raise PlacementError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA (the weights' dtype) and float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise PlacementError(f"unknown dtype {dtype!r}: use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_location(location: str | None, tiny_kind: TinyKind, tiny_cache_dir: Path | None) -> str:
    """A loadable ``from_pretrained`` argument for ``location``.

    Unset means the tiny random-weight pipeline (built once, then cached). A path that exists
    must be a diffusers pipeline directory; otherwise the value must look like a Hugging Face
    repo id (``Qwen/Qwen-Image``).
    """
    if not location:
        path = tiny_pipeline_dir(tiny_kind, tiny_cache_dir)
        logger.warning(
            "No model location set: serving the TINY random-weight %s pipeline from %s. "
            "Its images are noise; set the location to serve the real model.",
            tiny_kind,
            path,
        )
        return str(path)
    path = Path(location).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLocationError(
                f"{path} is not a diffusers pipeline directory: it has no model_index.json"
            )
        return str(path)
    if location.startswith((".", "/", "~")) or not _REPO_ID.fullmatch(location):
        raise ModelLocationError(
            f"model location {location!r} does not exist: give a local pipeline directory "
            "or a Hugging Face repo id such as Qwen/Qwen-Image"
        )
    return location


def served_pipeline_class(
    location: str, served: Sequence[type[DiffusionPipeline]]
) -> type[DiffusionPipeline]:
    """The class of ``served`` that a resolved location's ``model_index.json`` names.

    The file is what ``from_pretrained`` reads first (for a repo id, fetched alone here,
    through the Hub cache that ``from_pretrained`` then uses). A pipeline of another class is
    refused: its components would load into the wrong pipeline, or not at all.
    """
    try:
        index = Path(location) / "model_index.json"
        if not index.is_file():
            index = Path(hf_hub_download(location, "model_index.json"))
        contents = json.loads(index.read_text())
    except (OSError, EntryNotFoundError, ValueError) as exc:
        raise ModelLocationError(f"cannot read {location!r}/model_index.json: {exc}") from exc
    class_name = contents.get("_class_name") if isinstance(contents, dict) else None
    for pipeline_class in served:
        if pipeline_class.__name__ == class_name:
            return pipeline_class
    names = " or ".join(pipeline_class.__name__ for pipeline_class in served)
    raise ModelLocationError(
        f"{location!r} holds a {class_name or 'pipeline of no class'}; this predictor serves "
        f"a {names}"
    )


def load_pipeline(
    pipeline_class: type[DiffusionPipeline],
    location: str,
    device: torch.device,
    dtype: torch.dtype,
) -> DiffusionPipeline:
    """Load ``pipeline_class`` from a resolved location onto ``device`` in ``dtype``."""
    logger.info("Loading %s from %s on %s in %s", pipeline_class.__name__, location, device, dtype)
    try:
        pipeline = pipeline_class.from_pretrained(location, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLocationError(
            f"cannot load {pipeline_class.__name__} from {location!r}: {exc}"
        ) from exc
    try:
        pipeline.to(device)
    except torch.OutOfMemoryError as exc:
        raise PlacementError(
            f"{pipeline_class.__name__} from {location!r} does not fit in {device}'s memory in "
            f"{dtype}: {exc}"
        ) from exc
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
