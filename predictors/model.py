"""The KServe model shared by both predictors: load a pipeline, answer v2 infer calls.

A subclass names the pipeline classes it serves and its defaults, and says how a request
becomes a ``denoise.Job`` (``prepare``); loading with its speed modes, queueing and
cross-request batching, the denoising loop, encoding, metrics and the v2 response are the
same for both and live here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import DiffusionPipeline
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.infer_type import InferInput, deserialize_bytes_tensor, to_http_parameters
from PIL import Image

from predictors import acceleration, contract, denoise
from predictors.acceleration import LIGHTNING, Acceleration
from predictors.contract import ContractError, Defaults, ImageRequest, Limits
from predictors.denoise import Job
from predictors.engine import (
    BatchPolicy,
    PipelineRunner,
    ServerBusy,
    ServerStopping,
    ShutdownTimeout,
)
from predictors.images import encode_image
from predictors.loading import (
    load_pipeline,
    resolve_device,
    resolve_dtype,
    resolve_location,
    served_pipeline_class,
)
from predictors.metrics import IMAGES_GENERATED, REQUEST_LATENCY, REQUESTS_REJECTED
from predictors.tiny import TinyKind

logger = logging.getLogger(__name__)

# The last second of a shutdown's grace period: the requests still unfinished then get their
# 503 before the servers close their connections.
SHUTDOWN_ANSWER_SECONDS = 1


@dataclass(frozen=True)
class PredictorOptions:
    """How one predictor loads and what it accepts (from flags and environment)."""

    location: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_queue_size: int = 4
    # On SIGTERM or SIGINT, the longest the shutdown takes (``stop``).
    shutdown_grace_seconds: float = 600
    # The size of a request that names none, in place of the model's own (text-to-image).
    default_size: tuple[int, int] | None = None
    limits: Limits = field(default_factory=Limits)
    tiny_cache_dir: Path | None = None
    batching: BatchPolicy = field(default_factory=BatchPolicy)
    acceleration: Acceleration = field(default_factory=Acceleration)


class QwenImageModel(Model):
    """A diffusers Qwen-Image pipeline behind the v2 contract of ``predictors.contract``."""

    # The location's model_index.json picks one of these.
    pipeline_classes: ClassVar[tuple[type[DiffusionPipeline], ...]]
    tiny_kind: ClassVar[TinyKind]
    defaults: ClassVar[Defaults]
    default_name: ClassVar[str]
    location_env: ClassVar[str]
    needs_image: ClassVar[bool] = False

    def __init__(self, name: str, options: PredictorOptions):
        super().__init__(name)
        self.options = options
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.pipeline: DiffusionPipeline | None = None
        self.defaults = self.request_defaults(options)
        self.runner = PipelineRunner(name, self.generate, options.max_queue_size, options.batching)

    @classmethod
    def request_defaults(cls, options: PredictorOptions) -> Defaults:
        """What a request that leaves a field out gets: the predictor's defaults, with
        ``--default_size`` if set, and with a step-distilled LoRA its steps (``--lora_steps``)
        and no CFG."""
        defaults = cls.defaults
        if options.default_size is not None:
            width, height = options.default_size
            defaults = replace(defaults, width=width, height=height)
        modes = options.acceleration
        if modes.lora:
            defaults = replace(
                defaults,
                num_inference_steps=modes.lora_steps,
                true_cfg_scale=LIGHTNING.true_cfg_scale,
            )
        return defaults

    def load(self) -> bool:
        """Load the pipeline (tiny when no location is set) and apply the speed modes.

        Raises ``ModelLocationError`` or ``AccelerationError``. With compilation on, the
        blocks are compiled here, by a warm-up at the warm-up sizes (with ``auto``, a failure
        to compile leaves them uncompiled), on the worker thread. KServe calls it again before
        an infer call if the model is not ``healthy``: after a worker failure it raises
        ``WorkerFailed`` (503) instead of loading again.
        """
        if (failure := self.runner.failure) is not None:
            raise failure
        modes = self.options.acceleration
        acceleration.check(modes, self.device)
        acceleration.check_fp8_image_size(modes, self.options.limits.min_size)
        acceleration.check_cache_batching(modes, self.options.batching.max_batch_size)
        location = resolve_location(
            self.options.location, self.tiny_kind, self.options.tiny_cache_dir
        )
        if self.device.type == "cpu":
            # Leave a core to the server's event loop so health checks stay fast.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
        started = time.perf_counter()
        pipeline_class = served_pipeline_class(location, self.pipeline_classes)
        self.pipeline = load_pipeline(pipeline_class, location, self.device, self.dtype)
        acceleration.apply(self.pipeline, modes)
        if modes.compiles(self.device):
            # On the worker thread, where requests run: CUDA graphs are recorded per thread.
            batches = self.warmup_batches()
            self.runner.call(
                lambda: acceleration.compile_by_warming_up(self.pipeline, batches, modes)
            )
        logger.info("Model %s ready in %.1f s", self.name, time.perf_counter() - started)
        self.ready = True
        return self.ready

    def warmup_batches(self) -> list[list[Job]]:
        """``acceleration.warmup_batches`` at ``--warmup_sizes`` (default: the model's
        default size), with the model's default negative prompt and CFG scale."""
        sizes = self.options.acceleration.warmup_sizes
        if sizes is None:
            sizes = ((self.defaults.width or 1024, self.defaults.height or 1024),)
        return acceleration.warmup_batches(
            sizes,
            self.defaults.negative_prompt,
            self.defaults.true_cfg_scale,
            with_image=self.needs_image,
        )

    async def healthy(self) -> bool:
        """Ready, and its worker thread still works (``/v2/models/{name}/ready``)."""
        return self.ready and self.runner.failure is None

    def stop(self) -> None:
        """Take no new requests; those accepted get ``shutdown_grace_seconds`` to finish, but
        for its last second (``SHUTDOWN_ANSWER_SECONDS``), in which those still unfinished get
        a 503. Returns at once: KServe calls it on the event loop, which must go on answering
        (``predictors.server`` calls it as soon as the shutdown starts)."""
        grace = self.options.shutdown_grace_seconds
        self.runner.close(max(0, grace - SHUTDOWN_ANSWER_SECONDS))

    def prepare(self, request: ImageRequest) -> Job:
        """The denoising job of a request (runs off the event loop, before queueing)."""
        return self.job(request, request.width, request.height)

    def job(
        self,
        request: ImageRequest,
        width: int,
        height: int,
        images: tuple[Image.Image, ...] = (),
        mask: Image.Image | None = None,
    ) -> Job:
        """A request as a ``denoise.Job`` of the given output size (and edit images and
        mask)."""
        return Job(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            seeds=tuple(request.seeds),
            width=width,
            height=height,
            num_inference_steps=request.num_inference_steps,
            true_cfg_scale=request.true_cfg_scale,
            images=images,
            mask=mask,
            partial_images=request.partial_images,
        )

    async def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        """Validate, wait for the GPU, generate, encode and answer one infer request."""
        request_id = _request_id(payload.id, headers)
        request, encoded = await self.make_images(payload, request_id)
        return self.respond(payload, request_id, request, encoded)

    async def predict_stream(
        self, payload: InferRequest, headers: dict[str, str] | None = None
    ) -> AsyncIterator[tuple[str, InferResponse]]:
        """``infer_stream``: each image's previews as they are made (``partial_images``),
        then the answer ``predict`` gives; as (event name, response) pairs. What ``predict``
        would raise before its answer is raised here; leaving the iteration early gives the
        request up, as a client that leaves ``predict`` does."""
        request_id = _request_id(payload.id, headers)
        loop = asyncio.get_running_loop()
        # The previews as they come, then the answer once done: the worker thread queues the
        # previews before the job's result, so they always come first.
        arrivals: asyncio.Queue[_Preview | asyncio.Future] = asyncio.Queue()

        def on_partial(preview: _Preview) -> None:  # on the worker thread
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(arrivals.put_nowait, preview)

        answer = asyncio.ensure_future(self.make_images(payload, request_id, on_partial))
        answer.add_done_callback(arrivals.put_nowait)
        sent: set[tuple[int, int]] = set()
        try:
            while isinstance(preview := await arrivals.get(), _Preview):
                # A failed batch's requests run again one by one, and show their previews again.
                if (preview.image_index, preview.partial_image_index) in sent:
                    continue
                sent.add((preview.image_index, preview.partial_image_index))
                yield contract.PARTIAL_IMAGE_EVENT, await self.preview_response(preview, request_id)
            request, encoded = answer.result()
            yield contract.COMPLETED_EVENT, self.respond(payload, request_id, request, encoded)
        finally:
            answer.cancel()

    async def make_images(
        self,
        payload: InferRequest,
        request_id: str,
        on_partial: Callable[[_Preview], None] | None = None,
    ) -> tuple[ImageRequest, list[bytes]]:
        """The request and its encoded images: validated, queued, generated and encoded, with
        its metrics and log line. ``on_partial`` receives its previews on the worker thread."""
        if not self.ready:
            raise ModelNotReady(self.name)
        started = time.perf_counter()
        try:
            request = self.parse(payload)
            # A place is taken before edit images are decoded, so that concurrent requests
            # beyond the capacity are refused before that work, not after.
            with self.runner.reserve() as slot:
                job = await slot.prepare(partial(self.prepare, request))
                if on_partial is not None and request.partial_images:
                    job = replace(job, on_partial=_previews_to(on_partial, request))
                images = await slot.run(job)
            encoded = await asyncio.to_thread(
                lambda: [
                    encode_image(image, request.output_format, request.output_compression)
                    for image in images
                ]
            )
        except ContractError as exc:
            REQUESTS_REJECTED.labels(model_name=self.name, reason="invalid").inc()
            self.log_refusal(request_id, "invalid", started, exc.message)
            raise InvalidInput(exc.message) from None
        except (ServerBusy, ServerStopping) as exc:
            reason = "busy" if isinstance(exc, ServerBusy) else "stopping"
            REQUESTS_REJECTED.labels(model_name=self.name, reason=reason).inc()
            self.log_refusal(request_id, reason, started, str(exc))
            raise
        except ShutdownTimeout as exc:  # accepted, then cut by the shutdown: not a fault
            REQUEST_LATENCY.labels(model_name=self.name, outcome="stopped").observe(
                time.perf_counter() - started
            )
            self.log_refusal(request_id, "stopped", started, str(exc))
            raise
        except asyncio.CancelledError:
            # The client left (``predictors.disconnect``) or the server stops: a request still
            # waiting leaves the queue; a running batch stops once all its clients have left.
            REQUEST_LATENCY.labels(model_name=self.name, outcome="cancelled").observe(
                time.perf_counter() - started
            )
            self.log_refusal(
                request_id, "cancelled", started, "the client left or the server stopped"
            )
            raise
        except Exception as exc:
            REQUEST_LATENCY.labels(model_name=self.name, outcome="error").observe(
                time.perf_counter() - started
            )
            self.log_refusal(request_id, "error", started, f"{type(exc).__name__}: {exc}")
            raise
        seconds = time.perf_counter() - started
        REQUEST_LATENCY.labels(model_name=self.name, outcome="ok").observe(seconds)
        IMAGES_GENERATED.labels(model_name=self.name).inc(len(images))
        width, height = images[0].size
        logger.info(
            "request_id=%s model=%s size=%dx%d images=%d steps=%d cfg=%.2f seed=%d inputs=%d "
            "mask=%s seconds=%.2f",
            loggable(request_id),
            self.name,
            width,
            height,
            len(images),
            request.num_inference_steps,
            request.true_cfg_scale,
            request.seed,
            len(request.images),
            "no" if request.mask is None else "yes",
            seconds,
        )
        return request, encoded

    async def preview_response(self, preview: _Preview, request_id: str) -> InferResponse:
        """A ``partial_image`` event's v2 response: one preview, encoded as the request's
        images are, base64 in JSON (``contract.parse_partial_image``)."""
        request = preview.request
        data = await asyncio.to_thread(
            encode_image, preview.image, request.output_format, request.output_compression
        )
        return InferResponse(
            response_id=request_id,
            model_name=self.name,
            infer_outputs=[
                InferOutput(
                    contract.IMAGES, [1], "BYTES", data=[contract.encode_bytes_for_rest(data)]
                )
            ],
            parameters={
                contract.IMAGE_INDEX: preview.image_index,
                contract.PARTIAL_IMAGE_INDEX: preview.partial_image_index,
                contract.SEED: request.seeds[preview.image_index],
            },
        )

    def refuse_body(self, body_id: object, headers: Mapping[str, str], message: str) -> None:
        """Count and log a request whose body is refused before it reaches ``predict`` (KServe's
        v2 request model refuses it), as ``predict`` counts and logs an invalid one."""
        request_id = _request_id(body_id, headers)
        REQUESTS_REJECTED.labels(model_name=self.name, reason="invalid").inc()
        self.log_refusal(request_id, "invalid", time.perf_counter(), message)

    def log_refusal(self, request_id: str, outcome: str, started: float, reason: str) -> None:
        """The log line of a request that ends without images, with its id like the others."""
        logger.warning(
            "request_id=%s model=%s outcome=%s seconds=%.2f reason=%s",
            loggable(request_id),
            self.name,
            outcome,
            time.perf_counter() - started,
            loggable(reason),
        )

    def parse(self, payload: InferRequest) -> ImageRequest:
        """The contract request carried by a v2 infer request (REST or gRPC)."""
        inputs = {item.name: item for item in payload.inputs}
        known = {contract.PROMPT, contract.NEGATIVE_PROMPT}
        if self.needs_image:
            known |= {contract.IMAGE, contract.MASK}
        unknown = sorted(set(inputs) - known)
        if unknown:
            raise ContractError(unknown[0], f"'{unknown[0]}' is not an input of model {self.name}")
        parameters = payload.parameters or {}
        if not isinstance(parameters, dict):
            parameters = to_http_parameters(parameters)

        def file(raw: object, name: str) -> bytes:
            if payload.from_grpc:
                return raw if isinstance(raw, bytes) else str(raw).encode()
            return contract.decode_bytes_from_rest(name, raw)

        images = []
        if contract.IMAGE in inputs:
            images = [file(raw, contract.IMAGE) for raw in _values(inputs[contract.IMAGE])]
        mask = None
        if contract.MASK in inputs:
            mask = file(_single_value(inputs[contract.MASK]), contract.MASK)
        return contract.validate_request(
            prompt=_text(inputs.get(contract.PROMPT)),
            negative_prompt=_text(inputs.get(contract.NEGATIVE_PROMPT)),
            parameters=parameters,
            defaults=self.defaults,
            limits=self.options.limits,
            images=images,
            mask=mask,
            needs_image=self.needs_image,
        )

    def generate(self, jobs: list[Job]) -> list[list[Image.Image]]:
        """Run one batch of jobs on the worker thread: the images of each job, in order.

        Between steps, a batch whose every client has left stops (``BatchAbandoned``).
        """
        steps = jobs[0].num_inference_steps

        def after_step(step: int) -> None:
            logger.debug("batch of %d requests: step %d/%d", len(jobs), step + 1, steps)
            self.runner.stop_if_abandoned(f"after step {step + 1}/{steps}")

        return denoise.generate(
            self.pipeline,
            jobs,
            attention=self.options.acceleration.attention,
            on_step_end=after_step,
            text_bucket=self.options.acceleration.text_bucket,
        )

    def respond(
        self, payload: InferRequest, request_id: str, request: ImageRequest, images: list[bytes]
    ) -> InferResponse:
        """The v2 response: encoded images and their seeds.

        Images are raw bytes over gRPC and in REST binary outputs (``binary_data_output``),
        and base64 text in a REST JSON body.
        """
        raw = payload.from_grpc or payload.use_binary_outputs
        data = images if raw else [contract.encode_bytes_for_rest(image) for image in images]
        outputs = [
            InferOutput(contract.IMAGES, [len(images)], "BYTES", data=data),
            InferOutput(contract.SEEDS, [len(images)], "INT64", data=request.seeds),
        ]
        return InferResponse(
            response_id=request_id,
            model_name=self.name,
            infer_outputs=outputs,
            from_grpc=payload.from_grpc,
            use_binary_outputs=payload.use_binary_outputs,
        )


@dataclass(frozen=True)
class _Preview:
    """A preview made on the worker thread, on its way to the request's stream."""

    request: ImageRequest
    image_index: int
    partial_image_index: int
    image: Image.Image


def _previews_to(
    on_partial: Callable[[_Preview], None], request: ImageRequest
) -> denoise.PartialCallback:
    """A job's ``on_partial`` that hands each preview to ``on_partial`` with its request."""
    return lambda number, index, image: on_partial(_Preview(request, number, index, image))


def _request_id(body_id: object, headers: Mapping[str, str] | None) -> str:
    """The request's id: the v2 body's, else the ``x-request-id`` header, else a new one."""
    return str(body_id or (headers or {}).get("x-request-id") or uuid.uuid4().hex)


# Characters that end or rewrite a line of the log: C0 and C1 controls, Unicode separators.
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def loggable(text: str) -> str:
    """``text`` with its line-breaking characters escaped (``\\n``): a client's id or
    value cannot forge lines of the log."""
    return _LINE_BREAKING.sub(lambda match: ascii(match.group())[1:-1], text)


def _values(tensor: InferInput) -> list[object]:
    """The elements of a BYTES input tensor, at least one, as many as its shape says: in
    its ``data``, or in gRPC's ``raw_input_contents`` (KServe's and Triton's clients send
    numpy arrays so), each element there 4 bytes of length then its bytes."""
    if tensor.datatype != "BYTES":
        raise ContractError(tensor.name, f"'{tensor.name}' must be a BYTES tensor")
    raw = tensor._raw_data  # KServe sets it for raw contents and has no public accessor
    if not tensor.data and raw:
        try:
            values = list(deserialize_bytes_tensor(raw))
        except (ValueError, struct.error):
            raise ContractError(
                tensor.name,
                f"'{tensor.name}' has raw contents that are not a BYTES tensor's "
                "(4 bytes of length, then the bytes, for each element)",
            ) from None
    else:
        values = list(tensor.data or ())
    if not values:
        raise ContractError(tensor.name, f"'{tensor.name}' must hold at least one element")
    if math.prod(tensor.shape) != len(values):
        raise ContractError(
            tensor.name,
            f"'{tensor.name}' has shape {list(tensor.shape)} but holds {len(values)} elements",
        )
    return values


def _single_value(tensor: InferInput) -> object:
    """The one element of a ``[1]`` BYTES input tensor."""
    values = _values(tensor)
    if len(values) != 1:
        raise ContractError(tensor.name, f"'{tensor.name}' must hold exactly one element")
    return values[0]


def _text(tensor: InferInput | None) -> str | None:
    """The text of a ``[1]`` BYTES input: UTF-8 bytes (gRPC) or a JSON string (REST) that
    UTF-8 can encode (JSON's escapes can spell lone surrogates, which no tokenizer takes)."""
    if tensor is None:
        return None
    value = _single_value(tensor)
    try:
        if isinstance(value, bytes):
            return value.decode("utf-8")
        if isinstance(value, str):
            value.encode("utf-8")
            return value
    except UnicodeError:
        raise ContractError(tensor.name, f"'{tensor.name}' must be UTF-8 text") from None
    raise ContractError(tensor.name, f"'{tensor.name}' must hold text, got {type(value).__name__}")
