"""Normalising flows from affine coupling blocks (RealNVP / Glow style), for FastFlow and CFlow.

One block splits the channels x = (x1, x2), computes (s, t) = subnet([x1, cond]) and outputs
(x1, x2 * exp(clamp(s)) + t), then shuffles the channels with a fixed random permutation so the
next block transforms a different half.  The Jacobian of the coupling is triangular: its log-det
is the sum of the clamped log-scales s, and the permutation's is 0.

Channels are dim 1 of any tensor, so one implementation serves feature maps (B, C, H, W) with
convolutional subnets (FastFlow) and vectors (N, C) with fully connected subnets (CFlow).  The
log-det is returned per position (summed over channels only): with 1x1 / fully connected subnets
that is each position's exact log-det; with spatial (3x3) subnets the per-position terms still sum
to the exact total.

Design choices (why):
- Scales are soft-clamped, alpha * f(s / alpha) with f = (2 / pi) atan or tanh, so exp(s) stays in
  [e^-alpha, e^alpha]: a free scale makes the likelihood blow up early in training.
- The subnet's last layer starts at zero, so every block starts as the identity (as in Glow):
  the untrained flow is the standard-normal likelihood of its input and training starts stable.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# (input channels, output channels, block index) -> subnet
SubnetFactory = Callable[[int, int, int], nn.Module]
_LOG_2PI = math.log(2 * math.pi)


def soft_clamp(s: torch.Tensor, alpha: float, kind: str = "atan") -> torch.Tensor:
    """Smoothly squash log-scales into (-alpha, alpha); slope 2 / pi (atan) or 1 (tanh) at 0."""
    if kind == "atan":
        return (2 * alpha / math.pi) * torch.atan(s / alpha)
    if kind == "tanh":
        return alpha * torch.tanh(s / alpha)
    raise ValueError(f"unknown clamp kind {kind!r}; use 'atan' or 'tanh'")


def _zero_last_layer(module: nn.Module) -> None:
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    if not layers:
        raise ValueError("a coupling subnet needs a Linear or Conv layer as its last layer")
    nn.init.zeros_(layers[-1].weight)
    if layers[-1].bias is not None:
        nn.init.zeros_(layers[-1].bias)


class AffineCoupling(nn.Module):
    """One affine coupling step followed by a fixed channel permutation."""

    def __init__(self, channels: int, subnet: nn.Module, permutation: torch.Tensor, clamp: float = 2.0,
                 clamp_kind: str = "atan"):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling block needs at least 2 channels, got {channels}")
        self.split = channels // 2
        self.subnet, self.clamp, self.clamp_kind = subnet, clamp, clamp_kind
        _zero_last_layer(self.subnet)
        self.register_buffer("perm", permutation)
        self.register_buffer("inv_perm", torch.argsort(permutation))

    def _scale_shift(self, x1: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.subnet(x1 if cond is None else torch.cat([x1, cond], dim=1))
        s, t = h.chunk(2, dim=1)
        return soft_clamp(s, self.clamp, self.clamp_kind), t

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (y, log|det J| per position, i.e. shape x.shape without dim 1)."""
        x1, x2 = x[:, : self.split], x[:, self.split:]
        s, t = self._scale_shift(x1, cond)
        y = torch.cat([x1, x2 * torch.exp(s) + t], dim=1)
        return y.index_select(1, self.perm), s.sum(dim=1)

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y = y.index_select(1, self.inv_perm)
        x1, y2 = y[:, : self.split], y[:, self.split:]
        s, t = self._scale_shift(x1, cond)
        return torch.cat([x1, (y2 - t) * torch.exp(-s)], dim=1)


class CouplingFlow(nn.Module):
    """A stack of `n_blocks` affine couplings; `cond_channels` > 0 makes it conditional (CFlow)."""

    def __init__(self, channels: int, n_blocks: int, subnet: SubnetFactory, clamp: float = 2.0,
                 clamp_kind: str = "atan", cond_channels: int = 0, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)  # fixed permutations, global RNG untouched
        split = channels // 2
        self.channels = channels
        self.blocks = nn.ModuleList(
            AffineCoupling(channels, subnet(split + cond_channels, 2 * (channels - split), i),
                           torch.randperm(channels, generator=generator), clamp, clamp_kind)
            for i in range(n_blocks))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, ...) -> z of the same shape and log|det dz/dx| per position (B, ...)."""
        log_det = x.new_zeros(x.shape[:1] + x.shape[2:])
        for block in self.blocks:
            x, ld = block(x, cond)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        for block in reversed(self.blocks):
            z = block.inverse(z, cond)
        return z


def gaussian_log_likelihood(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """log p(x) per position = log N(z; 0, I) + log|det J|, summed over the channels (dim 1)."""
    return -0.5 * (z.square().sum(dim=1) + z.shape[1] * _LOG_2PI) + log_det
