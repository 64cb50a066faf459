"""FastFlow: a 2D normalising flow per feature level of a frozen pretrained backbone.

Paper: Yu, Zheng, Ma, Wang, Wu, Zhang, "FastFlow: Unsupervised Anomaly Detection and Localization
via 2D Normalizing Flows", 2021 (arXiv:2111.07677).

Each backbone level's feature map is layer-normalised and mapped by its own flow, a stack of
`flow_steps` affine coupling blocks (components/flows.py) whose subnets are small convolution
stacks (conv k x k -> ReLU -> conv k x k, k alternating 3 and 1 from block to block as in the
paper's ResNet setting), with soft-clamped scales and a fixed channel permutation after each
block.  Working on the 2D map (not on independent vectors) lets each block see the neighbourhood.
Training maximises the likelihood of good features: the loss is the negative log-likelihood per
dimension, -(log N(z; 0, I) + log|det J|) / (C h w), averaged over levels and images.

Anomaly map, as in the paper: each level's per-position likelihood exp(-0.5 mean_c z^2) is
upsampled (bilinear) to the input size, the levels are averaged, and the map is one minus that
mean, smoothed (Gaussian, sigma 4); the image score is the map's maximum.  Positions whose
features the flow cannot send near the origin of the latent Gaussian are anomalous.

Training recipe (paper): Adam, lr 1e-3, weight decay 1e-5, 500 epochs, batch 32, 8 flow steps,
hidden ratio 1.0 (ResNet18) / 0.16 (WideResNet50), clamp 2.0, ResNet layers 1-3.  CPU default here:
the same optimizer for 10 epochs (override trainer.max_epochs: 500 on a GPU).

Deviations from the paper:
- Backbone: EfficientNet-Lite0 blocks.1/2/4 (24/40/112 channels, strides 4/8/16) instead of ResNet
  layers 1-3, because its ImageNet weights ship offline.
- LayerNorm without its learned element-wise affine: that affine is shaped (C, h, w) and would tie
  the model to one input size; the first coupling block can absorb a per-channel scale anyway.
- The subnets' last layers start at zero (each block starts as the identity, as in Glow) instead of
  FrEIA's random init scaled by 0.1; and the map is smoothed like the other models' maps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from ..components.blur import upsample_and_blur
from ..components.flows import CouplingFlow, gaussian_log_likelihood
from ..data.sample import Batch
from ..errors import BOOL, STR, AnomalensError, Interval, ListOf
from ..registry import register_model
from .base import AnomalyModel, AnomalyOutput


def _conv_subnet(channels: int, hidden_ratio: float, conv3x3_only: bool):
    """Subnet factory for one level: conv k x k -> ReLU -> conv k x k, k = 3 on even blocks, 1 on odd ones."""
    hidden = max(1, round(hidden_ratio * channels))  # the paper sizes the width from the level's channels

    def build(c_in: int, c_out: int, index: int) -> nn.Module:
        k = 3 if conv3x3_only or index % 2 == 0 else 1
        return nn.Sequential(nn.Conv2d(c_in, hidden, k, padding=k // 2), nn.ReLU(),
                             nn.Conv2d(hidden, c_out, k, padding=k // 2))
    return build


@register_model
class FastFlow(AnomalyModel):
    """Per-level 2D normalising flows over frozen pretrained features; likelihood maps."""

    name = "fastflow"
    description = "2D normalising flows on pretrained feature maps, likelihood maps (Yu et al. 2021)."
    constraints = {
        "backbone": STR,
        "layers": ListOf(STR),
        "weights": STR,
        "flow_steps": Interval(int, 1, 64),
        "hidden_ratio": Interval(float, 0, 16, closed="right"),
        "clamp": Interval(float, 0, 10, closed="right"),
        "conv3x3_only": BOOL,
        "blur_sigma": Interval(float, 0, None),
        "seed": Interval(int, 0, None),
    }
    defaults = {
        "backbone": "tf_efficientnet_lite0",
        "layers": ["blocks.1", "blocks.2", "blocks.4"],
        "weights": "imagenet",
        "flow_steps": 8,  # coupling blocks per level (paper: 8)
        "hidden_ratio": 1.0,  # subnet width / level channels (paper: 1.0 ResNet18, 0.16 WideResNet50)
        "clamp": 2.0,  # soft bound of the log-scales (paper / FrEIA: 2.0)
        "conv3x3_only": False,  # paper: alternate 3x3 and 1x1 for ResNets, 3x3 only for the transformers
        "blur_sigma": 4.0,
        "seed": 0,  # channel permutations
    }
    tags = {"trainable": True, "test_training": {"max_epochs": 1, "max_steps": 2}}
    training_defaults = {
        "max_epochs": 10,
        "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-5},
    }

    def __init__(self, **params):
        super().__init__(**params)
        hp = self.hparams
        self.backbone = Backbone(hp["backbone"], hp["layers"], hp["weights"])
        self.flows = nn.ModuleList(
            CouplingFlow(c, hp["flow_steps"], _conv_subnet(c, hp["hidden_ratio"], hp["conv3x3_only"]), hp["clamp"],
                         seed=hp["seed"] + i)
            for i, c in enumerate(self.backbone.channels))
        self.register_trained_flag()

    def _latents(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(z, log-det per position) for every level."""
        with torch.no_grad():
            features = self.backbone(images)
        # Per-image LayerNorm over (C, h, w), as in the paper (without its size-bound affine).
        return [flow(F.layer_norm(f, f.shape[1:])) for flow, f in zip(self.flows, features, strict=True)]

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        nll = [-gaussian_log_likelihood(z, log_det).mean() / z.shape[1] for z, log_det in self._latents(batch.image)]
        self.mark_trained()
        return {"loss": torch.stack(nll).mean()}

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if not self.fitted:
            raise AnomalensError("FastFlow is not fitted; train it first (Engine.fit or model.fit).")
        size = tuple(images.shape[-2:])
        likelihood = torch.zeros(images.shape[0], 1, *size, device=images.device, dtype=images.dtype)
        for z, _ in self._latents(images):
            level = torch.exp(-0.5 * z.square().mean(dim=1, keepdim=True))
            likelihood = likelihood + F.interpolate(level, size=size, mode="bilinear", align_corners=False)
        anomaly_map = upsample_and_blur(1 - likelihood / len(self.flows), size, self.hparams["blur_sigma"])
        return AnomalyOutput(score=anomaly_map.amax(dim=(1, 2, 3)), anomaly_map=anomaly_map)
