"""Qwen-Image's VAE decoder on still images, as 2D convolutions.

Qwen-Image's VAE is a video VAE: each convolution of its decoder is a causal 3D one, which
pads time with zero frames in front (two for a temporal kernel of 3). An image is a single
frame, so the frame meets only the last temporal tap of each kernel, and the other taps
multiply zeros. diffusers' ``vae.decode`` still runs the 3D convolutions over the padded
frames, and copies every convolution's input into a frame cache that one frame never reads.
``decode_single_frame`` runs the same decoder, sharing its weights, with each causal
convolution as a 2D convolution by its last tap: the same result to float rounding, with a
third of the convolution work (on a CPU, the full-size decoder at 256x256 took 1.27 s
against 3.04 s; ``docs/performance.md``).
"""

from __future__ import annotations

import copy
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

# The single-frame decoder built for each VAE (it shares the VAE's parameters).
_frame_decoders: WeakKeyDictionary[AutoencoderKLQwenImage, torch.nn.Module] = WeakKeyDictionary()


class FrameConv2d(torch.nn.Module):
    """A ``QwenImageCausalConv3d`` applied to one frame: a 2D convolution with the kernel's
    last temporal tap, the only one that meets the frame."""

    def __init__(self, conv: QwenImageCausalConv3d):
        super().__init__()
        self.conv = conv
        width_padding, _, height_padding, _, _, _ = conv._padding
        self.padding = (height_padding, width_padding)

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[2] != 1 or cache_x is not None:
            raise ValueError("FrameConv2d takes a single frame and no frame cache")
        conv = self.conv
        frame = F.conv2d(
            x[:, :, 0], conv.weight[:, :, -1], conv.bias, conv.stride[1:], self.padding
        )
        return frame.unsqueeze(2)


def frame_decoder(vae: AutoencoderKLQwenImage) -> torch.nn.Module:
    """``vae.decoder`` with its causal convolutions as ``FrameConv2d``, sharing every
    parameter with the VAE (built once per VAE)."""
    decoder = _frame_decoders.get(vae)
    if decoder is None:
        shared = {id(parameter): parameter for parameter in vae.decoder.parameters()}
        decoder = copy.deepcopy(vae.decoder, memo=shared)
        for name, module in list(decoder.named_modules()):
            if isinstance(module, QwenImageCausalConv3d):
                decoder.set_submodule(name, FrameConv2d(module))
        _frame_decoders[vae] = decoder
    return decoder


def decode_single_frame(vae: AutoencoderKLQwenImage, latents: torch.Tensor) -> torch.Tensor:
    """``vae.decode(latents)``'s sample for latents of one frame, ``[batch, z_dim, 1, height,
    width]``, through ``frame_decoder``: pixels in [-1, 1], ``[batch, 3, 1, H, W]``."""
    if latents.shape[2] != 1:
        raise ValueError(f"decode_single_frame takes one frame, not {latents.shape[2]}")
    if vae.use_tiling:
        return vae.decode(latents, return_dict=False)[0]
    # With no frame cache, the decoder's temporal resampling is skipped, as for a video's
    # first frame.
    pixels = frame_decoder(vae)(vae.post_quant_conv(latents))
    return torch.clamp(pixels, min=-1.0, max=1.0)
