"""Qwen-Image's VAE on still images, its convolutions as 2D ones.

Qwen-Image's VAE is a video VAE: each convolution of its encoder and decoder is a causal 3D
one, which pads time with zero frames in front (two for a temporal kernel of 3). An image is
a single frame, so the frame meets only the last temporal tap of each kernel, and the other
taps multiply zeros. diffusers' ``vae.encode`` and ``vae.decode`` still run the 3D
convolutions over the padded frames, and copy every convolution's input into a frame cache
that one frame never reads. ``encode_single_frame`` and ``decode_single_frame`` run the same
encoder and decoder, sharing their weights, with each causal convolution as a 2D convolution
by its last tap: the same result to float rounding, with a third of the convolution work (on
a CPU, 2.1x to 2.4x faster at full size: ``bench/vae_single_frame.py``).
Without a frame cache, the temporal down- and upsampling layers are skipped, as diffusers
skips them for a video's first frame.
"""

from __future__ import annotations

import copy
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

# The single-frame version built for each encoder or decoder (it shares their parameters).
_frame_versions: WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = WeakKeyDictionary()


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


def frame_version(module: torch.nn.Module) -> torch.nn.Module:
    """A VAE's encoder or decoder with its causal convolutions as ``FrameConv2d``, sharing
    every parameter with it (built once per module)."""
    version = _frame_versions.get(module)
    if version is None:
        shared = {id(parameter): parameter for parameter in module.parameters()}
        version = copy.deepcopy(module, memo=shared)
        for name, child in list(version.named_modules()):
            if isinstance(child, QwenImageCausalConv3d):
                version.set_submodule(name, FrameConv2d(child))
        _frame_versions[module] = version
    return version


def encode_single_frame(vae: AutoencoderKLQwenImage, pixels: torch.Tensor) -> torch.Tensor:
    """The mode of ``vae.encode(pixels)``'s latent distribution, as the pipelines take it
    (``sample_mode="argmax"``), for pixels of one frame, ``[batch, 3, 1, H, W]`` in
    [-1, 1]: latents ``[batch, z_dim, 1, H / 8, W / 8]``, not yet normalized."""
    return single_frame_posterior(vae, pixels).mode()


def single_frame_posterior(
    vae: AutoencoderKLQwenImage, pixels: torch.Tensor
) -> DiagonalGaussianDistribution:
    """``vae.encode(pixels)``'s latent distribution for pixels of one frame (see
    ``encode_single_frame``), for a caller that samples it."""
    _check_single_frame(pixels)
    if vae.use_tiling:
        return vae.encode(pixels).latent_dist
    return DiagonalGaussianDistribution(vae.quant_conv(frame_version(vae.encoder)(pixels)))


def decode_single_frame(vae: AutoencoderKLQwenImage, latents: torch.Tensor) -> torch.Tensor:
    """``vae.decode(latents)``'s sample for latents of one frame, ``[batch, z_dim, 1, height,
    width]``: pixels in [-1, 1], ``[batch, 3, 1, H, W]``."""
    _check_single_frame(latents)
    if vae.use_tiling:
        return vae.decode(latents, return_dict=False)[0]
    pixels = frame_version(vae.decoder)(vae.post_quant_conv(latents))
    return torch.clamp(pixels, min=-1.0, max=1.0)


def _check_single_frame(frames: torch.Tensor) -> None:
    if frames.shape[2] != 1:
        raise ValueError(f"a single frame was expected, not {frames.shape[2]}")
