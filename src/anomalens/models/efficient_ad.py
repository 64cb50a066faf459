"""EfficientAD: a small student-teacher pair plus an autoencoder for logical anomalies.

Paper: Batzner, Heckler, König, "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024 (arXiv:2303.14535).

Three fully convolutional networks work on the image at stride 4:
- a teacher patch description network (PDN, receptive field 33 px), distilled once from a large
  pretrained CNN and then frozen; its outputs are normalised per channel with training statistics;
- a student PDN with twice the teacher's output channels: the first half imitates the teacher
  (trained with a hard-feature loss: only the squared errors above their 0.999 quantile count,
  plus a penalty that keeps the student's output small on foreign "pretraining" images), the
  second half imitates the autoencoder;
- an autoencoder that squeezes the whole image into a 64-d code and rebuilds the teacher's output,
  so it fails on logical anomalies (misplaced or missing parts) that look locally normal.
Training images are colour-augmented (brightness, contrast or saturation x U(0.8, 1.2)) for the
autoencoder branch.  At test time the two maps, mean_c (T - S_st)^2 and mean_c (A - S_ae)^2, are
each normalised with their 0.9 and 0.995 quantiles (q_a -> 0, q_b -> 0.1), averaged, upsampled to
the input size and smoothed; the image score is the map's maximum.

Training recipe (paper): Adam, lr 1e-4, weight decay 1e-5, 70 000 steps of batch 1, lr x 0.1
after 95 % of the steps; PDN widths 128/256 (S) and 256/512 (M), 384 output channels; teacher
distilled for 60 000 steps on ImageNet from WideResNet-101 features.

CPU default here (about 10 CPU-minutes for 80 images at 256 px): width 0.25, 12 epochs of
batch 1 as in the paper (`trainer.batch_size`, whatever the dataset's batch size) with lr 1e-3,
lr x 0.1 for the last epoch, a 300-step teacher distillation, student and teacher trained on random 128 px crops (the PDN only
sees 33 px, so crops lose nothing; the autoencoder always sees the whole image), and hard-feature
quantile 0.9: with ~1000 steps, training only the top 0.1 % of the errors leaves the student
behind (demo brick at 128 px, image / pixel AUROC: 0.71 / 0.63 at 0.999, 0.81 / 0.80 at 0.99,
0.84 / 0.87 at 0.9, 0.80 / 0.89 with no mining).  On a GPU set width: 1.0, train_crop: 0,
hard_quantile: 0.999, distill_steps: 10000, trainer.optimizer.lr: 0.0001 and enough epochs for
~70 000 images.  At the CPU budget the autoencoder branch is under-trained (measured below).
Why batch 1: with 12 epochs over a few dozen images, batches of 32 leave the student ~24 optimiser
steps; batch 1 gives one per image for about the same fit time (128 px, 60 training images, image
/ pixel AUROC with batch 32 -> batch 1: demo brick 0.590 / 0.824 -> 0.821 / 0.974, flange
0.496 / 0.638 -> 0.662 / 0.813, magnetic tiles 0.576 / 0.558 -> 0.651 / 0.590).
Run-to-run spread: the training draws crops, jitter and batch order at random, and the short
schedule does not converge, so results move with the seed (and with the thread count, through
float rounding).  Full demo brick at 128 px, seeds 42 and 1-5, one thread: image AUROC 0.825-0.909
(mean 0.869), pixel 0.964-0.980; the student-teacher map alone gave 0.861-0.923 (mean 0.893): at
this budget the autoencoder branch costs ~0.02 on brick.  It is kept for logical defects: on demo
flange (missing and misplaced holes, seed 42) the combined map gave 0.691 against 0.666 alone.

Deviations from the paper (no hub downloads here):
- Teacher: distilled inside `fit` (in `on_train_start`, once; its weights are part of the
  checkpoint) from our offline ImageNet EfficientNet-Lite0 (blocks.2 + blocks.4, 3x3-averaged
  as in PatchCore, upsampled to stride 4, 152 channels standardised per channel) instead of
  WideResNet-101, on random crops of the training images plus scikit-image's bundled natural
  photographs (a stand-in for ImageNet).  The output channels follow the chosen layers.
- Penalty images: the same scikit-image photographs instead of ImageNet.
- Map quantiles are computed on the training images (the Trainer's `prepare_inference`) instead
  of a separate validation set of good images: no good image is held back from training.
- Convolutions are zero-padded so the maps are exactly H/4 x W/4 and align with the image
  (the paper's unpadded PDN needs a border correction); the autoencoder's upsampling sizes are
  the paper's, scaled to the output grid.  The map is Gaussian-smoothed (sigma 4).
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..components.blur import upsample_and_blur
from ..components.synthetic import natural_photos, random_crops
from ..data.sample import Batch
from ..errors import STR, AnomalensError, DataError, Interval, ListOf, OneOf
from ..progress import bar
from ..registry import register_model
from .base import AnomalyModel, AnomalyOutput

MAP_QUANTILES = (0.9, 0.995)  # q_a -> 0 and q_b -> 0.1 in the normalised maps
AE_CODE = 64  # the autoencoder's bottleneck size (paper: 64)
AE_SIZES = (3, 8, 15, 32, 63, 127)  # the paper's decoder upsampling sizes for a 56 x 56 output
DISTILL_LR = 1e-3  # Adam, for the short CPU distillation (the paper: 1e-4 over 60 000 steps)
MAX_DISTILL_IMAGES = 256  # training images kept in memory for distillation
EDGE_CELLS = 4  # output cells whose 33 px receptive field reaches past a crop edge


# --------------------------------------------------------------------------- networks
def _conv(cin: int, cout: int, k: int) -> nn.Sequential:
    """Stride-1 convolution that keeps the size; even kernels pad one more on the bottom/right."""
    lo = (k - 1) // 2
    return nn.Sequential(nn.ZeroPad2d((lo, k - 1 - lo, lo, k - 1 - lo)), nn.Conv2d(cin, cout, k))


def pdn(variant: str, out_channels: int, width: float) -> nn.Sequential:
    """Patch description network (paper Tables 5, 6): stride 4, receptive field 33 px."""
    relu = nn.ReLU(inplace=True)
    if variant == "small":
        a, b = max(8, round(128 * width)), max(8, round(256 * width))
        return nn.Sequential(_conv(3, a, 4), relu, nn.AvgPool2d(2), _conv(a, b, 4), relu, nn.AvgPool2d(2),
                             _conv(b, b, 3), relu, _conv(b, out_channels, 4))
    a, b = max(8, round(256 * width)), max(8, round(512 * width))
    return nn.Sequential(_conv(3, a, 4), relu, nn.AvgPool2d(2), _conv(a, b, 4), relu, nn.AvgPool2d(2),
                         _conv(b, b, 1), relu, _conv(b, b, 3), relu, _conv(b, out_channels, 4), relu,
                         _conv(out_channels, out_channels, 1))


class EfficientAutoEncoder(nn.Module):
    """Paper Table 7: six strided convs to a 1 x 1 code, eight upsample + conv stages back to the grid."""

    def __init__(self, out_channels: int, width: float):
        super().__init__()
        a, b = max(8, round(32 * width)), max(8, round(64 * width))
        enc = [nn.Conv2d(3, a, 4, 2, 1), nn.Conv2d(a, a, 4, 2, 1), nn.Conv2d(a, b, 4, 2, 1),
               nn.Conv2d(b, b, 4, 2, 1), nn.Conv2d(b, b, 4, 2, 1)]
        self.encoder = nn.Sequential(*[m for conv in enc for m in (conv, nn.ReLU(inplace=True))])
        self.code = nn.Conv2d(b, AE_CODE, 8)  # 8 x 8 -> 1 x 1 on a 256 px input
        self.up = nn.ModuleList([nn.Sequential(nn.Conv2d(AE_CODE if i == 0 else b, b, 4, 1, 2), nn.ReLU(inplace=True),
                                               nn.Dropout(0.2)) for i in range(len(AE_SIZES))])
        self.head = nn.Sequential(nn.Conv2d(b, b, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(b, out_channels, 3, 1, 1))

    def forward(self, images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        # The encoder is built for 256 px (the paper's size); other sizes are resampled to it.
        if tuple(images.shape[-2:]) != (256, 256):
            images = F.interpolate(images, size=(256, 256), mode="bilinear", align_corners=False)
        x = self.code(self.encoder(images))
        for size, stage in zip(AE_SIZES, self.up, strict=True):
            scaled = (max(1, round(size * out_size[0] / 56)), max(1, round(size * out_size[1] / 56)))
            x = stage(F.interpolate(x, size=scaled, mode="bilinear", align_corners=False))
        return self.head(F.interpolate(x, size=out_size, mode="bilinear", align_corners=False))


def _colour_jitter(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The paper's AE augmentation: one of brightness, contrast, saturation scaled by U(0.8, 1.2)."""
    factor, kind = float(rng.uniform(0.8, 1.2)), int(rng.integers(3))
    if kind == 0:
        out = images * factor
    else:
        grey = (0.299 * images[:, :1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3])
        anchor = grey.mean(dim=(1, 2, 3), keepdim=True) if kind == 1 else grey
        out = anchor + factor * (images - anchor)
    return out.clamp(0, 1)


@lru_cache(maxsize=8)
def _target_channels(backbone: str, layers: tuple[str, ...]) -> int:
    """Channels of the distillation target, read from timm's feature info (no weights loaded)."""
    from ..backbones import Backbone

    return sum(Backbone(backbone, layers, "none").channels)


def _crop(image: torch.Tensor, size: tuple[int, int], rng: np.random.Generator) -> torch.Tensor:
    y, x = int(rng.integers(image.shape[-2] - size[0] + 1)), int(rng.integers(image.shape[-1] - size[1] + 1))
    return image[..., y:y + size[0], x:x + size[1]]


def _quantile(values: torch.Tensor, q: float) -> float:
    return float(np.quantile(values.detach().double().cpu().numpy(), q))


# --------------------------------------------------------------------------- model
@register_model
class EfficientAD(AnomalyModel):
    """PDN student-teacher with a hard-feature loss plus an autoencoder branch; quantile-normalised maps."""

    name = "efficient_ad"
    description = "PDN student-teacher with hard-feature loss and an autoencoder for logical defects (Batzner 2024)."
    constraints = {
        "variant": OneOf("small", "medium"),
        "width": Interval(float, 0, 4, "right"),
        "backbone": STR,
        "layers": ListOf(STR),
        "weights": STR,
        "distill_steps": Interval(int, 1, None),
        "distill_batch": Interval(int, 1, None),
        "train_crop": Interval(int, 0, None),
        "hard_quantile": Interval(float, 0, 1, "left"),
        "blur_sigma": Interval(float, 0, None),
    }
    defaults = {
        "variant": "small",  # small = EfficientAD-S, medium = EfficientAD-M
        "width": 0.25,  # PDN / AE hidden width multiplier (paper: 1.0)
        "backbone": "tf_efficientnet_lite0",  # the network the teacher PDN is distilled from
        "layers": ["blocks.2", "blocks.4"],
        "weights": "imagenet",
        "distill_steps": 300,  # teacher distillation steps in fit (paper: 60 000 on ImageNet)
        "distill_batch": 8,
        "train_crop": 128,  # student and teacher train on random crops of this side (0 = whole images)
        "hard_quantile": 0.9,  # only student errors above this quantile are trained on (paper: 0.999)
        "blur_sigma": 4.0,
    }
    tags = {"trainable": True, "test_params": {"width": 0.125, "distill_steps": 2, "distill_batch": 2},
            "test_training": {"max_epochs": 1, "max_steps": 2}}
    training_defaults = {
        "max_epochs": 12,
        "batch_size": 1,  # the paper's; every image is an optimiser step (see the module notes)
        "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-5},
        "scheduler": {"name": "multistep", "milestones": [11], "gamma": 0.1},
    }

    def __init__(self, **params):
        super().__init__(**params)
        hp = self.hparams
        self.channels = channels = _target_channels(hp["backbone"], tuple(hp["layers"]))
        self.teacher = pdn(hp["variant"], channels, hp["width"]).requires_grad_(False)
        self.student = pdn(hp["variant"], 2 * channels, hp["width"])
        self.autoencoder = EfficientAutoEncoder(channels, hp["width"])
        self.register_buffer("teacher_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, channels, 1, 1))
        self.register_buffer("teacher_ready", torch.tensor(False))
        # Map normalisation (q_a, q_b) for the student-teacher and the autoencoder maps; empty until
        # `prepare_inference`, and "fitted" is read from their shape so that forward stays exportable.
        self.register_buffer("st_quantiles", torch.empty(0))
        self.register_buffer("ae_quantiles", torch.empty(0))
        self._penalty: torch.Tensor | None = None  # foreign images, training only (not in the checkpoint)

    @property
    def fitted(self) -> bool:
        return self.st_quantiles.numel() > 0

    def train(self, mode: bool = True) -> EfficientAD:
        super().train(mode)
        self.teacher.train(False)  # frozen: never in training mode
        return self

    # -- teacher ------------------------------------------------------------------------------
    def _rng(self) -> np.random.Generator:
        # Drawn from torch's generator, so a seeded run is reproducible end to end.
        return np.random.default_rng(int(torch.randint(2**31 - 1, (1,))))

    def _crop_size(self, size: tuple[int, int]) -> tuple[int, int]:
        side = self.hparams["train_crop"]
        return size if side == 0 else (min(side, size[0]), min(side, size[1]))

    def _distill_teacher(self, images: torch.Tensor) -> None:
        """Fit the teacher PDN to standardised backbone features of training crops and natural photos."""
        from ..backbones import Backbone

        hp, device = self.hparams, self.teacher_mean.device
        extractor = Backbone(hp["backbone"], hp["layers"], hp["weights"]).to(device)
        crop = self._crop_size(tuple(images.shape[-2:]))
        photos, rng = natural_photos(), self._rng()

        def draw(n: int) -> torch.Tensor:
            # Half training-image crops (random flips), half natural photos: the teacher must describe both.
            k = n // 2
            own = torch.stack([_crop(images[i], crop, rng) for i in rng.integers(len(images), size=n - k)]).to(device)
            own = torch.where(torch.from_numpy(rng.random((len(own), 1, 1, 1)) < 0.5).to(device), own.flip(-1), own)
            return torch.cat([own, random_crops(photos, k, crop, rng).to(device)]) if k else own

        @torch.no_grad()
        def target(x: torch.Tensor) -> torch.Tensor:
            grid = (x.shape[-2] // 4, x.shape[-1] // 4)
            feats = [F.interpolate(F.avg_pool2d(f, 3, 1, 1), size=grid, mode="bilinear", align_corners=False)
                     for f in extractor(x)]
            return torch.cat(feats, dim=1)

        # Per-channel statistics of the targets, so every channel counts alike in the MSE.
        sample = torch.cat([target(draw(hp["distill_batch"])) for _ in range(4)])
        mean, std = sample.mean(dim=(0, 2, 3), keepdim=True), sample.std(dim=(0, 2, 3), keepdim=True) + 1e-6
        self.teacher.requires_grad_(True)
        optimizer = torch.optim.Adam(self.teacher.parameters(), lr=DISTILL_LR, weight_decay=1e-5)
        with torch.enable_grad(), bar("EfficientAD: distilling the teacher", total=hp["distill_steps"]) as progress:
            for _ in range(hp["distill_steps"]):
                x = draw(hp["distill_batch"])
                loss = (self.teacher(x) - (target(x) - mean) / std).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress.advance()
                progress.show(distill_loss=float(loss.detach()))
        self.teacher.requires_grad_(False)
        self.teacher_ready.fill_(True)

    @torch.no_grad()
    def on_train_start(self, batches: Iterable[Batch]) -> None:
        """Distil the teacher (once), then its per-channel output statistics on the training images."""
        if not bool(self.teacher_ready):  # a re-fit reuses the distilled teacher
            kept = []
            for batch in batches:
                kept.append(batch.image[: MAX_DISTILL_IMAGES - sum(len(k) for k in kept)])
                if sum(len(k) for k in kept) >= MAX_DISTILL_IMAGES:
                    break
            if not kept:
                raise DataError("EfficientAD.fit got no training images; give it at least 1 good image.")
            self._distill_teacher(torch.cat(kept))
        # Streaming mean / variance in float64: the whole training set need not fit in memory.
        total, total_sq, count, size, device = 0.0, 0.0, 0, None, self.teacher_mean.device
        for batch in batches:
            out = self.teacher(batch.image).double()
            total, total_sq = total + out.sum(dim=(0, 2, 3)), total_sq + out.pow(2).sum(dim=(0, 2, 3))
            count, size = count + out[:, 0].numel(), tuple(batch.image.shape[-2:])
        mean = total / count
        std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt()
        self.teacher_mean.copy_(mean.view(1, -1, 1, 1).float())
        self.teacher_std.copy_(std.view(1, -1, 1, 1).float() + 1e-6)
        self._penalty = random_crops(natural_photos(), 16, self._crop_size(size), self._rng()).to(device)

    # -- training -----------------------------------------------------------------------------
    def _teacher(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.teacher(images) - self.teacher_mean) / self.teacher_std

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        images, c, rng = batch.image, self.channels, self._rng()
        size = tuple(images.shape[-2:])
        crop = self._crop_size(size)
        # One crop window per step, on the stride-4 grid so it maps onto whole output cells.
        y, x = (4 * int(rng.integers((n - k) // 4 + 1)) for n, k in zip(size, crop, strict=True))
        window = (slice(y, y + crop[0]), slice(x, x + crop[1]))
        cells = (slice(y // 4, (y + crop[0]) // 4), slice(x // 4, (x + crop[1]) // 4))

        # Student-teacher branch: hard-feature loss (only errors above their 0.999 quantile count).
        errors = (self._teacher(images[..., window[0], window[1]])
                  - self.student(images[..., window[0], window[1]])[:, :c]).pow(2)
        flat = errors.flatten()
        # kthvalue, not torch.quantile: the latter refuses more than 2^24 elements.
        d_hard = flat.kthvalue(max(1, int(self.hparams["hard_quantile"] * flat.numel()))).values
        hard = errors[errors >= d_hard].mean()
        if self._penalty is None or tuple(self._penalty.shape[-2:]) != crop:  # e.g. validation after loading
            self._penalty = random_crops(natural_photos(), 16, crop, rng).to(images.device)
        pick = torch.from_numpy(rng.integers(len(self._penalty), size=min(len(images), 4))).to(images.device)
        penalty = self.student(self._penalty[pick])[:, :c].pow(2).mean()

        # Autoencoder branch on colour-augmented images: the AE sees the whole image (it must model
        # the global layout), the student only the crop.
        augmented = _colour_jitter(images, rng)
        target = self._teacher(augmented)
        reconstruction = self.autoencoder(augmented, tuple(target.shape[-2:]))
        loss_ae = (target - reconstruction).pow(2).mean()
        student_ae = self.student(augmented[..., window[0], window[1]])[:, c:]
        # Cells within the PDN's reach of a crop edge see zero padding instead of image: skip them.
        m = EDGE_CELLS if crop != size else 0
        inner = (slice(m, student_ae.shape[-2] - m), slice(m, student_ae.shape[-1] - m))
        loss_stae = (reconstruction[..., cells[0], cells[1]][..., inner[0], inner[1]]
                     - student_ae[..., inner[0], inner[1]]).pow(2).mean()
        return {"loss": hard + penalty + loss_ae + loss_stae, "hard": hard, "penalty": penalty, "ae": loss_ae,
                "stae": loss_stae}

    def _maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (B, 1, H/4, W/4) student-teacher and autoencoder maps."""
        c = self.channels
        teacher, student = self._teacher(images), self.student(images)
        reconstruction = self.autoencoder(images, tuple(teacher.shape[-2:]))
        st = (teacher - student[:, :c]).pow(2).mean(dim=1, keepdim=True)
        ae = (reconstruction - student[:, c:]).pow(2).mean(dim=1, keepdim=True)
        return st, ae

    @torch.no_grad()
    def prepare_inference(self, batches: Iterable[Batch]) -> None:
        """Quantiles of both maps over the (good) images, for the paper's map normalisation."""
        was_training = self.training
        self.eval()
        st, ae = zip(*[self._maps(b.image) for b in batches], strict=True)
        st, ae = torch.cat(st), torch.cat(ae)
        device = self.teacher_mean.device
        self.st_quantiles = torch.tensor([_quantile(st, q) for q in MAP_QUANTILES], device=device)
        self.ae_quantiles = torch.tensor([_quantile(ae, q) for q in MAP_QUANTILES], device=device)
        self.train(was_training)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if not self.fitted:
            raise AnomalensError("EfficientAD is not fitted; call fit() first.")
        st, ae = self._maps(images)
        # (q_b - q_a) is clamped: a perfectly flat map (degenerate training) must not divide by 0.
        st = 0.1 * (st - self.st_quantiles[0]) / (self.st_quantiles[1] - self.st_quantiles[0]).clamp_min(1e-12)
        ae = 0.1 * (ae - self.ae_quantiles[0]) / (self.ae_quantiles[1] - self.ae_quantiles[0]).clamp_min(1e-12)
        anomaly_map = upsample_and_blur(0.5 * st + 0.5 * ae, tuple(images.shape[-2:]), self.hparams["blur_sigma"])
        return AnomalyOutput(anomaly_map.amax(dim=(1, 2, 3)), anomaly_map)
