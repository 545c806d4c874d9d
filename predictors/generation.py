"""The text-to-image predictor: ``QwenImagePipeline`` behind KServe v2."""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import QwenImagePipeline

from predictors.contract import GENERATION_DEFAULTS, GENERATION_MODEL_NAME
from predictors.model import QwenImageModel
from predictors.server import serve


class QwenImageGenerationModel(QwenImageModel):
    """Generates images from a prompt."""

    pipeline_classes = (QwenImagePipeline,)
    tiny_kind = "generation"
    defaults = GENERATION_DEFAULTS
    default_name = GENERATION_MODEL_NAME
    location_env = "QWEN_IMAGE_LOCATION"


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``qwen-image-predictor``."""
    serve(QwenImageGenerationModel, argv)


if __name__ == "__main__":
    main()
