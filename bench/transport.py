"""REST (base64 in JSON, or binary outputs) against gRPC (raw bytes) for image payloads.

A KServe ModelServer on loopback serves a model that answers with an image-sized BYTES
output, encoded as ``predictors.contract`` says for each protocol, so only the transport is
timed. Two shapes: generation (a prompt in, an image out) and edit (an image in and out).
Run: ``python bench/transport.py [--repeats 30] [--sizes-mb 0.5 2 4]``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from kserve import (
    InferenceGRPCClient,
    InferenceRESTClient,
    InferInput,
    InferOutput,
    InferRequest,
    InferResponse,
    Model,
    ModelServer,
    RESTConfig,
)
from kserve.protocol.infer_type import to_http_parameters

from predictors import contract

MODEL = "echo"


class EchoImageModel(Model):
    """Returns the image it was sent, as the contract encodes images for each protocol."""

    def __init__(self) -> None:
        super().__init__(MODEL)
        self.ready = True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None):
        tensor = payload.inputs[0]
        data = tensor.data[0]
        if tensor.name == contract.PROMPT:  # generation shape: an image of `bytes` bytes
            parameters = payload.parameters
            if not isinstance(parameters, dict):  # gRPC: protobuf InferParameter values
                parameters = to_http_parameters(parameters)
            image = payload_bytes(int(parameters["bytes"]))
        elif payload.from_grpc:
            image = data
        else:
            image = contract.decode_bytes_from_rest(contract.IMAGE, data)
        binary = payload.use_binary_outputs
        out = image if payload.from_grpc or binary else contract.encode_bytes_for_rest(image)
        output = InferOutput(contract.IMAGES, [1], "BYTES", data=[out])
        return InferResponse(
            response_id=payload.id or "bench",
            model_name=MODEL,
            infer_outputs=[output],
            from_grpc=payload.from_grpc,
            use_binary_outputs=binary,
        )


def payload_bytes(size: int) -> bytes:
    """Incompressible bytes, like a PNG of a photo; the same for a size in both processes."""
    return random.Random(size).randbytes(size)


def serve(http_port: int, grpc_port: int) -> None:
    ModelServer(http_port=http_port, grpc_port=grpc_port, workers=1).start([EchoImageModel()])


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def time_calls(call, repeats: int) -> list[float]:
    await call()  # warm-up: connections, first-use allocations
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def measure_generation(
    http_port: int, grpc_port: int, size: int, repeats: int
) -> dict[str, float]:
    """A prompt in, one image out."""
    image = payload_bytes(size)
    prompt = {"name": contract.PROMPT, "shape": [1], "datatype": "BYTES", "data": ["a cat"]}
    results = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as http:
        for binary in (False, True):
            body = {"inputs": [prompt], "parameters": {"bytes": size, "binary_data_output": binary}}

            async def call(body=body, binary=binary) -> None:
                response = await http.post(f"/v2/models/{MODEL}/infer", json=body)
                if binary:
                    header_length = int(response.headers["inference-header-content-length"])
                    raw = response.content[header_length:]
                    size_prefix = int.from_bytes(raw[:4], "little")  # BYTES element length
                    returned = raw[4 : 4 + size_prefix]
                else:
                    data = response.json()["outputs"][0]["data"][0]
                    returned = contract.decode_bytes_from_rest(contract.IMAGES, data)
                if returned != image:
                    raise SystemExit("the image came back altered")

            name = "REST binary output (httpx)" if binary else "REST JSON+base64 (httpx)"
            results[name] = median_ms(await time_calls(call, repeats))

    grpc_client = grpc_client_for(grpc_port)
    request = InferRequest(
        model_name=MODEL,
        infer_inputs=[InferInput(contract.PROMPT, [1], "BYTES", ["a cat"])],
        parameters={"bytes": size},
    )

    async def grpc_call() -> None:
        response = await grpc_client.infer(request)
        assert response.outputs[0].data[0] == image

    results["gRPC raw bytes (InferenceGRPCClient)"] = median_ms(
        await time_calls(grpc_call, repeats)
    )
    await grpc_client.close()
    return results


def grpc_client_for(grpc_port: int) -> InferenceGRPCClient:
    return InferenceGRPCClient(
        f"127.0.0.1:{grpc_port}",
        channel_args=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )


async def measure_edit(http_port: int, grpc_port: int, size: int, repeats: int) -> dict[str, float]:
    """One image in, one image out."""
    image = payload_bytes(size)
    url = f"http://127.0.0.1:{http_port}"

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        body = {
            "inputs": [
                {
                    "name": contract.IMAGE,
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [contract.encode_bytes_for_rest(image)],
                }
            ]
        }

        async def rest_httpx() -> None:
            response = await http.post(f"/v2/models/{MODEL}/infer", json=body)
            returned = response.json()["outputs"][0]["data"][0]
            assert contract.decode_bytes_from_rest("images", returned) == image

        httpx_samples = await time_calls(rest_httpx, repeats)

    rest_client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    rest_request = InferRequest(
        model_name=MODEL,
        infer_inputs=[
            InferInput(contract.IMAGE, [1], "BYTES", [contract.encode_bytes_for_rest(image)])
        ],
    )

    async def rest_kserve() -> None:
        response = await rest_client.infer(url, rest_request, model_name=MODEL)
        returned = response.outputs[0].data[0]
        assert contract.decode_bytes_from_rest("images", returned) == image

    kserve_rest_samples = await time_calls(rest_kserve, repeats)
    await rest_client.close()

    grpc_client = grpc_client_for(grpc_port)
    grpc_request = InferRequest(
        model_name=MODEL, infer_inputs=[InferInput(contract.IMAGE, [1], "BYTES", [image])]
    )

    async def grpc_kserve() -> None:
        response = await grpc_client.infer(grpc_request)
        assert response.outputs[0].data[0] == image

    grpc_samples = await time_calls(grpc_kserve, repeats)
    await grpc_client.close()
    return {
        "REST JSON+base64 (httpx)": median_ms(httpx_samples),
        "REST JSON+base64 (InferenceRESTClient)": median_ms(kserve_rest_samples),
        "gRPC raw bytes (InferenceGRPCClient)": median_ms(grpc_samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[0.5, 2.0, 4.0])
    parser.add_argument("--http-port", type=int, default=18890)
    parser.add_argument("--grpc-port", type=int, default=18891)
    args = parser.parse_args()

    server = multiprocessing.get_context("spawn").Process(
        target=serve, args=(args.http_port, args.grpc_port), daemon=True
    )
    server.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{args.http_port}/v2/models/{MODEL}/ready")
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("echo server did not start")
            time.sleep(0.2)
        print(f"Round-trip median of {args.repeats} calls on loopback")
        print(f"{'shape':<10} | {'image':>7} | {'transport':<40} | {'median ms':>9}")
        for shape, measure in (("generation", measure_generation), ("edit", measure_edit)):
            for size_mb in args.sizes_mb:
                size = int(size_mb * 1e6)
                results = asyncio.run(measure(args.http_port, args.grpc_port, size, args.repeats))
                for name, ms in results.items():
                    print(f"{shape:<10} | {size_mb:>5.1f}MB | {name:<40} | {ms:>9.1f}")
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    main()
