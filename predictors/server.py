"""Command line of a predictor: KServe's ModelServer flags plus the model's own.

Every flag of ours also reads an environment variable (the flag wins), so the same image
is configured by ``args`` in a container spec or by ``env`` in a Helm chart.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType

from fastapi.exceptions import RequestValidationError
from kserve import ModelServer
from kserve import model_server as kserve_server
from kserve.errors import InvalidInput, ServerNotReady, generic_exception_handler
from kserve.logging import KSERVE_LOGGER_NAME, KSERVE_TRACE_LOGGER_NAME
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from predictors import acceleration
from predictors.acceleration import Acceleration, AccelerationError
from predictors.asgi import HttpMiddleware, UnexpectedErrorAnswer
from predictors.contract import BINARY_HEADER_LENGTH, SIZE_MULTIPLE, Limits, describe_invalid_body
from predictors.denoise import AttentionBackends
from predictors.disconnect import CancelOnDisconnect
from predictors.engine import BatchPolicy
from predictors.loading import ModelLocationError, PlacementError
from predictors.model import PredictorOptions, QwenImageModel, loggable
from predictors.streaming import add_stream_route

logger = logging.getLogger(__name__)

# Once the servers are done, how long the process waits for the worker thread to end: at most
# the rest of a batch whose requests all failed or left, which stops at its next step. A
# thread still in torch when the interpreter exits aborts the process.
WORKER_EXIT_SECONDS = 60


def _env_default(name: str, default: object) -> object:
    return os.environ.get(name, default)


def parse_sizes(value: str) -> tuple[tuple[int, int], ...] | None:
    """``auto`` (None: the predictor's default size), ``none``, or ``WxH[,WxH...]``."""
    if value == "auto":
        return None
    if value == "none":
        return ()
    try:
        sizes = tuple(
            (int(width), int(height))
            for width, height in (size.lower().split("x") for size in value.split(","))
        )
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid sizes {value!r}: use auto, none or WxH[,WxH...] such as 1328x1328"
        ) from None
    if any(side <= 0 or side % SIZE_MULTIPLE for size in sizes for side in size):
        raise argparse.ArgumentTypeError(
            f"invalid sizes {value!r}: widths and heights are positive multiples of {SIZE_MULTIPLE}"
        )
    return sizes


def parse_default_size(value: str) -> tuple[int, int] | None:
    """``auto`` (None: the model's own default size) or one ``WxH``."""
    sizes = None if value == "auto" else parse_sizes(value)
    if sizes is not None and len(sizes) != 1:
        raise argparse.ArgumentTypeError(
            f"invalid size {value!r}: use auto or WxH such as 1024x1024"
        )
    return sizes[0] if sizes else None


def non_negative_int(value: str) -> int:
    """An int of 0 or more (argparse type)."""
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {number}")
    return number


def check_request_defaults(model_class: type[QwenImageModel], options: PredictorOptions) -> None:
    """Refuse limits that refuse the model's request defaults (``ValueError``): every request
    that leaves the field out would get a 400 that blames its client."""
    if options.default_size is not None and model_class.defaults.width is None:
        raise ValueError(
            f"--default_size is for text-to-image: {model_class.default_name}'s output size "
            "follows its input image"
        )
    defaults = model_class.request_defaults(options)
    limits = options.limits
    sides = [side for side in (defaults.width, defaults.height) if side is not None]
    if sides and not limits.min_size <= min(sides) <= max(sides) <= limits.max_size:
        raise ValueError(
            f"{model_class.default_name}'s default size, {defaults.width}x{defaults.height}, "
            f"is outside --min_size {limits.min_size} .. --max_size {limits.max_size}, so "
            "every request that names no size would be refused: widen the limits, or set "
            "--default_size within them"
        )
    steps = defaults.num_inference_steps
    if not limits.min_steps <= steps <= limits.max_steps:
        source = (
            f"--lora_steps ({steps})"
            if options.acceleration.lora
            else f"{model_class.default_name}'s default steps ({steps})"
        )
        raise ValueError(
            f"{source} is outside {limits.min_steps} .. --max_steps {limits.max_steps}, so "
            "every request that names no steps would be refused"
        )


def build_parser(model_class: type[QwenImageModel]) -> argparse.ArgumentParser:
    """KServe's server flags, with this model's name, location and limits added."""
    limits = Limits()
    parser = argparse.ArgumentParser(
        description="KServe predictor serving a "
        + " or ".join(pipeline_class.__name__ for pipeline_class in model_class.pipeline_classes)
        + ".",
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
        (
            "--max_queue_size",
            "QWEN_MAX_QUEUE_SIZE",
            non_negative_int,
            4,
            "requests that may wait beyond a full batch: at most max_batch_size + this are "
            "accepted and unfinished, then 503",
        ),
        (
            "--shutdown_grace_seconds",
            "QWEN_SHUTDOWN_GRACE_SECONDS",
            non_negative_int,
            600,
            "on SIGTERM or SIGINT, how long the shutdown takes: accepted requests (running "
            "and queued) may finish until its last second, when those still unfinished get a "
            "503",
        ),
        (
            "--default_size",
            "QWEN_DEFAULT_SIZE",
            parse_default_size,
            "auto",
            "text-to-image: the size of a request that names none, WxH (auto: the original "
            "service's 1664x928); an edit's follows its input image",
        ),
        ("--min_size", "QWEN_MIN_SIZE", int, limits.min_size, "smallest width/height"),
        ("--max_size", "QWEN_MAX_SIZE", int, limits.max_size, "largest width/height"),
        ("--max_steps", "QWEN_MAX_STEPS", int, limits.max_steps, "most inference steps"),
        ("--max_images", "QWEN_MAX_IMAGES", int, limits.max_images, "most images per request"),
        (
            "--max_input_images",
            "QWEN_MAX_INPUT_IMAGES",
            int,
            limits.max_input_images,
            "most input images per edit (more than one needs Qwen-Image-Edit-2509 or later)",
        ),
        (
            "--max_input_pixels",
            "QWEN_MAX_INPUT_PIXELS",
            int,
            limits.max_input_pixels,
            "largest input image (pixels)",
        ),
        ("--tiny_cache_dir", "QWEN_TINY_CACHE_DIR", Path, None, "where tiny pipelines are saved"),
        # Cross-request batching (docs/performance.md).
        (
            "--max_batch_size",
            "QWEN_MAX_BATCH_SIZE",
            int,
            1,
            "most images run together across requests of the same size, steps and CFG "
            "(1: no cross-request batching)",
        ),
        (
            "--batch_wait_ms",
            "QWEN_BATCH_WAIT_MS",
            float,
            50.0,
            "how long the oldest request waits for others to join its batch",
        ),
        # Speed modes, applied at load time (docs/performance.md).
        (
            "--attention_backend",
            "QWEN_ATTENTION_BACKEND",
            str,
            "native",
            "diffusers attention backend for batches without padding: "
            + ", ".join(acceleration.MASK_FREE_BACKENDS),
        ),
        (
            "--masked_attention_backend",
            "QWEN_MASKED_ATTENTION_BACKEND",
            str,
            "native",
            "attention backend for batches whose prompts need a padding mask: "
            + ", ".join(acceleration.MASK_CAPABLE_BACKENDS),
        ),
        (
            "--text_padding",
            "QWEN_TEXT_PADDING",
            str,
            "split",
            "texts of different lengths in one batch: split (attend each length on its own, "
            "no mask) or mask (diffusers' padding mask and --masked_attention_backend)",
        ),
        ("--compile", "QWEN_COMPILE", str, "auto", "regional torch.compile: off, on, auto (CUDA)"),
        (
            "--cuda_graphs",
            "QWEN_CUDA_GRAPHS",
            str,
            "off",
            "replay the compiled blocks as CUDA graphs: off, or on (experimental: needs "
            "compilation on a GPU; no gain measured on an H100)",
        ),
        (
            "--max_autotune",
            "QWEN_MAX_AUTOTUNE",
            str,
            "off",
            "autotune the compiled blocks' kernels at load: off, or on (experimental: needs "
            "compilation; on an H100 it saved nothing at 1328x1328 and compiled 3x as long)",
        ),
        (
            "--warmup_sizes",
            "QWEN_WARMUP_SIZES",
            parse_sizes,
            "auto",
            "sizes compiled at load: auto (the default size), none, or WxH[,WxH...]",
        ),
        ("--quantization", "QWEN_QUANTIZATION", str, "none", "none, or fp8 (torchao, GPU)"),
        ("--cache", "QWEN_CACHE", str, "none", "step cache: none or first_block"),
        ("--cache_threshold", "QWEN_CACHE_THRESHOLD", float, 0.05, "first_block threshold"),
        (
            "--lora",
            "QWEN_LORA",
            str,
            None,
            "step-distilled LoRA (file, directory or Hub repo), fused at load; requests "
            "default to its steps and no CFG",
        ),
        ("--lora_weight_name", "QWEN_LORA_WEIGHT_NAME", str, None, "file name in --lora"),
        ("--lora_steps", "QWEN_LORA_STEPS", int, 8, "default steps with --lora"),
    )
    choices = {
        "--text_padding": acceleration.TEXT_PADDINGS,
        "--compile": acceleration.COMPILE_CHOICES,
        "--cuda_graphs": acceleration.SWITCH_CHOICES,
        "--max_autotune": acceleration.SWITCH_CHOICES,
        "--quantization": acceleration.QUANTIZATIONS,
        "--cache": tuple(acceleration.CACHES),
    }
    for flag, env, kind, default, help_text in options:
        parser.add_argument(
            flag,
            type=kind,
            default=_env_default(env, default),
            choices=choices.get(flag),
            help=f"{help_text} (env {env})",
        )
    return parser


def options_from_args(args: argparse.Namespace) -> PredictorOptions:
    """The predictor options named by parsed flags (``ValueError`` for values out of range)."""
    if args.workers != 1:
        raise ValueError(
            f"--workers must be 1, not {args.workers}: one process holds the pipeline on its "
            "device; serve more requests with more replicas"
        )
    return PredictorOptions(
        location=args.location,
        device=args.device,
        dtype=args.dtype,
        max_queue_size=int(args.max_queue_size),
        shutdown_grace_seconds=int(args.shutdown_grace_seconds),
        default_size=args.default_size,
        limits=Limits(
            min_size=int(args.min_size),
            max_size=int(args.max_size),
            max_steps=int(args.max_steps),
            max_images=int(args.max_images),
            max_input_images=int(args.max_input_images),
            max_input_pixels=int(args.max_input_pixels),
        ),
        tiny_cache_dir=Path(args.tiny_cache_dir) if args.tiny_cache_dir else None,
        batching=BatchPolicy(
            max_batch_size=int(args.max_batch_size), batch_wait_ms=float(args.batch_wait_ms)
        ),
        acceleration=Acceleration(
            attention=AttentionBackends(
                masked=args.masked_attention_backend, unmasked=args.attention_backend
            ),
            text_padding=args.text_padding,
            compile=args.compile,
            cuda_graphs=args.cuda_graphs,
            max_autotune=args.max_autotune,
            warmup_sizes=args.warmup_sizes,
            quantization=args.quantization,
            cache=args.cache,
            cache_threshold=float(args.cache_threshold),
            lora=args.lora or None,
            lora_weight_name=args.lora_weight_name or None,
            lora_steps=int(args.lora_steps),
        ),
    )


class QuietRefusals(logging.Filter):
    """Drops KServe's error record, traceback included, of a request refused as expected:
    invalid input (400), or a busy or stopping server (503). The model logs one line for
    each (``QwenImageModel.log_refusal``); under a load that sheds requests, tracebacks
    would flood the log and the alerts on its errors. Real failures keep theirs."""

    REFUSALS = (InvalidInput, ServerNotReady)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, self.REFUSALS)


class EscapedLineBreaks(logging.Filter):
    """Escapes the line breaks of a record's message (``\\n``), and of the messages of the
    error it logs with its traceback: KServe's records and errors name the request's path,
    percent-decoded, so that a path with ``%0A`` would forge log lines. The traceback's own
    lines stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = loggable(message)
        if escaped != message:
            record.msg, record.args = escaped, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = _traceback_with_escaped_messages(record.exc_info)
        return True


def _traceback_with_escaped_messages(
    exc_info: tuple[type[BaseException], BaseException, TracebackType | None]
    | tuple[None, None, None],
) -> str | None:
    """The traceback as logging writes it, with the line breaks of its errors' messages
    escaped; None (logging's own) where they have none."""
    messages: list[str] = []
    error = exc_info[1]
    while error is not None and len(messages) < 100:  # a chain of causes, or of contexts
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    breaking = [message for message in messages if loggable(message) != message]
    if not breaking:
        return None
    text = logging.Formatter().formatException(exc_info)
    for message in breaking:
        text = text.replace(message, loggable(message))
    return text


class AnswerUnexpectedErrors(UnexpectedErrorAnswer):
    """Answers an unexpected error of the app (a failed inference) with KServe's own 500,
    which logs it once. Starlette's outermost middleware would answer it the same, then
    raise it again: uvicorn logged it a second time and closed the connection, and the
    adapter's next call on that pooled connection could fail."""

    async def answer(self, request: Request, exc: Exception) -> Response:
        return await generic_exception_handler(request, exc)


class RefuseBinaryInputs(HttpMiddleware):
    """A 400 for a REST request whose inputs come as binary data (KServe's binary tensor
    extension, announced by the ``inference-header-content-length`` header). KServe's REST
    server reads binary BYTES inputs as UTF-8 text, so an image file failed with a 500 whose
    message, and log, repeated the whole file. ASGI middleware."""

    MESSAGE = (
        "This server takes no REST inputs as binary data (the "
        f"{BINARY_HEADER_LENGTH} header): send them in the JSON body, image files as "
        "base64, or raw over gRPC"
    )

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        binary = BINARY_HEADER_LENGTH.encode()  # ASGI gives header names in lower case
        if any(name == binary for name, _ in scope["headers"]):
            logger.info(
                "Refused a request to %s: its inputs came as binary data", loggable(scope["path"])
            )
            await JSONResponse({"error": self.MESSAGE}, status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def invalid_body_handler(
    model: QwenImageModel,
) -> Callable[[Request, RequestValidationError], Awaitable[JSONResponse]]:
    """The handler of a body KServe's v2 request model refuses (a parameter that is null, a
    list or an object, say): a 400 in KServe's error shape, where FastAPI would answer 422,
    counted and logged by ``model`` as any invalid request."""

    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = describe_invalid_body(exc.errors())
        body_id = exc.body.get("id") if isinstance(exc.body, dict) else None
        model.refuse_body(body_id, request.headers, message)
        return JSONResponse({"error": message}, status_code=400)

    return invalid_body


class PredictorServer(ModelServer):
    """KServe's ModelServer, whose shutdown starts for both protocols at SIGTERM or SIGINT.

    With one worker, KServe leaves the signals to uvicorn while it serves: uvicorn stops
    listening and drains REST, and only then raises the signal again for KServe's ``stop``,
    which stops gRPC and the models. gRPC would meanwhile take new calls for as long as REST
    drains. Here the signal also starts, at once, the models' shutdown (no new work; the grace
    period runs) and gRPC's (no new calls; those in flight get the grace period).
    """

    shutting_down = False

    def register_signal_handler(self) -> None:
        super().register_signal_handler()
        rest = self._rest_server._server  # uvicorn's: its handler takes the signals as it serves
        drain_rest = rest.handle_exit

        def handle_exit(sig: int, frame: FrameType | None) -> None:
            drain_rest(sig, frame)
            asyncio.get_running_loop().call_soon_threadsafe(self.begin_shutdown)

        rest.handle_exit = handle_exit

    def begin_shutdown(self) -> None:
        """Stop the models (``QwenImageModel.stop``) and gRPC; KServe's ``stop`` repeats
        both once REST has drained, to no effect."""
        if self.shutting_down:
            return
        self.shutting_down = True
        for model in self.registered_models.get_models().values():
            model.stop()
        if self._grpc_server is not None:
            # Held: the event loop keeps only weak references to its tasks.
            self._grpc_stopping = asyncio.create_task(self._grpc_server.stop())


def serve(model_class: type[QwenImageModel], argv: Sequence[str] | None = None) -> None:
    """Parse flags, load the model and serve it until SIGINT/SIGTERM, after which the
    servers take no new requests and close within ``--shutdown_grace_seconds``, the accepted
    requests finished or, those that could not, failed with a 503 (``QwenImageModel.stop``).

    A setting out of range (or limits that refuse the request defaults), a location that
    cannot be loaded, a device or dtype this machine lacks, weights that do not fit in the
    device's memory, or a speed mode that cannot be applied, ends the process with a
    one-line error and exit code 2.
    """
    parser = build_parser(model_class)
    args = parser.parse_args(argv)
    try:
        # Out-of-range values, and values from the environment, which argparse does not check.
        options = options_from_args(args)
        check_request_defaults(model_class, options)
    except ValueError as exc:
        parser.error(str(exc))
    if args.configure_logging:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        model = model_class(args.model_name, options)
        model.load()
    except (ModelLocationError, PlacementError, AccelerationError) as exc:
        logger.error("%s", exc)
        sys.exit(2)
    # KServe's REST app, which its ModelServer serves: a client's disconnect cancels the
    # handler, and with it a request waiting in the queue.
    kserve_server.app.add_middleware(CancelOnDisconnect)
    kserve_server.app.add_middleware(AnswerUnexpectedErrors)
    kserve_server.app.add_middleware(RefuseBinaryInputs)
    kserve_server.app.add_exception_handler(RequestValidationError, invalid_body_handler(model))
    add_stream_route(kserve_server.app, model)
    logging.getLogger(KSERVE_LOGGER_NAME).addFilter(QuietRefusals())
    for name in (KSERVE_LOGGER_NAME, KSERVE_TRACE_LOGGER_NAME):
        logging.getLogger(name).addFilter(EscapedLineBreaks())
    PredictorServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        enable_grpc=args.enable_grpc,
        workers=1,
        grace_period=options.shutdown_grace_seconds,
    ).start([model])
    model.stop()  # done already, unless the servers ended on their own
    if not model.runner.join(WORKER_EXIT_SECONDS):
        logger.error(
            "The pipeline worker was still running %d s after the servers stopped",
            WORKER_EXIT_SECONDS,
        )
