"""DFKDE: a Gaussian kernel density of globally pooled pretrained features, reduced by PCA.

Method: the "deep feature kernel density estimation" baseline of anomaly-detection toolkits,
built on the deep-feature density modelling of Ahuja et al. 2019 (arXiv:1909.11786) with a
non-parametric density in place of their Gaussian.

Each image becomes one vector: the backbone's feature maps, average-pooled over all positions and
concatenated over layers.  PCA of the good images keeps `n_components` (16) dimensions; a Gaussian
KDE with a full bandwidth matrix (data covariance x Scott's factor^2, as scipy.stats.gaussian_kde)
models their density.  The image score is the negative log density of the image's PCA
coordinates: low density under the good images = anomalous.

The anomaly map (the method itself is image-level): the pooled vector is the mean of the
per-position feature vectors f_p, so each position's share of the score can be measured exactly by
leaving it out: map_p = score(all positions) - score(all positions but p), i.e. how much less
anomalous the image would look without that patch.  Positions that pull the image away from the
good images get large values; the grid is upsampled and smoothed (Gaussian, sigma 4).  Its cost is
one KDE evaluation per position, which is small (N training images, K dims).

Deviations from the common recipe (ResNet18 layer4, 16 components, features divided by their
maximum norm, scores turned into probabilities with a fitted logistic):
- Backbone: EfficientNet-Lite0 blocks.4 + blocks.6 (112 + 320 channels) because its ImageNet
  weights ship offline.  Coarser layers are repeated (nearest) onto the finest layer's grid, so
  the leave-one-out map has that grid's resolution.
- No feature scaling and no logistic: the KDE's bandwidth follows the data covariance, so a global
  scale changes every log density by the same constant; and the post-processor normalises scores.
- `n_components` is capped at (training images - 1), the rank PCA can give.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..backbones import Backbone
from ..components.blur import upsample_and_blur
from ..components.kde import GaussianKDE, kde_log_density
from ..components.pca import PCA
from ..data.sample import Batch, images_of
from ..errors import STR, AnomalensError, DataError, Interval, ListOf
from ..progress import track
from ..registry import register_model
from .base import AnomalyModel, AnomalyOutput


@register_model
class DFKDE(AnomalyModel):
    """Gaussian KDE of PCA-reduced, globally pooled deep features; leave-one-position-out maps."""

    name = "dfkde"
    description = "Kernel density of PCA-reduced, pooled pretrained features; image-level (Ahuja et al. 2019 style)."
    constraints = {
        "backbone": STR,
        "layers": ListOf(STR),
        "weights": STR,
        "n_components": Interval(int, 1, None),
        "max_training_points": Interval(int, 2, None),
        "blur_sigma": Interval(float, 0, None),
        "seed": Interval(int, 0, None),
    }
    defaults = {
        "backbone": "tf_efficientnet_lite0",
        "layers": ["blocks.4", "blocks.6"],
        "weights": "imagenet",
        "n_components": 16,  # PCA dimensions the density lives in
        "max_training_points": 40000,  # random subset of training images kept in the KDE beyond this
        "blur_sigma": 4.0,
        "seed": 0,
    }
    # The suite fits 8 images (rank 7); stride-8 features give an 8x8 grid on its 64 px inputs.
    tags = {"trainable": False, "test_params": {"layers": ["blocks.2"], "n_components": 4}}

    def __init__(self, **params):
        super().__init__(**params)
        hp = self.hparams
        self.backbone = Backbone(hp["backbone"], hp["layers"], hp["weights"])
        # Fitted state: PCA (mean, components) and the whitened KDE (whiten, points, log_norm).
        for name, shape in (("mean", (0,)), ("components", (0, 0)), ("whiten", (0, 0)), ("points", (0, 0)),
                            ("log_norm", ())):
            self.register_buffer(name, torch.zeros(shape))

    @property
    def fitted(self) -> bool:
        return self.points.numel() > 0

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D, h, w) features on the finest layer's grid (nearest repeats keep the means)."""
        features = self.backbone(images)
        size = max((f.shape[-2:] for f in features), key=lambda s: s[0] * s[1])
        features = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest") for f in features]
        return torch.cat(features, dim=1)

    @torch.no_grad()
    def fit(self, batches: Iterable[Batch]) -> DFKDE:
        """One pass over good images: pooled vectors -> PCA -> Gaussian KDE."""
        hp = self.hparams
        device = self.mean.device
        vectors = []
        for batch in track(batches, "DFKDE: extracting features"):
            images = images_of(batch)
            vectors.append(self._embed(images.to(device)).mean(dim=(2, 3)))
        if not vectors:
            raise DataError("DFKDE.fit got no training images; give it at least 2 good images.")
        x = torch.cat(vectors)
        if len(x) > hp["max_training_points"]:
            generator = torch.Generator().manual_seed(hp["seed"])
            x = x[torch.randperm(len(x), generator=generator)[: hp["max_training_points"]].to(device)]
        pca = PCA.fit(x, hp["n_components"])
        kde = GaussianKDE.fit(pca.project(x))
        self.mean, self.components = pca.mean, pca.components
        self.whiten, self.points, self.log_norm = kde.whiten, kde.points, kde.log_norm
        return self

    def _score(self, z: torch.Tensor) -> torch.Tensor:
        return -kde_log_density(z, self.whiten, self.points, self.log_norm)

    def position_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and the leave-one-position-out contributions (B, 1, h, w) on the feature grid."""
        if not self.fitted:
            raise AnomalensError("DFKDE is not fitted; call fit() first.")
        embedding = self._embed(images)
        b, _, h, w = embedding.shape
        # PCA is affine, so the pooled vector's coordinates are the mean of the positions' coordinates.
        z_pos = (embedding.flatten(2).transpose(1, 2) - self.mean) @ self.components.T  # (B, P, K)
        z = z_pos.mean(dim=1)
        score = self._score(z)
        p = h * w
        if p == 1:  # a single position carries the whole score
            return score, score.reshape(b, 1, 1, 1)
        z_without = (p * z.unsqueeze(1) - z_pos) / (p - 1)  # pooled coordinates with position p left out
        return score, (score.unsqueeze(1) - self._score(z_without)).reshape(b, 1, h, w)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        score, contribution = self.position_scores(images)
        anomaly_map = upsample_and_blur(contribution, tuple(images.shape[-2:]), self.hparams["blur_sigma"])
        return AnomalyOutput(score=score, anomaly_map=anomaly_map)
