"""Precise BatchNorm: re-estimate running statistics with the final weights.

During training, BatchNorm's running mean / variance are an exponential average (momentum 0.1)
over batches computed with *older* weights, and start from (0, 1).  After a short training run
(a few hundred CPU steps, or the two steps of a smoke test) they can be far from the statistics
the final network produces, and an evaluation-mode network can even collapse to a constant
output.  Re-estimating them with a plain average over a few batches of the final network fixes
this (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021, sec. 3).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, inputs: Iterable[torch.Tensor],
                          forward: Callable[[torch.Tensor], object] | None = None) -> None:
    """Replace the running statistics of every BatchNorm in `module` by their average over `inputs`.

    `forward(x)` runs the module (default: `module(x)`).  The module is left in eval mode;
    parameters are untouched.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None = cumulative (equal-weight) average over the batches seen
    module.train()
    for x in inputs:
        (forward or module)(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    module.eval()
