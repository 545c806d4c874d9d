"""The blocks' modulation, computed for all of a request's steps before the first one.

Each Qwen-Image block turns the step's timestep embedding into the shift, scale and gate of
its image and text streams: ``img_mod`` and ``txt_mod``, a SiLU and a linear layer 3072 ->
18432 each. Their input is the same row for every sample of a step, so the product is bound
by reading the weights: 120 layers, 13.6 GB a step in bf16 (on an H100 most likely the
5.3 ms kernel of a 108 ms Lightning step, run 8 in docs/performance.md). A request's
timesteps are all known before its first step: ``precomputed`` runs each layer once over
all of them, reading its weights once a request, and each step then reads its own rows. The
arithmetic is the layers' own, row for row (equal to float rounding: a product over many
rows may round differently from one over a few).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class StepModulation(torch.nn.Sequential):
    """A block's ``img_mod`` or ``txt_mod`` (the same SiLU and linear layer, so parameter
    names stay) that returns the current step's precomputed rows where ``precomputed`` has
    set them, and computes them from its input otherwise."""

    def __init__(self, modulation: torch.nn.Sequential) -> None:
        super().__init__(*modulation)
        self.rows: torch.Tensor | None = None  # [1, 6 * dim]: the current step's output

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return self.compute(temb)
        return self.rows.expand(temb.shape[0], -1)

    def compute(self, temb: torch.Tensor) -> torch.Tensor:
        """diffusers' modulation of ``temb`` [rows, dim]: SiLU, then the linear layer."""
        return super().forward(temb)


def _modulations(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    for block in transformer.transformer_blocks:
        yield block.img_mod
        yield block.txt_mod


def install(transformer: torch.nn.Module) -> None:
    """Use ``StepModulation`` for every block's modulation layers (a second call changes
    nothing). Transformers whose modulation is not one row per step (Qwen-Image-Edit-2511's
    ``zero_cond_t`` adds rows for the condition image; ``use_additional_t_cond`` adds an
    input) keep diffusers' layers."""
    config = transformer.config
    if config.get("zero_cond_t", False) or config.get("use_additional_t_cond", False):
        return
    for block in transformer.transformer_blocks:
        for name in ("img_mod", "txt_mod"):
            if not isinstance(getattr(block, name), StepModulation):
                setattr(block, name, StepModulation(getattr(block, name)))


def installed(transformer: torch.nn.Module) -> bool:
    """Whether ``install`` replaced this transformer's modulation layers."""
    return any(isinstance(module, StepModulation) for module in _modulations(transformer))


@contextmanager
def precomputed(
    transformer: torch.nn.Module, timesteps: torch.Tensor
) -> Iterator[Callable[[int], None]]:
    """Compute every installed modulation layer over all ``timesteps`` (the transformer's
    ``timestep`` input of each step); inside, ``select(i)`` makes the layers return step
    ``i``'s rows, whatever their input. Without ``install`` (or on leaving), they compute
    from their input as diffusers' do."""
    modules = [m for m in _modulations(transformer) if isinstance(m, StepModulation)]
    if not modules:
        yield lambda step: None
        return
    # The transformer's own embedding of each step's timestep; its dtype is what it reads
    # of the second argument.
    like = torch.empty(0, dtype=transformer.dtype, device=timesteps.device)
    embeddings = transformer.time_text_embed(timesteps.to(transformer.dtype), like)
    tables = [module.compute(embeddings) for module in modules]

    def select(step: int) -> None:
        for module, table in zip(modules, tables, strict=True):
            module.rows = table[step : step + 1]

    try:
        yield select
    finally:
        for module in modules:
            module.rows = None
