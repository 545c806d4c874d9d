"""The blocks' feed-forward input projection with its bias and GELU in the product's epilogue.

Each Qwen-Image block has two feed-forwards (image and text stream), whose first layer is
diffusers' ``GELU(approximate="tanh")``: a linear layer, then GELU over its output, 12288
wide. On a GPU the product is one cuBLAS kernel, and compiled or not the GELU is a kernel of
its own that reads that output back and writes it again (about 0.7 GB a block at 1328x1328
with CFG). ``torch._addmm_activation(..., use_gelu=True)`` asks cuBLASLt for the product with
the bias and the tanh GELU in its epilogue: one kernel, the output written once. GELU then
acts on the float32 accumulator, where diffusers rounds the product to bf16 first: a
difference of bf16 rounding. On a CPU that op's GELU is the erf one, so there, and for
weights that are not plain tensors (torchao's FP8), the projection runs as diffusers does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU


class EpilogueGELU(torch.nn.Module):
    """diffusers' ``GELU(approximate="tanh")`` on the same linear layer (``proj``, so module
    names stay), with the bias and GELU in cuBLASLt's epilogue on CUDA."""

    def __init__(self, gelu: GELU) -> None:
        super().__init__()
        self.proj = gelu.proj
        self.epilogue = True  # False: diffusers' two steps, as the original service runs them

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.epilogue and hidden_states.is_cuda and takes_epilogue(self.proj):
            return linear_gelu(hidden_states, self.proj.weight, self.proj.bias)
        return F.gelu(self.proj(hidden_states), approximate="tanh")


def takes_epilogue(proj: torch.nn.Linear) -> bool:
    """Whether cuBLASLt's epilogue can run ``proj``: plain weights and a bias. FP8 weights
    are a torchao tensor subclass, which it does not take."""
    return type(proj.weight) is torch.nn.Parameter and proj.bias is not None


def linear_gelu(
    hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """GELU of ``hidden_states @ weight.T + bias`` in one ``torch._addmm_activation`` call:
    on CUDA cuBLASLt's GELU_BIAS epilogue, with tanh's GELU; on a CPU, with erf's."""
    rows = hidden_states.flatten(0, -2)
    projected = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)
    return projected.unflatten(0, hidden_states.shape[:-1])


def _feedforwards(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    for block in transformer.transformer_blocks:
        yield block.img_mlp
        yield block.txt_mlp


def _epilogue_modules(transformer: torch.nn.Module) -> list[EpilogueGELU]:
    return [ff.net[0] for ff in _feedforwards(transformer) if isinstance(ff.net[0], EpilogueGELU)]


def install(transformer: torch.nn.Module) -> None:
    """Use ``EpilogueGELU`` for the tanh-GELU input projection of every block's feed-forwards
    (a second call changes nothing)."""
    for feedforward in _feedforwards(transformer):
        first = feedforward.net[0]
        if isinstance(first, GELU) and first.approximate == "tanh":
            feedforward.net[0] = EpilogueGELU(first)


def installed(transformer: torch.nn.Module) -> bool:
    """Whether ``install`` ran on this transformer."""
    return bool(_epilogue_modules(transformer))


@contextmanager
def as_diffusers(transformer: torch.nn.Module) -> Iterator[None]:
    """Run the projections as diffusers does inside the block: product, then GELU (the
    original service's computation, for the benchmark's baseline)."""
    modules = _epilogue_modules(transformer)
    for module in modules:
        module.epilogue = False
    try:
        yield
    finally:
        for module in modules:
            module.epilogue = True
