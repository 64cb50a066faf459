"""A convolutional autoencoder baseline: what it cannot reconstruct is anomalous.

Reference: the L2 / SSIM autoencoder baselines of Bergmann, Löwe, Fauser, Sattlegger, Steger,
"Improving Unsupervised Defect Segmentation by Applying Structural Similarity to Autoencoders",
VISAPP 2019 (arXiv:1807.02011), also reported in the MVTec AD paper (CVPR 2019).

An encoder of strided convolutions squeezes the image into a small spatial code (H/16 x W/16 x
`latent_channels`); a mirrored decoder of transposed convolutions rebuilds it.  Trained on good
images only, it learns to rebuild normal texture and structure; defects are rebuilt wrongly.  The
anomaly map is the per-pixel reconstruction error: the squared error averaged over colour
channels ("l2") or 1 - SSIM ("ssim", which reacts to structure rather than brightness), smoothed
with a Gaussian (sigma 4); the image score is its maximum.  The training loss is L2, SSIM or
their sum (`loss`).

This is the honest floor of the model zoo: no pretrained features, no synthetic defects.  It is
weak on fine textures (it blurs them, so every textured pixel has some error) and when a defect is
easy to rebuild (a generic autoencoder generalises too well).

Training recipe: the paper trains on 128 px patches with a 100-d dense bottleneck, Adam
lr 2e-4, weight decay 1e-5.  Here: whole images, a spatial bottleneck (works at any input size,
exports as plain convolutions), Adam lr 1e-3, weight decay 1e-5, 40 epochs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..components.blur import gaussian_blur
from ..components.ssim import ssim_loss, ssim_map
from ..data.sample import Batch
from ..errors import AnomalensError, Interval, OneOf
from ..registry import register_model
from .base import AnomalyModel, AnomalyOutput

LEVELS = 4  # stride-2 stages: the code sits at 1/16 of the input size


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.2, inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.2, inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvAutoEncoder(nn.Module):
    """Images in [0, 1] -> reconstructions in [0, 1]; sides should be multiples of 16."""

    def __init__(self, width: int, latent_channels: int):
        super().__init__()
        widths = [width * 2**i for i in range(LEVELS)]
        self.encoder = nn.Sequential(*[_down(cin, cout) for cin, cout in zip([3, *widths[:-1]], widths, strict=True)],
                                     nn.Conv2d(widths[-1], latent_channels, 1))
        rev = widths[::-1]
        self.decoder = nn.Sequential(nn.Conv2d(latent_channels, rev[0], 1), nn.ReLU(inplace=True),
                                     *[_up(cin, cout) for cin, cout in zip(rev, [*rev[1:], width], strict=True)],
                                     nn.Conv2d(width, 3, 3, padding=1), nn.Sigmoid())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.encoder(images))
        if out.shape[-2:] != images.shape[-2:]:  # sides not divisible by 16
            out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return out


@register_model
class AutoEncoder(AnomalyModel):
    """Convolutional autoencoder; the reconstruction error is the anomaly map."""

    name = "autoencoder"
    description = "Convolutional autoencoder baseline: per-pixel reconstruction error (L2 or SSIM)."
    constraints = {
        "width": Interval(int, 1, 512),
        "latent_channels": Interval(int, 1, 4096),
        "loss": OneOf("l2", "ssim", "l2+ssim"),
        "score_map": OneOf("l2", "ssim"),
        "blur_sigma": Interval(float, 0, None),
    }
    defaults = {
        "width": 16,  # channels of the first stage, doubled at each of the 4 stages
        "latent_channels": 16,  # code depth at 1/16 resolution: the bottleneck that forgets defects
        "loss": "l2+ssim",
        "score_map": "l2",  # per-pixel squared error, or 1 - SSIM
        "blur_sigma": 4.0,
    }
    tags = {"trainable": True, "test_params": {"width": 4}, "test_training": {"max_epochs": 1, "max_steps": 2}}
    training_defaults = {
        "max_epochs": 40,
        "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-5},
    }

    def __init__(self, **params):
        super().__init__(**params)
        self.net = ConvAutoEncoder(self.hparams["width"], self.hparams["latent_channels"])
        self.register_trained_flag()

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        images = batch.image
        reconstruction = self.net(images)
        kind = self.hparams["loss"]
        losses = {}
        if "l2" in kind:
            losses["l2"] = F.mse_loss(reconstruction, images)
        if "ssim" in kind:
            losses["ssim"] = ssim_loss(reconstruction, images)
        self.mark_trained()
        return {"loss": sum(losses.values()), **losses}

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if not self.fitted:
            raise AnomalensError("AutoEncoder is not fitted; call fit() first.")
        reconstruction = self.net(images)
        if self.hparams["score_map"] == "l2":
            error = (images - reconstruction).pow(2).mean(dim=1, keepdim=True)
        else:
            error = 1 - ssim_map(images, reconstruction)
        anomaly_map = gaussian_blur(error, self.hparams["blur_sigma"])
        return AnomalyOutput(anomaly_map.amax(dim=(1, 2, 3)), anomaly_map)
