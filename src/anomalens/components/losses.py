"""Segmentation losses shared by models trained on synthetic anomalies."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss (Lin et al. 2017), -(1 - p_t)^gamma log p_t, over every pixel.

    logits: (B, K, H, W) class scores; target: (B, H, W) or (B, 1, H, W) class indices (a {0, 1}
    mask for K = 2).  gamma = 0 gives the plain cross-entropy.  Log-softmax keeps it finite even
    for saturated logits.
    """
    target = target.reshape(logits.shape[0], *logits.shape[2:]).long()
    log_p = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    return (-(1 - log_p.exp()).pow(gamma) * log_p).mean()
