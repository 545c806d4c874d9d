"""The offline tiny pipelines: built once, loaded through the real from_pretrained path."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

from predictors.edit import QwenImageEditModel
from predictors.generation import QwenImageGenerationModel
from predictors.loading import (
    ModelLocationError,
    PlacementError,
    load_pipeline,
    resolve_location,
    served_pipeline_class,
)
from predictors.tiny import build_tokenizer, tiny_pipeline_dir


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


def test_each_predictor_loads_the_pipeline_class_its_location_names(tmp_path):
    """The edit predictor serves Qwen-Image-Edit's pipeline and that of 2509 and later, as
    their model_index.json says; a pipeline that a predictor does not serve is refused."""
    edit_classes = QwenImageEditModel.pipeline_classes
    for kind, expected in (
        ("edit", QwenImageEditPipeline),
        ("edit-plus", QwenImageEditPlusPipeline),
    ):
        assert (
            served_pipeline_class(resolve_location(None, kind, tmp_path), edit_classes) is expected
        )
    generation = resolve_location(None, "generation", tmp_path)
    assert (
        served_pipeline_class(generation, QwenImageGenerationModel.pipeline_classes)
        is QwenImagePipeline
    )
    with pytest.raises(ModelLocationError) as refused:
        served_pipeline_class(generation, edit_classes)
    assert str(refused.value) == (
        f"{generation!r} holds a QwenImagePipeline; this predictor serves a "
        "QwenImageEditPipeline or QwenImageEditPlusPipeline"
    )


@pytest.mark.parametrize("location", ["Qwen/Qwen-Image", "org.name/model_v1.5"])
def test_a_repo_id_is_taken_as_it_is(location, tmp_path):
    assert resolve_location(location, "generation", tmp_path) == location


@pytest.mark.parametrize(
    "location", ["Qwen/Qwen-Image\n", "Qwen/Qwen/Image", "./Qwen/Qwen-Image", "Qwen", "/no/such"]
)
def test_a_location_that_is_neither_a_directory_nor_a_repo_id_is_refused(location, tmp_path):
    with pytest.raises(ModelLocationError, match="give a local pipeline directory or a Hugging"):
        resolve_location(location, "generation", tmp_path)


def test_a_model_index_that_is_not_an_object_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text("[]")
    with pytest.raises(ModelLocationError, match="holds a pipeline of no class"):
        served_pipeline_class(str(tmp_path), QwenImageGenerationModel.pipeline_classes)


def test_a_pipeline_too_large_for_the_device_is_a_clear_error(tmp_path, monkeypatch):
    """Out of memory while the weights move to the GPU: the predictor's one-line error and
    exit code 2 (``PlacementError``), not a traceback."""

    def to(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(QwenImagePipeline, "to", to)
    location = resolve_location(None, "generation", tmp_path)
    with pytest.raises(PlacementError) as refused:
        load_pipeline(QwenImagePipeline, location, torch.device("cpu"), torch.float32)
    assert str(refused.value).startswith(
        f"QwenImagePipeline from {location!r} does not fit in cpu's memory in torch.float32: "
        "CUDA out of memory"
    )


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


def test_a_tokenizer_that_learnt_the_words_splits_a_prompt_as_qwen_does(tmp_path):
    """The benchmark's tokenizer learns its prompts' words, so that texts are as long as with
    Qwen's own tokenizer: Qwen-Image drops the first 34 tokens of its template (the system
    text and the user turn's start), and here those are exactly the template's, so the
    transformer sees the prompt's words and the 5 tokens that close the template."""
    empty = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    pipeline = QwenImagePipeline(**empty)
    template, dropped = pipeline.prompt_template_encode, pipeline.prompt_template_encode_start_idx
    prompt = "A red cube, on a wooden table"
    tokenizer = build_tokenizer(tmp_path / "words", words_from=[template.format(prompt)])
    tokens = tokenizer.tokenize(template.format(prompt))
    assert tokens[dropped - 3 : dropped] == ["<|im_start|>", "user", "Ċ"]
    assert tokens[dropped:] == [
        *("A", "Ġred", "Ġcube", ",", "Ġon", "Ġa", "Ġwooden", "Ġtable"),
        *("<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"),
    ]
    ids = tokenizer(template.format(prompt))["input_ids"]
    assert tokenizer.decode(ids) == template.format(prompt)
    # Words it never saw still encode, in pieces; without words learnt, a token per byte.
    unseen = "zebra quilt"
    assert tokenizer.decode(tokenizer(unseen)["input_ids"]) == unseen
    assert len(tokenizer.tokenize(unseen)) > 2
    assert len(build_tokenizer(tmp_path / "bytes").tokenize(prompt)) == len(prompt)
