"""Tiny Qwen-Image pipelines with random weights, built offline.

They have the real pipelines' classes and shapes in miniature (a 2-layer transformer, a VAE
with the real 8x scale factor, a 2-layer Qwen2.5-VL text encoder, a byte-level tokenizer with
the Qwen special tokens), so the whole stack runs on a laptop without the Hugging Face Hub.
Each is saved once with ``save_pretrained`` (a few MB) and loaded back through the same
``from_pretrained`` path as real weights. Their images are noise: they exercise the serving
path, not the model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    AutoImageProcessor,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLProcessor,
)

logger = logging.getLogger(__name__)

# ``edit-plus`` is the pipeline of Qwen-Image-Edit-2509 and later (several input images).
TinyKind = Literal["generation", "edit", "edit-plus"]

# Bump when the recipe changes, so cached pipelines of an older recipe are rebuilt.
RECIPE_VERSION = 2
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "qwen-image-serve"

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
TEXT_HIDDEN_SIZE = 16
LATENT_CHANNELS = 4

# The scheduler configuration of Qwen/Qwen-Image, so timesteps match the real model's.
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}

# The edit pipeline resizes its condition image to ~1024x1024 before the processor; these
# bounds keep the tiny vision tower's token count small.
TINY_IMAGE_PROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "min_pixels": 56 * 56,
    "max_pixels": 112 * 112,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video sub-processor.

    transformers 5 requires every declared sub-processor, and the video one needs
    torchvision, which the CPU torch wheel cannot load beside it. The Qwen-Image pipelines
    never pass videos. ``from_pretrained`` finds this class because the loader imports this
    module first (diffusers records its full module path in ``model_index.json``).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the 256 byte values."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [256 + i for i in range(256 - len(printable))]
    return sorted(chr(c) for c in printable + extra)


def build_tokenizer(directory: Path, words_from: Sequence[str] = ()) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer with Qwen's special tokens and pre-tokenizer. Without
    ``words_from`` it has no merges: about a token per byte. With texts, it has BPE merges
    learnt from them, which make each of their words (and spaces, punctuation) one token, as
    Qwen's own tokenizer does with common words: those texts come out about as long as Qwen
    makes them."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(directory, _byte_level_alphabet(), [])
    tokenizer = Qwen2Tokenizer.from_pretrained(directory)
    if not words_from:
        return tokenizer
    symbols, merges = _learn_merges(tokenizer.backend_tokenizer.pre_tokenizer, words_from)
    _write_tokenizer(directory, symbols, merges)
    return Qwen2Tokenizer.from_pretrained(directory)


def _learn_merges(pre_tokenizer, texts: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The byte-level alphabet plus every token BPE learns from ``texts`` (to one token per
    pre-tokenized word), and its merges in rank order."""
    learner = Tokenizer(BPE())
    learner.pre_tokenizer = pre_tokenizer
    learner.train_from_iterator(
        texts,
        BpeTrainer(
            vocab_size=1_000_000,  # merge until no pair repeats: whole words
            initial_alphabet=_byte_level_alphabet(),
            special_tokens=list(SPECIAL_TOKENS),  # kept whole, added at the end as always
            show_progress=False,
        ),
    )
    merges = [tuple(pair) for pair in json.loads(learner.to_str())["model"]["merges"]]
    symbols = _byte_level_alphabet()
    known = set(symbols)
    for left, right in merges:
        if left + right not in known:
            symbols.append(left + right)
            known.add(left + right)
    return symbols, merges


def _write_tokenizer(directory: Path, symbols: list[str], merges: list[tuple[str, str]]) -> None:
    """vocab.json (``symbols``, then the special tokens), merges.txt, tokenizer_config.json."""
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = "".join(f"{left} {right}\n" for left, right in merges)
    (directory / "merges.txt").write_text("#version: 0.2\n" + lines)
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(vocab[token]): {"content": token, "special": True, **special}
            for token in SPECIAL_TOKENS
        },
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "bos_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def build_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """A 2-layer Qwen2.5-VL whose vision tower outputs the text width."""
    token_id = tokenizer.convert_tokens_to_ids
    eos = token_id("<|endoftext|>")
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN_SIZE,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # head_dim 8 -> rotary half-dim 4 = sum of the mrope sections
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "bos_token_id": None,
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN_SIZE,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        vocab_size=len(tokenizer),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_transformer() -> QwenImageTransformer2DModel:
    """A 2-layer, 2-head transformer reading the tiny text encoder's width."""
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=LATENT_CHANNELS * 4,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN_SIZE,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )


def build_vae() -> AutoencoderKLQwenImage:
    """A narrow VAE with the real model's 8x spatial scale factor."""
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        # The real VAE's statistics of its first channels (diffusers' defaults), not 0 and 1:
        # the engine's normalising of latents must show in the tiny pipelines' images.
        latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075],
        latents_std=[2.8184, 1.4541, 2.3275, 2.6558],
    )


def build_processor(tokenizer: Qwen2Tokenizer, scratch: Path) -> ImageOnlyQwen2VLProcessor:
    """The edit pipeline's image+text processor, without video support."""
    config_dir = scratch / "image_processor"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "preprocessor_config.json").write_text(json.dumps(TINY_IMAGE_PROCESSOR_CONFIG))
    image_processor = AutoImageProcessor.from_pretrained(config_dir)
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_pipeline(
    kind: TinyKind, scratch: Path, words_from: Sequence[str] = ()
) -> QwenImagePipeline | QwenImageEditPipeline | QwenImageEditPlusPipeline:
    """A complete tiny pipeline of ``kind`` with seeded random weights (``words_from``: see
    ``build_tokenizer``)."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(scratch / "tokenizer", words_from)
    components = {
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        "vae": build_vae(),
        "text_encoder": build_text_encoder(tokenizer),
        "tokenizer": tokenizer,
        "transformer": build_transformer(),
    }
    if kind == "generation":
        return QwenImagePipeline(**components)
    edit_class = QwenImageEditPlusPipeline if kind == "edit-plus" else QwenImageEditPipeline
    return edit_class(processor=build_processor(tokenizer, scratch), **components)


def tiny_pipeline_dir(kind: TinyKind, cache_dir: Path | None = None) -> Path:
    """The directory of the saved tiny pipeline of ``kind``, built on first use.

    The build happens in a scratch directory beside the target and is renamed into place,
    so processes that start together never see a half-written pipeline.
    """
    cache_dir = Path(cache_dir or os.environ.get("QWEN_TINY_CACHE_DIR") or DEFAULT_CACHE_DIR)
    target = cache_dir / f"tiny-qwen-image-{kind}-v{RECIPE_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("Building the tiny %s pipeline (random weights) in %s", kind, target)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    try:
        build_tiny_pipeline(kind, scratch / "parts").save_pretrained(scratch / "pipeline")
        try:
            os.rename(scratch / "pipeline", target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise  # not a lost race with another process: a real failure
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
