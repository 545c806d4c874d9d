"""The single-frame VAE encoder and decoder against diffusers' own, on the tiny VAE in float32."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

from bench import vae_single_frame
from predictors import tiny
from predictors.vae import FrameConv2d, decode_single_frame, encode_single_frame, frame_version


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return tiny.build_vae().eval()


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 8, 8), (2, 6, 10)])
def test_decoding_a_frame_in_2d_equals_diffusers_decode(vae, batch, height, width):
    latents = torch.randn(batch, tiny.LATENT_CHANNELS, 1, height, width)
    with torch.inference_mode():
        expected = vae.decode(latents, return_dict=False)[0]
        actual = decode_single_frame(vae, latents)
    assert actual.shape == expected.shape == (batch, 3, 1, 8 * height, 8 * width)
    assert (actual - expected).abs().max() < 1e-5
    assert expected.abs().max() > 0.01  # not an all-zero image


def test_decoding_a_frame_in_2d_clamps_as_diffusers_decode(vae):
    """Pixels past [-1, 1] are clamped as ``vae.decode`` clamps them: a decoder made 10
    times louder than the tiny one (whose pixels stay within 0.8) passes the range."""
    loud = copy.deepcopy(vae)
    with torch.no_grad():
        loud.decoder.conv_out.weight.mul_(10)
        loud.decoder.conv_out.bias.mul_(10)
    latents = torch.randn(1, tiny.LATENT_CHANNELS, 1, 8, 8)
    with torch.inference_mode():
        expected = loud.decode(latents, return_dict=False)[0]
        actual = decode_single_frame(loud, latents)
    assert expected.abs().max() == 1.0
    assert (actual - expected).abs().max() < 1e-4  # ten times the rounding above


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 64, 64), (2, 48, 80)])
def test_encoding_a_frame_in_2d_equals_diffusers_encode(vae, batch, height, width):
    pixels = torch.rand(batch, 3, 1, height, width) * 2 - 1
    with torch.inference_mode():
        expected = vae.encode(pixels).latent_dist.mode()
        actual = encode_single_frame(vae, pixels)
    assert (
        actual.shape == expected.shape == (batch, tiny.LATENT_CHANNELS, 1, height // 8, width // 8)
    )
    assert (actual - expected).abs().max() < 1e-5
    assert expected.abs().max() > 0.01


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_the_frame_version_shares_the_weights_and_leaves_the_vae_alone(vae, part):
    original = getattr(vae, part)
    version = frame_version(original)
    assert version is frame_version(original)  # built once
    assert {p.data_ptr() for p in version.parameters()} == {
        p.data_ptr() for p in original.parameters()
    }
    wrapped = [name for name, m in version.named_modules() if isinstance(m, FrameConv2d)]
    causal = [name for name, m in original.named_modules() if isinstance(m, QwenImageCausalConv3d)]
    assert wrapped == causal and "conv_in" in wrapped
    assert isinstance(original.conv_in, QwenImageCausalConv3d)  # the VAE is unchanged


def test_more_than_one_frame_is_refused(vae):
    with pytest.raises(ValueError, match="single frame"):
        decode_single_frame(vae, torch.randn(1, tiny.LATENT_CHANNELS, 2, 4, 4))
    with pytest.raises(ValueError, match="single frame"):
        encode_single_frame(vae, torch.randn(1, 3, 5, 32, 32))


def test_the_vae_benchmark_compares_both_paths_at_full_size():
    (result,) = vae_single_frame.main(["--sizes", "32", "--repeats", "1", "--device", "cpu"])
    assert result["size"] == 32
    for direction in ("decode", "encode"):
        assert result[f"{direction}_diffusers_s"] > 0 and result[f"{direction}_2d_s"] > 0
        assert result[f"{direction}_2d_max_diff"] < 1e-5
