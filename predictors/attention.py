"""Qwen-Image's joint attention for batches whose texts differ in length, without a mask.

A batch of texts of different lengths (the prompt and the negative prompt of batched CFG, or
the prompts of several requests) is zero-padded to the longest. diffusers then hands the
attention kernel a padding mask, and with a mask PyTorch's fast kernels do not run: on an
H200 at 1328x1328 the masked attention of a CFG pair took 3.2 ms against 2.0 ms for two
unmasked calls, in each of the 60 blocks (``docs/performance.md``).

``PaddingFreeAttnProcessor`` runs the projections, norms and RoPE on the whole batch as
diffusers does (RoPE, in compiled blocks, in real numbers: Inductor compiles no complex
ones). Attention itself is the custom op ``padded_joint_attention``: it attends each
run of consecutive samples that share a text length over their real tokens only, with the
mask-free backend; image tokens come first in its joint sequence, so the real tokens are a
prefix, attended without a copy. Image tokens get the same result as with the mask; padded
text positions get zeros (no later layer reads them: they stay masked out as keys, and only
image tokens leave the transformer).

Being an op, the attention is opaque to ``torch.compile``: a compiled block sees tensors of
the same shapes whatever the mix of text lengths in a batch, so mixed batches compile
nothing new (a Python loop over the runs inside the block would recompile for each new
number of runs, until dynamo's recompile limit fails the request). For the same reason CUDA
graphs cannot capture it (it is tagged ``cudagraph_unsafe``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

# (start, stop, text length): samples [start, stop) of the batch have `text length` real tokens.
TextRuns = tuple[tuple[int, int, int], ...]


def text_runs(lengths: Sequence[int]) -> TextRuns:
    """Group consecutive samples of equal text length: ``[5, 5, 3]`` gives
    ``((0, 2, 5), (2, 3, 3))``."""
    runs: list[tuple[int, int, int]] = []
    for index, length in enumerate(lengths):
        if runs and runs[-1][2] == length:
            runs[-1] = (runs[-1][0], index + 1, length)
        else:
            runs.append((index, index + 1, length))
    return tuple(runs)


# CUDA graphs must not capture the op: which kernels it runs, over which slices, follows the
# text lengths it reads on the host, and a replay would repeat the captured ones. Tagged,
# Inductor's graph partitioning runs it between the graphs of a block's other work.
@torch.library.custom_op(
    "qwen_image_serve::padded_joint_attention",
    mutates_args=(),
    tags=(torch.Tag.cudagraph_unsafe,),
)
def padded_joint_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    text_lengths: torch.Tensor,
    image_tokens: int,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over joint ``[image, text]`` sequences, ``[batch, tokens, heads, head_dim]``:
    ``image_tokens`` image tokens, then texts zero-padded at the end from ``text_lengths`` (a
    CPU int tensor, one length per sample). A sample's real tokens are a prefix of its
    sequence, so each run of samples with one text length attends over a slice, no copy.
    Returns the image and the text outputs apart, each contiguous (the output projections
    then copy nothing), the text's zero at padded positions. ``backend``: a diffusers
    attention backend name, or ``None`` for the active one."""
    batch, tokens, heads, head_dim = query.shape
    text_tokens = tokens - image_tokens
    backend_name = None if backend is None else AttentionBackendName(backend)
    lengths = text_lengths.tolist()

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dispatch_attention_fn(q, k, v, dropout_p=0.0, is_causal=False, backend=backend_name)

    runs = text_runs(lengths)
    if len(runs) == 1:  # one text length (padded or not): one call over the real tokens
        real = slice(0, image_tokens + runs[0][2])
        attended = attend(query[:, real], key[:, real], value[:, real])
        # For one sample the kernel's output starts with the image part, contiguous: kept as
        # it is. The outputs may not share memory: the text part is a new tensor, padded.
        text = F.pad(attended[:, image_tokens:], (0, 0, 0, 0, 0, text_tokens - runs[0][2]))
        return attended[:, :image_tokens].contiguous(), text
    image_out = query.new_empty(batch, image_tokens, heads, head_dim)
    text_out = query.new_empty(batch, text_tokens, heads, head_dim)
    for start, stop, length in runs:
        rows, real = slice(start, stop), slice(0, image_tokens + length)
        attended = attend(query[rows, real], key[rows, real], value[rows, real])
        image_out[rows] = attended[:, :image_tokens]
        text_out[rows, :length] = attended[:, image_tokens:]
        text_out[rows, length:] = 0
    return image_out, text_out


@padded_joint_attention.register_fake
def _(query, key, value, text_lengths, image_tokens, backend=None):
    batch, tokens, heads, head_dim = query.shape
    return (
        query.new_empty(batch, image_tokens, heads, head_dim),
        query.new_empty(batch, tokens - image_tokens, heads, head_dim),
    )


class PaddingFreeAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """diffusers' Qwen double-stream processor, plus a ``text_lengths`` argument (a CPU int
    tensor, passed through the transformer's ``attention_kwargs``) that replaces the padding
    mask. Without it the processor is diffusers' own."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        text_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if text_lengths is None:
            return super().__call__(
                attn,
                hidden_states,
                encoder_hidden_states,
                encoder_hidden_states_mask,
                attention_mask,
                image_rotary_emb,
            )
        if encoder_hidden_states_mask is not None or attention_mask is not None:
            raise ValueError("text_lengths replaces the padding mask: pass one or the other")

        image_q, image_k, image_v = _heads(
            attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), attn.norm_q, attn.norm_k
        )
        text_q, text_k, text_v = _heads(
            attn,
            encoder_hidden_states,
            (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
            attn.norm_added_q,
            attn.norm_added_k,
        )
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            image_q, image_k = (_rope(x, image_freqs) for x in (image_q, image_k))
            text_q, text_k = (_rope(x, text_freqs) for x in (text_q, text_k))

        # Image tokens first (diffusers puts the text first): the padding then ends each
        # sequence, and a sample's real tokens are a prefix. Attention ignores the order.
        joint = [
            torch.cat([image, text], dim=1)
            for image, text in ((image_q, text_q), (image_k, text_k), (image_v, text_v))
        ]
        backend = self._attention_backend
        image_out, text_out = padded_joint_attention(
            *joint,
            text_lengths,
            hidden_states.shape[1],
            None if backend is None else AttentionBackendName(backend).value,
        )
        image_out = attn.to_out[0](image_out.flatten(2, 3).to(joint[0].dtype))
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)  # dropout
        return image_out, attn.to_add_out(text_out.flatten(2, 3).to(joint[0].dtype))


def _heads(attn, states: torch.Tensor, projections, norm_q, norm_k) -> list[torch.Tensor]:
    """Query, key and value of one stream as [batch, tokens, heads, head_dim], q and k normed."""
    head_dim = attn.inner_dim // attn.heads
    query, key, value = (project(states).unflatten(-1, (-1, head_dim)) for project in projections)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return [query, key, value]


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of ``x`` ([batch, tokens, heads, head_dim]) by ``freqs`` (complex,
    [tokens, head_dim / 2]), as diffusers' ``apply_rotary_emb_qwen(use_real=False)`` does.

    Compiled, the same float32 products in real numbers: x·e^(iθ) = x·cos θ + (i·x)·sin θ,
    where i·x turns the pair (a, b) into (-b, a). Inductor has no kernels for complex numbers
    and ran diffusers' complex product as an eager kernel of its own, with float32 copies of
    query and key on both sides (run 8's profile: 4.9 ms of a 108 ms step); in real numbers it
    fuses with the norms before it. Eager, diffusers' complex product is one kernel where the
    real form takes several."""
    if not torch.compiler.is_compiling():
        return apply_rotary_emb_qwen(x, freqs, use_real=False)
    # A view of the table as (cos θ, sin θ) pairs, no copy: [tokens, 1, head_dim / 2] each.
    cos, sin = torch.view_as_real(freqs).unsqueeze(1).unbind(-1)
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack((-imag, real), dim=-1)  # i·x
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = pairs * cos.unsqueeze(-1) + turned.float() * sin.unsqueeze(-1)
    return rotated.flatten(3).type_as(x)


def install(transformer: torch.nn.Module) -> None:
    """Use ``PaddingFreeAttnProcessor`` in every block of a Qwen-Image transformer, keeping
    the attention backend each block was set to."""
    for block in transformer.transformer_blocks:
        processor = PaddingFreeAttnProcessor()
        processor._attention_backend = block.attn.processor._attention_backend
        block.attn.set_processor(processor)


def installed(transformer: torch.nn.Module) -> bool:
    """Whether ``install`` ran on this transformer."""
    return isinstance(transformer.transformer_blocks[0].attn.processor, PaddingFreeAttnProcessor)
