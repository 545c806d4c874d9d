"""Command line of a predictor: KServe's ModelServer flags plus the model's own.

Every flag of ours also reads an environment variable (the flag wins), so the same image
is configured by ``args`` in a container spec or by ``env`` in a Helm chart.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kserve import ModelServer
from kserve import model_server as kserve_server

from predictors.contract import Limits
from predictors.loading import ModelLocationError
from predictors.model import PredictorOptions, QwenImageModel

logger = logging.getLogger(__name__)


def _env_default(name: str, default: object) -> object:
    return os.environ.get(name, default)


def build_parser(model_class: type[QwenImageModel]) -> argparse.ArgumentParser:
    """KServe's server flags, with this model's name, location and limits added."""
    limits = Limits()
    parser = argparse.ArgumentParser(
        description=f"KServe predictor serving {model_class.pipeline_class.__name__}.",
        parents=[kserve_server.parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.set_defaults(model_name=model_class.default_name)
    parser.add_argument(
        f"--{model_class.location_env.lower()}",
        dest="location",
        default=os.environ.get(model_class.location_env) or None,
        help=f"Local pipeline directory or Hugging Face repo id (env {model_class.location_env}); "
        "unset serves a tiny random-weight pipeline.",
    )
    options = (
        ("--device", "QWEN_DEVICE", str, "auto", "auto, cpu, cuda or cuda:N"),
        ("--dtype", "QWEN_DTYPE", str, "auto", "auto (bf16 on CUDA, fp32 on CPU), bfloat16, ..."),
        ("--max_queue_size", "QWEN_MAX_QUEUE_SIZE", int, 4, "requests waiting for the GPU"),
        ("--min_size", "QWEN_MIN_SIZE", int, limits.min_size, "smallest width/height"),
        ("--max_size", "QWEN_MAX_SIZE", int, limits.max_size, "largest width/height"),
        ("--max_steps", "QWEN_MAX_STEPS", int, limits.max_steps, "most inference steps"),
        ("--max_images", "QWEN_MAX_IMAGES", int, limits.max_images, "most images per request"),
        (
            "--max_input_pixels",
            "QWEN_MAX_INPUT_PIXELS",
            int,
            limits.max_input_pixels,
            "largest input image (pixels)",
        ),
        ("--tiny_cache_dir", "QWEN_TINY_CACHE_DIR", Path, None, "where tiny pipelines are saved"),
    )
    for flag, env, kind, default, help_text in options:
        parser.add_argument(
            flag, type=kind, default=_env_default(env, default), help=f"{help_text} (env {env})"
        )
    return parser


def options_from_args(args: argparse.Namespace) -> PredictorOptions:
    """The predictor options named by parsed flags."""
    return PredictorOptions(
        location=args.location,
        device=args.device,
        dtype=args.dtype,
        max_queue_size=int(args.max_queue_size),
        limits=Limits(
            min_size=int(args.min_size),
            max_size=int(args.max_size),
            max_steps=int(args.max_steps),
            max_images=int(args.max_images),
            max_input_pixels=int(args.max_input_pixels),
        ),
        tiny_cache_dir=Path(args.tiny_cache_dir) if args.tiny_cache_dir else None,
    )


def serve(model_class: type[QwenImageModel], argv: Sequence[str] | None = None) -> None:
    """Parse flags, load the model and serve it until SIGINT/SIGTERM.

    A location that cannot be loaded ends the process with a one-line error and exit code 2.
    """
    args = build_parser(model_class).parse_args(argv)
    if args.configure_logging:
        logging.basicConfig(
            level=args.log_level if hasattr(args, "log_level") else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    model = model_class(args.model_name, options_from_args(args))
    try:
        model.load()
    except ModelLocationError as exc:
        logger.error("%s", exc)
        sys.exit(2)
    ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        enable_grpc=args.enable_grpc,
        workers=1,
    ).start([model])
