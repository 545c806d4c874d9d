"""The offline tiny pipelines: built once, loaded through the real from_pretrained path."""

from __future__ import annotations

import json

import torch
from diffusers import QwenImageEditPipeline, QwenImagePipeline

from predictors.loading import load_pipeline, resolve_location
from predictors.tiny import tiny_pipeline_dir


def test_tiny_pipelines_are_built_once_and_reused(tmp_path):
    first = tiny_pipeline_dir("generation", tmp_path)
    stamp = (first / "model_index.json").stat().st_mtime_ns
    assert tiny_pipeline_dir("generation", tmp_path) == first
    assert (first / "model_index.json").stat().st_mtime_ns == stamp
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    assert size < 20 * 1024 * 1024
    assert [p.name for p in tmp_path.iterdir()] == [first.name], "no scratch left behind"


def test_unset_location_loads_the_tiny_edit_pipeline_like_real_weights(tmp_path):
    location = resolve_location(None, "edit", tmp_path)
    index = json.loads((tmp_path / location / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline"
    assert index["processor"] == ["predictors.tiny", "ImageOnlyQwen2VLProcessor"]
    pipeline = load_pipeline(QwenImageEditPipeline, location, torch.device("cpu"), torch.float32)
    assert pipeline.transformer.dtype == torch.float32


def test_tiny_generation_pipeline_runs(tmp_path):
    location = resolve_location(None, "generation", tmp_path)
    pipeline = load_pipeline(QwenImagePipeline, location, torch.device("cpu"), torch.float32)
    image = pipeline(
        prompt="a cat",
        width=64,
        height=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 32)
