"""CFLOW-AD: conditional normalising flows on patch vectors, conditioned on their position.

Paper: Gudovskiy, Ishizaka, Kozuka, "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with
Localization via Conditional Normalizing Flows", WACV 2022 (arXiv:2107.12571).

A frozen pretrained encoder gives feature maps at several scales ("pooling levels").  Every
position's C-dimensional feature vector is one sample; its condition is a 2D sinusoidal positional
encoding of (row, column) with `condition_dim` (128) channels.  Each level has its own decoder: a
conditional flow of `coupling_blocks` (8) affine couplings with fully connected subnets
(components/flows.py), log-scales soft-clamped at alpha = 1.9.  Training maximises the likelihood
of the vectors of good images, as in the paper: the encoder runs once per image batch, then all of
the batch's patch vectors ("fibers") are shuffled and cut into fiber batches of N = `fiber_batch`,
one optimiser step each (the model's `training_units`); the loss is the negative log-likelihood per
dimension, -(log N(z; 0, I) + log|det J|) / C.  Because the subnets are fully connected, each
vector's log-likelihood is exact.

Anomaly map, as in the paper: per level the per-dimension log-likelihood of every position is
normalised by the level's maximum and exponentiated, p = exp(logp - max), upsampled (bilinear) to
the input size; the map is the sum over levels of (1 - p), smoothed (Gaussian, sigma 4), and the
image score is its maximum.  The paper normalises by the maximum over the *test* set, which makes
an image's score depend on the other images; here the maximum is taken over the training images
(stored with the model, capped at 1), so every image is scored on its own and exports as one graph.

Training recipe (paper): Adam, lr 2e-4 with warm-up and cosine decay, 8 coupling blocks, clamp
alpha 1.9, condition vector 128, fiber batches of N = 256, WideResNet50 at strides 8/16/32, up to
25 x 8 epochs.  CPU default here: lr 1e-3 without schedule, 3 epochs (on a GPU: trainer.max_epochs
50+, trainer.optimizer.lr 2.0e-4 with trainer.scheduler {name: cosine}).

Deviations from the paper:
- Backbone: EfficientNet-Lite0 blocks.2/4/6 (40/112/320 channels, strides 8/16/32) instead of
  WideResNet50 layers 2-4, because its ImageNet weights ship offline.
- The map normalisation uses the training maximum (above), not the test set's.
- Features are standardised per channel with statistics of the first training batches (a fixed
  affine map: the log-likelihoods only shift by a per-level constant, which the max-normalisation
  removes) and the subnets' last layers start at zero (identity flow); both stabilise early training.
- A higher learning rate than the paper's, for the few CPU epochs.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from ..components.blur import upsample_and_blur
from ..components.flows import CouplingFlow, gaussian_log_likelihood
from ..data.sample import Batch
from ..errors import STR, AnomalensError, Interval, ListOf, param_error
from ..registry import register_model
from .base import AnomalyModel, AnomalyOutput

STATS_BATCHES = 4  # training batches used for the per-channel feature statistics


def positional_encoding_2d(channels: int, height: int, width: int, device=None) -> torch.Tensor:
    """(channels, height, width) sinusoidal encoding: the first half encodes the column, the second the row.

    Each half holds sin/cos pairs at geometrically spaced frequencies (as in the Transformer's 1D
    encoding), so nearby positions get similar vectors and every position a distinct one.
    """
    quarter = channels // 4
    freq = torch.exp(torch.arange(quarter, device=device, dtype=torch.float32) * (-math.log(10000.0) / quarter))
    cols = torch.arange(width, device=device, dtype=torch.float32)[:, None] * freq  # (W, quarter)
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None] * freq  # (H, quarter)
    col_code = torch.stack([cols.sin(), cols.cos()], dim=-1).reshape(width, 2 * quarter).T  # (C/2, W)
    row_code = torch.stack([rows.sin(), rows.cos()], dim=-1).reshape(height, 2 * quarter).T  # (C/2, H)
    return torch.cat([col_code[:, None, :].expand(-1, height, -1), row_code[:, :, None].expand(-1, -1, width)])


@dataclass
class FiberBatch:
    """One optimiser step's patch vectors ("fibers") of one level: (n, C) vectors, (n, P) conditions."""

    level: int
    vectors: torch.Tensor
    conditions: torch.Tensor


def _fc_subnet(c_in: int, c_out: int, index: int) -> nn.Module:
    """Fully connected coupling subnet, hidden width twice its input (the authors' choice)."""
    return nn.Sequential(nn.Linear(c_in, 2 * c_in), nn.ReLU(), nn.Linear(2 * c_in, c_out))


class _Standardise(nn.Module):
    """Per-channel (x - mean) / std with statistics fitted once; identity until then."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C, h, w)
        return (x - self.mean[:, None, None]) / self.std[:, None, None]


@register_model
class CFlow(AnomalyModel):
    """Position-conditioned normalising flows on patch vectors of a frozen encoder."""

    name = "cflow"
    description = "Conditional normalising flows on position-encoded patch features (Gudovskiy et al. 2022)."
    constraints = {
        "backbone": STR,
        "layers": ListOf(STR),
        "weights": STR,
        "coupling_blocks": Interval(int, 1, 64),
        "condition_dim": Interval(int, 4, 1024),
        "clamp": Interval(float, 0, 10, closed="right"),
        "fiber_batch": Interval(int, 1, None),
        "blur_sigma": Interval(float, 0, None),
        "seed": Interval(int, 0, None),
    }
    defaults = {
        "backbone": "tf_efficientnet_lite0",
        "layers": ["blocks.2", "blocks.4", "blocks.6"],
        "weights": "imagenet",
        "coupling_blocks": 8,  # per level (paper: 8)
        "condition_dim": 128,  # positional-encoding channels, a multiple of 4 (paper: 128)
        "clamp": 1.9,  # soft bound alpha of the log-scales (paper: 1.9)
        "fiber_batch": 256,  # patch vectors per optimiser step (paper: N = 256)
        "blur_sigma": 4.0,
        "seed": 0,  # channel permutations
    }
    tags = {"trainable": True, "test_params": {"layers": ["blocks.2", "blocks.4"], "condition_dim": 16},
            "test_training": {"max_epochs": 1, "max_steps": 2}}
    training_defaults = {
        "max_epochs": 3,
        "optimizer": {"name": "adam", "lr": 1e-3},
    }

    def __init__(self, **params):
        super().__init__(**params)
        hp = self.hparams
        if hp["condition_dim"] % 4:
            raise param_error(type(self).__name__, "condition_dim", "a multiple of 4 in [4, 1024]",
                              hp["condition_dim"])
        self.backbone = Backbone(hp["backbone"], hp["layers"], hp["weights"])
        self.norms = nn.ModuleList(_Standardise(c) for c in self.backbone.channels)
        self.flows = nn.ModuleList(
            CouplingFlow(c, hp["coupling_blocks"], _fc_subnet, hp["clamp"], cond_channels=hp["condition_dim"],
                         seed=hp["seed"] + i)
            for i, c in enumerate(self.backbone.channels))
        # Per-level maximum log-likelihood over the training images; empty until fitted.
        self.register_buffer("level_max", torch.empty(0))

    @property
    def fitted(self) -> bool:
        return self.level_max.numel() == len(self.flows)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return [norm(f) for norm, f in zip(self.norms, self.backbone(images), strict=True)]

    def _vectors(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) -> position-major vectors (B h w, C) and their conditions (B h w, P)."""
        b, c, h, w = feature.shape
        cond = positional_encoding_2d(self.hparams["condition_dim"], h, w, feature.device).to(feature.dtype)
        cond = cond.flatten(1).T.repeat(b, 1)
        return feature.permute(0, 2, 3, 1).reshape(-1, c), cond

    def _log_likelihood_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per level, the per-dimension log-likelihood of every position, (B, h, w)."""
        maps = []
        for flow, feature in zip(self.flows, self._features(images), strict=True):
            b, c, h, w = feature.shape
            x, cond = self._vectors(feature)
            z, log_det = flow(x, cond)
            maps.append((gaussian_log_likelihood(z, log_det) / c).reshape(b, h, w))
        return maps

    # -- training ----------------------------------------------------------------------------
    @torch.no_grad()
    def on_train_start(self, batches: Iterable[Batch]) -> None:
        """Per-channel feature statistics from the first few training batches."""
        sums = None
        for i, batch in enumerate(batches):
            if i == STATS_BATCHES:
                break
            features = self.backbone(batch.image)
            stats = [(f.sum((0, 2, 3)), f.square().sum((0, 2, 3)), f.numel() / f.shape[1]) for f in features]
            sums = stats if sums is None else [tuple(a + b for a, b in zip(s, t, strict=True))
                                               for s, t in zip(sums, stats, strict=True)]
        for norm, (total, squares, count) in zip(self.norms, sums or [], strict=False):
            mean = total / count
            norm.mean.copy_(mean)
            norm.std.copy_((squares / count - mean.square()).clamp_min(1e-12).sqrt().clamp_min(1e-3))

    def training_units(self, batch: Batch) -> Iterator[FiberBatch]:
        """The paper's fiber batches: every patch vector of the image batch once, in random order, in
        chunks of `fiber_batch` per level; each chunk is one optimiser step of that level's flow."""
        n = self.hparams["fiber_batch"]
        for level, feature in enumerate(self._features(batch.image)):
            x, cond = self._vectors(feature)
            for index in torch.randperm(len(x), device=x.device).split(n):
                yield FiberBatch(level, x[index], cond[index])

    def training_step(self, batch: FiberBatch | Batch) -> dict[str, torch.Tensor]:
        """Negative log-likelihood per dimension of a fiber batch (of every vector of an image batch:
        the validation loss)."""
        if isinstance(batch, FiberBatch):
            units = [batch]
        else:
            units = [FiberBatch(level, *self._vectors(feature))
                     for level, feature in enumerate(self._features(batch.image))]
        losses = []
        for unit in units:
            z, log_det = self.flows[unit.level](unit.vectors, unit.conditions)
            losses.append(-(gaussian_log_likelihood(z, log_det) / unit.vectors.shape[1]).mean())
        return {"loss": torch.stack(losses).mean()}

    @torch.no_grad()
    def prepare_inference(self, batches: Iterable[Batch]) -> None:
        """The per-level maximum log-likelihood over the training images normalises the maps."""
        level_max = torch.full((len(self.flows),), -torch.inf, device=self.level_max.device)
        for batch in batches:
            maps = self._log_likelihood_maps(batch.image)
            level_max = torch.maximum(level_max, torch.stack([m.amax() for m in maps]))
        self.level_max = level_max

    # -- inference ---------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if not self.fitted:
            raise AnomalensError("CFlow is not fitted; train it first (Engine.fit or model.fit).")
        size = tuple(images.shape[-2:])
        anomaly_map = torch.zeros(images.shape[0], 1, *size, device=images.device, dtype=images.dtype)
        for level, log_p in enumerate(self._log_likelihood_maps(images)):
            # Clamped at 1: whatever is as likely as the likeliest training patch is simply normal.
            prob = torch.exp((log_p - self.level_max[level]).clamp(max=0.0)).unsqueeze(1)
            anomaly_map = anomaly_map + 1 - F.interpolate(prob, size=size, mode="bilinear", align_corners=False)
        anomaly_map = upsample_and_blur(anomaly_map, size, self.hparams["blur_sigma"])
        return AnomalyOutput(score=anomaly_map.amax(dim=(1, 2, 3)), anomaly_map=anomaly_map)
