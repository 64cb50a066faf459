"""PaDiM: a multivariate Gaussian of pretrained CNN features at every patch position.

Paper: Defard, Setkov, Loesch, Audigier, "PaDiM: a Patch Distribution Modeling Framework for
Anomaly Detection and Localization", ICPR workshops 2020 (arXiv:2011.08785).

For each training image, features of several backbone levels are upsampled (nearest) to the
finest level's grid and concatenated into one embedding per patch; a random subset of channels
is kept.  Each grid position (i, j) gets a Gaussian N(mu_ij, Sigma_ij) with Sigma regularised by
0.01 I.  At test time the anomaly map is the Mahalanobis distance of each patch embedding to
its position's Gaussian, upsampled (bilinear) to the input size and smoothed (Gaussian, sigma 4);
the paper's image score is the map's maximum.  Nothing is trained; `fit` is a single pass.

Deviations from the paper:
- Backbone: EfficientNet-Lite0 (blocks.1/2/4: 24 + 40 + 112 = 176 channels at strides 4/8/16)
  instead of ResNet18 / WideResNet50 layers 1-3, because its ImageNet weights ship offline.
  Any timm backbone and layers can be set.
- Mean and covariance are accumulated online (float64 sums), so memory does not grow with the
  number of images; the inverse covariance is stored in float32.
- The input size is fixed at fit time (the Gaussians are per grid position, as in the paper).
- Local colour (an addition, `local_colour`, on by default): three more channels per patch, its
  cell's mean colour relative to the image's mean (components/colour.py), scaled on the first
  training batch to a feature channel's spread.  Pretrained features hardly see a stain that keeps
  the texture underneath.  Measured at 256 px (image / pixel AUROC, off -> on): demo grass
  0.737 / 0.861 -> 0.765 / 0.902, brick 0.934 / 0.956 -> 0.968 / 0.982, gravel 0.806 / 0.875 ->
  0.825 / 0.883, flange 1.000 / 0.991 -> 0.999 / 0.991; magnetic tiles 0.910 / 0.736 ->
  0.910 / 0.737 with 200 training images, 0.955 / 0.746 -> 0.955 / 0.748 with all 761.
- Neighbourhood (an addition, `neighbourhood`, default 3): each embedding is averaged over the
  3x3 grid cells around it (stride 1; border cells over the neighbours they have), as PatchCore
  makes its patch features "locally aware".  An average of neighbouring patches is closer to a
  Gaussian than one patch of a stochastic texture, and less noisy, so the per-position Gaussians
  fit better.  Image / pixel AUROC at 256 px, 1 -> 3 (5 in brackets):
    demo brick      0.986 / 0.982 -> 0.999 / 0.990   (0.999 / 0.992)
    demo grass      0.811 / 0.902 -> 0.846 / 0.931   (0.832 / 0.943)
    demo gravel     0.841 / 0.883 -> 0.877 / 0.904   (0.881 / 0.918)
    demo flange     0.999 / 0.991 -> 1.000 / 0.993   (0.999 / 0.993)
    magnetic tiles  0.894 / 0.733 -> 0.898 / 0.756   (0.894 / 0.770)   60 training images
    magnetic tiles  0.917 / 0.737 -> 0.916 / 0.758   (0.915 / 0.772)   200 training images
    magnetic tiles  0.957 / 0.748 -> 0.963 / 0.771                     all 761
  The other tables in this list were measured before it (neighbourhood 1).
  With it, `n_features: 50` lifts every demo category above 0.90 (grass 0.939 / 0.977, gravel
  0.907 / 0.924) but costs the magnetic tiles 0.02-0.03 image AUROC (all 761: 0.933 / 0.755).
  Estimating each covariance from the 3x3 neighbours' samples too lifted grass to 0.900 but cost
  the tiles 0.037 (60 images); dividing each position's distance by its leave-one-out mean on
  training images (as PatchCore's position calibration) left grass at 0.847.  Splitting the
  covariance by backbone level showed why: the fine levels alone give grass 0.934 but the tiles
  0.808, the stride-16 level alone the tiles 0.895.  See the README.
- Mirrored training images (an addition, `flips`, default "auto"): the textures are short of
  images (fitting on 80 instead of 100 lowered every demo category), and a stochastic texture
  mirrored is another good image of it.  "auto" holds every 5th training image (up to 16) out of a
  first fit, scores it as it is and flipped horizontally, vertically and both, and when the
  flipped copies lie no farther from the Gaussians than the originals (ratio of median patch
  distances <= 1.05 for every flip), a second pass adds each image's three mirror images (4x the
  samples); an aligned part, whose mirror image puts features where they never are, keeps the
  paper's fit.  `fit_info` (and the run's metrics.json) records the ratio and the choice.
  Image / pixel AUROC at 256 px, off -> auto (ratio):
    demo grass      0.846 / 0.931 -> 0.959 / 0.980   (1.012, mirrored)
    demo gravel     0.877 / 0.904 -> 0.915 / 0.938   (1.007, mirrored)
    demo brick      0.999 / 0.990 -> 1.000 / 0.997   (1.004, mirrored)
    demo flange     1.000 / 0.993 -> unchanged       (1.357, not mirrored)
    magnetic tiles  unchanged with 60, 200 and all 761 training images (1.073, 1.211, 1.145)
  Mirroring the tiles anyway cost them 0.015 image AUROC (0.884 / 0.738 at 60 images).
- Option `shrinkage: oas` estimates each covariance with Oracle Approximating Shrinkage instead
  of the sample covariance (both + 0.01 I).  Not the default: at 256 px with 60 training images
  it changed image AUROC by -0.014 on the magnetic tiles, -0.008 grass, +0.040 gravel, -0.006
  brick, +0.003 flange (pixel AUROC +0.029 on flange, -0.014 on the tiles).
- Option `shrinkage: pooled` mixes each position's sample covariance with the covariance averaged
  over all positions: (1 - pooled_weight) S_ij + pooled_weight S_pooled (+ 0.01 I).  With fewer
  images than channels, S_ij is singular and the 0.01 I regulariser alone turns its empty
  directions into noise that every patch carries; the pooled covariance fills them with the
  spread the features really have.  It suits stochastic textures and hurt the real tiles, so it
  is not the default.  Image / pixel AUROC at 256 px, none -> pooled 0.5 (0.1 / 0.25 in brackets):
    demo grass      0.765 / 0.902 -> 0.937 / 0.970   (0.904, 0.920)
    demo gravel     0.825 / 0.883 -> 0.888 / 0.917   (0.863)
    demo brick      0.968 / 0.982 -> 1.000 / 0.997
    demo flange     0.999 / 0.991 -> 0.999 / 0.989
    magnetic tiles  0.884 / 0.733 -> 0.862 / 0.730   (0.875)          60 training images
    magnetic tiles  0.910 / 0.737 -> 0.889 / 0.732   (0.906, 0.901)   200 training images
    magnetic tiles  0.955 / 0.748 -> (0.948 / 0.746 at 0.1)           all 761
  Held-out likelihood of good patches preferred weights of 0.75-0.9 on every set, the tiles too,
  so it cannot choose the weight for anomaly detection.
- Image score (`score_share`, default 0.01): the mean of the map's highest 1 % (of its 4x4-pixel
  cell averages) instead of its maximum (`score_share: 0`).  With ~100 images per position the
  Mahalanobis distance of a single patch is noisy, and the maximum of a good image often lands on
  such a noise peak; the top 1 % (a 26x26 px area at 256 px) averages it out while a defect of
  that size still fills it.
  Image AUROC at 256 px, maximum -> top 1 % (pixel maps unchanged): demo brick 0.968 -> 0.986,
  grass 0.766 -> 0.811, gravel 0.825 -> 0.841, flange 0.999 -> 0.999; magnetic tiles
  0.884 -> 0.894 (60 training images), 0.910 -> 0.917 (200), 0.955 -> 0.957 (all 761).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..backbones import Backbone
from ..components.blur import upsample_and_blur
from ..components.colour import local_colour
from ..components.gaussian import GaussianAccumulator, mahalanobis
from ..components.mirrors import CHECK_MIN, CHECK_STRIDE, FLIPS, check_images, worst_mirror_ratio
from ..data.sample import Batch, images_of
from ..errors import STR, AnomalensError, DataError, Interval, ListOf, OneOf, param_error
from ..progress import track
from ..registry import register_model
from .base import AnomalyModel, AnomalyOutput

# --------------------------------------------------------------------------- parameters
COVARIANCE_EPS = 0.01  # the paper's regularisation: Sigma + 0.01 I
# flips "auto" (components/mirrors.py): the check images are held out of a first fit and scored as
# they are and mirrored; the mirrors join the training set when their median patch distance is
# within FLIP_RATIO of the unmirrored one's for every flip.  Measured in fit at 256 px: demo grass
# 1.012, gravel 1.007, brick 1.004; flange 1.357; magnetic tiles 1.073, 1.211, 1.145 (60, 200, 761
# images); at 128 px: grass 1.023, gravel 1.004, brick 1.006; flange 1.504; tiles 1.137, 1.300 (60,
# 200).  Per flip on the engine's calibration images at 128 and 256 px: the textures 0.99-1.02, the
# tiles 1.08-1.36, flange 1.24-1.53.
FLIP_RATIO = 1.05


# --------------------------------------------------------------------------- model
@register_model
class PaDiM(AnomalyModel):
    """Per-position Gaussians of random-subset CNN features; Mahalanobis distance maps."""

    name = "padim"
    description = "Per-patch Gaussian of pretrained CNN features, Mahalanobis distance (Defard et al. 2020)."
    constraints = {
        "backbone": STR,
        "layers": ListOf(STR),
        "weights": STR,
        "n_features": Interval(int, 1, None),
        "blur_sigma": Interval(float, 0, None),
        "score_share": Interval(float, 0, 1),
        "shrinkage": OneOf("none", "oas", "pooled"),
        "pooled_weight": Interval(float, 0, 1),
        "local_colour": OneOf(True, False),
        "neighbourhood": OneOf(1, 3, 5, 7, 9),
        "flips": OneOf("auto", True, False),
        "seed": Interval(int, 0, None),
    }
    defaults = {
        "backbone": "tf_efficientnet_lite0",
        "layers": ["blocks.1", "blocks.2", "blocks.4"],
        "weights": "imagenet",
        "n_features": 100,  # random channel subset size (the paper keeps 100 of 448 for ResNet18)
        "blur_sigma": 4.0,
        "score_share": 0.01,  # image score: mean of this share of the map's highest 4x4 cells (0: its maximum)
        "shrinkage": "none",  # covariance: "none" (sample, the paper), "oas" (towards a scaled identity), "pooled"
        "pooled_weight": 0.5,  # with shrinkage "pooled": the share of the covariance every position shares
        "local_colour": True,  # append each patch's colour relative to the image (components/colour.py)
        "neighbourhood": 3,  # average each embedding over this window of grid cells (odd; 1: the paper)
        "flips": "auto",  # also fit on mirrored training images: "auto" when held-out ones look normal mirrored
        "seed": 0,
    }
    # What checkpoints saved before a parameter existed ran with (format 1 saved no resolved parameters).
    tags = {"trainable": False, "legacy_params": {"local_colour": False, "score_share": 0.0, "neighbourhood": 1,
                                                      "flips": False}}

    def __init__(self, **params):
        super().__init__(**params)
        hp = self.hparams
        self.backbone = Backbone(hp["backbone"], hp["layers"], hp["weights"])
        total = sum(self.backbone.channels)
        if hp["n_features"] > total:
            raise param_error(type(self).__name__, "n_features", f"an int in [1, {total}]", hp["n_features"])
        # The random subset is drawn once, from its own generator, so the global RNG is untouched.
        generator = torch.Generator().manual_seed(hp["seed"])
        index = torch.randperm(total, generator=generator)[: hp["n_features"]].sort().values
        self.register_buffer("index", index)
        self._split_index()
        self.register_load_state_dict_post_hook(_resplit_index)
        # Fitted state, (h, w, D) and (h, w, D, D): the grid shape travels with the checkpoint.
        self.register_buffer("mean", torch.empty(0, 0, 0))
        self.register_buffer("inv_cov", torch.empty(0, 0, 0, 0))
        if hp["local_colour"]:  # multiplies the colour channels; fit sets it from the first training batch
            self.register_buffer("colour_scale", torch.ones(()))

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    def _split_index(self) -> None:
        """The subset layer by layer (index_i: layer i's chosen channels), so that each layer is cut
        before it is upsampled; the subset is sorted, so concatenating the parts keeps its order."""
        bounds = [0, *itertools.accumulate(self.backbone.channels)]
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            chosen = self.index[(self.index >= lo) & (self.index < hi)] - lo
            self.register_buffer(f"index_{i}", chosen, persistent=False)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D, h, w) embeddings on the finest layer's grid."""
        features = self.backbone(images)
        size = features[0].shape[-2:]
        chosen = [getattr(self, f"index_{i}") for i in range(len(features))]
        features = [f.index_select(1, c) for f, c in zip(features, chosen, strict=True) if len(c)]
        # Nearest upsampling copies each coarse cell onto the patches it covers, as in the paper.
        features = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest") for f in features]
        embedding = torch.cat(features, dim=1)
        if self.hparams["local_colour"]:
            embedding = torch.cat([embedding, local_colour(images, size) * self.colour_scale], dim=1)
        p = self.hparams["neighbourhood"]
        if p == 1:
            return embedding
        # Border cells average only the neighbours they have, so they are not pulled towards zero.
        # Channels-last: torch's CPU pooling is ~9x faster on it than on the concatenation's layout.
        embedding = embedding.contiguous(memory_format=torch.channels_last)
        return F.avg_pool2d(embedding, p, stride=1, padding=p // 2, count_include_pad=False)

    @torch.no_grad()
    def fit(self, batches: Iterable[Batch]) -> PaDiM:
        """One pass over good images: per-position mean and inverse covariance of the embeddings
        (with flips "auto" and mirrors that look normal, a second pass adds the mirrored images)."""
        flips = self.hparams["flips"]
        if flips == "auto" and iter(batches) is batches:
            batches = list(batches)  # a one-shot iterator: a second pass may be needed
        accumulator = GaussianAccumulator()
        held_out: list[torch.Tensor] = []
        seen = held = 0
        self._first = self.hparams["local_colour"]
        for batch in track(batches, "PaDiM: fitting Gaussians"):
            images = images_of(batch).to(self.index.device)
            start, seen = seen, seen + len(images)
            if flips == "auto":  # the check images wait out the first fit
                out = check_images(start, len(images), held, images.device)
                held_out.append(images[out])
                held += int(out.sum())
                images = images[~out]
            self._accumulate(accumulator, images, mirrored=flips is True)
        if seen == 0:
            raise DataError("PaDiM.fit got no training images; give it at least 2 good images.")
        ratio = self._add_mirrors_if_normal(accumulator, torch.cat(held_out), batches) if flips == "auto" else None
        self.fit_info = {"flips_used": flips is True or (ratio is not None and ratio <= FLIP_RATIO),
                         "mirror_distance_ratio": None if ratio is None else round(ratio, 4)}
        self._set_gaussians(accumulator)
        return self

    def _add_mirrors_if_normal(self, accumulator: GaussianAccumulator, held_out: torch.Tensor,
                               batches: Iterable[Batch]) -> float | None:
        """flips "auto": fit without the held-out images, measure how their mirror images score
        (`_mirror_ratio`), add them back, and add every image's mirrors (a second pass) if those
        look as normal as the images.  Returns the ratio (None: too few images to check)."""
        ratio = None
        if len(held_out) >= CHECK_MIN and accumulator.count >= 2:
            embedding = self._embed(held_out)
            ratio = self._mirror_ratio(accumulator, held_out, embedding)
            accumulator.update(embedding.flatten(2).transpose(1, 2))
        else:
            self._accumulate(accumulator, held_out)
        if ratio is not None and ratio <= FLIP_RATIO:
            for batch in track(batches, "PaDiM: adding mirrored images"):
                self._accumulate(accumulator, images_of(batch).to(self.index.device), mirrored=True,
                                 original=False)
        return ratio

    def _accumulate(self, accumulator: GaussianAccumulator, images: torch.Tensor, mirrored: bool = False,
                    original: bool = True) -> None:
        """Add the images' embeddings (and, if `mirrored`, their three mirror images') to the sums."""
        if not len(images):
            return
        for dims in ([()] if original else []) + (list(FLIPS) if mirrored else []):
            view = images.flip(dims) if dims else images  # one mirror image at a time: memory
            if self._first:  # the colour scale comes from the first training batch
                self.colour_scale.fill_(1.0)
            embedding = self._embed(view)
            if self._first:
                self._scale_colour(embedding)
                self._first = False
            self._grid = embedding.shape[-2:]
            accumulator.update(embedding.flatten(2).transpose(1, 2))  # (B, h*w, D)

    def _set_gaussians(self, accumulator: GaussianAccumulator) -> None:
        d = accumulator.sum.shape[-1]
        self.mean = accumulator.mean().to(torch.float32).reshape(*self._grid, d)
        self.inv_cov = accumulator.precision(COVARIANCE_EPS, torch.float32,
                                            shrinkage=self.hparams["shrinkage"],
                                            pooled_weight=self.hparams["pooled_weight"]).reshape(*self._grid, d, d)

    def _mirror_ratio(self, accumulator: GaussianAccumulator, images: torch.Tensor, embedding: torch.Tensor) -> float:
        """How much farther mirrored good images lie from the Gaussians than the images themselves
        (`embedding`: the images' own): the largest, over the three flips, of the mean over images of
        their median patch distance ratio.  About 1 where position and orientation carry nothing (a
        stochastic texture).  Every CHECK_STRIDE-th position is enough for a median and spares most
        of the inversions."""
        rows = slice(None, None, CHECK_STRIDE)
        mean = accumulator.mean()[rows].to(torch.float32)
        inv_cov = torch.linalg.inv(accumulator.covariance(COVARIANCE_EPS, rows, self.hparams["shrinkage"],
                                                          self.hparams["pooled_weight"])).to(torch.float32)

        def median_distance(embedding: torch.Tensor) -> torch.Tensor:
            patches = embedding.flatten(2).transpose(1, 2)[:, rows]  # (B, P', D)
            return mahalanobis(patches, mean, inv_cov).median(dim=1).values

        return worst_mirror_ratio(lambda view: median_distance(self._embed(view)), images, median_distance(embedding))

    def _scale_colour(self, embedding: torch.Tensor) -> None:
        """Give the colour channels (the last 3, in place) the typical spread of a feature channel,
        measured on the first batch: the covariance regulariser (0.01 I) is in feature units and
        would otherwise drown them."""
        spread = embedding.transpose(0, 1).flatten(1).std(dim=1)
        self.colour_scale.fill_(float(spread[:-3].mean() / spread[-3:].mean().clamp_min(1e-6)))
        embedding[:, -3:] *= self.colour_scale  # as _embed will scale every later batch

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if not self.fitted:
            raise AnomalensError("PaDiM is not fitted; call fit() first.")
        embedding = self._embed(images)
        b, d, h, w = embedding.shape
        if (h, w) != tuple(self.mean.shape[:2]):
            raise DataError(f"PaDiM was fitted on a {self.mean.shape[0]}x{self.mean.shape[1]} feature grid but this "
                            f"{images.shape[-2]}x{images.shape[-1]} input gives {h}x{w}; use the training image size.")
        # (B, h*w, D) by way of channels-last, the layout the embedding already has (a view in eager
        # torch).  flatten(2).transpose(1, 2) made OpenVINO fuse it with mahalanobis' own transpose
        # into one 3-D transpose in its generic kernel: 256 px, batch 8, one thread, FP32 graph
        # 119 -> 105 ms per batch, 71 -> 57-60 ms computed in bf16.
        distance = mahalanobis(embedding.permute(0, 2, 3, 1).reshape(b, h * w, d), self.mean.reshape(h * w, d),
                               self.inv_cov.reshape(h * w, d, d))
        anomaly_map = upsample_and_blur(distance.reshape(b, 1, h, w), tuple(images.shape[-2:]),
                                        self.hparams["blur_sigma"])
        return AnomalyOutput(score=top_mean(anomaly_map, self.hparams["score_share"]), anomaly_map=anomaly_map)


def _resplit_index(module: PaDiM, incompatible_keys) -> None:
    """After load_state_dict: the loaded subset replaces the drawn one in the per-layer parts too."""
    module._split_index()


def top_mean(maps: torch.Tensor, share: float, cell: int = 4) -> torch.Tensor:
    """(B, 1, H, W) -> (B,) mean of the highest `share` of each map's cell x cell averages (share 0:
    the map's maximum).  The blurred map barely changes within 4 px, and a top-k over 16 times fewer
    values is cheap (over every pixel it slowed PaDiM's exported graphs by 20-30 %; AUROC moved by
    at most 0.0011)."""
    if share == 0:
        return maps.amax(dim=(1, 2, 3))
    cells = F.avg_pool2d(maps, cell).flatten(1) if min(maps.shape[-2:]) >= cell else maps.flatten(1)
    k = max(1, round(share * cells.shape[1]))
    return cells.topk(k, dim=1).values.mean(dim=1)
