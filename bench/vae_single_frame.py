"""One image through Qwen-Image's full-size VAE (random weights, the real config):
diffusers' ``vae.decode`` and ``vae.encode`` against ``predictors.vae``'s 2D convolutions,
side by side.

Per size and direction: the median seconds of each path, their ratio, and the largest
difference between their outputs. ``bench/gpu_pipelines.py --profile`` runs the same
comparison at each case's size (its ``parts`` lines); this script needs no text encoder or
transformer, so it runs on a laptop.

    python bench/vae_single_frame.py [--sizes 256,512] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from diffusers import AutoencoderKLQwenImage

from bench.timing import median_seconds
from predictors.vae import decode_single_frame, encode_single_frame


def compare(vae: AutoencoderKLQwenImage, width: int, height: int, repeats: int) -> dict[str, float]:
    """Both decodes of one random ``width`` x ``height`` frame, then both encodes: seconds
    (median), the 2D path's speedup, and the largest difference between the two outputs."""
    scale = vae.spatial_compression_ratio
    latents = torch.randn(1, vae.config.z_dim, 1, height // scale, width // scale)
    latents = latents.to(vae.device, vae.dtype)
    pixels = (torch.rand(1, 3, 1, height, width) * 2 - 1).to(vae.device, vae.dtype)
    pairs = {
        "decode": (
            lambda: vae.decode(latents, return_dict=False)[0],
            lambda: decode_single_frame(vae, latents),
        ),
        "encode": (
            lambda: vae.encode(pixels).latent_dist.mode(),
            lambda: encode_single_frame(vae, pixels),
        ),
    }
    result: dict[str, float] = {}
    for name, (diffusers_path, frame_path) in pairs.items():
        diffusers_s = median_seconds(diffusers_path, vae.device, repeats)
        frame_s = median_seconds(frame_path, vae.device, repeats)
        result |= {
            f"{name}_diffusers_s": round(diffusers_s, 4),
            f"{name}_2d_s": round(frame_s, 4),
            f"{name}_speedup": round(diffusers_s / frame_s, 2),
            f"{name}_2d_max_diff": (diffusers_path() - frame_path()).abs().max().item(),
        }
    return result


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512", help="square image sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, else float32")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage().eval().to(device)
    if dtype != torch.float32:
        vae.to(dtype)
    print(f"device {device}, {dtype}, torch {torch.__version__}", flush=True)
    results = []
    with torch.inference_mode():
        for size in (int(size) for size in args.sizes.split(",")):
            results.append({"size": size, **compare(vae, size, size, args.repeats)})
            print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
