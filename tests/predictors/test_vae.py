"""The single-frame VAE decoder against diffusers' own decode, on the tiny VAE in float32."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

from bench import vae_decode
from predictors import tiny
from predictors.vae import FrameConv2d, decode_single_frame, frame_decoder


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


def test_the_frame_decoder_shares_the_vaes_weights_and_leaves_it_alone(vae):
    decoder = frame_decoder(vae)
    assert decoder is frame_decoder(vae)  # built once per VAE
    assert {p.data_ptr() for p in decoder.parameters()} == {
        p.data_ptr() for p in vae.decoder.parameters()
    }
    wrapped = [name for name, m in decoder.named_modules() if isinstance(m, FrameConv2d)]
    causal = [
        name for name, m in vae.decoder.named_modules() if isinstance(m, QwenImageCausalConv3d)
    ]
    assert wrapped == causal and "conv_in" in wrapped
    assert isinstance(vae.decoder.conv_in, QwenImageCausalConv3d)  # the VAE is unchanged


def test_more_than_one_frame_is_refused(vae):
    with pytest.raises(ValueError, match="one frame"):
        decode_single_frame(vae, torch.randn(1, tiny.LATENT_CHANNELS, 2, 4, 4))


def test_the_vae_benchmark_compares_both_decodes_at_full_size():
    (result,) = vae_decode.main(["--sizes", "32", "--repeats", "1", "--device", "cpu"])
    assert result["size"] == 32 and result["diffusers_s"] > 0 and result["2d_s"] > 0
    assert result["max_abs_diff"] < 1e-5
