"""PatchCore: nearest-neighbour distance to a coreset memory bank of pretrained patch features.

Paper: Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler, "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022 (arXiv:2106.08265).

Every patch is described by a "locally aware" feature: each backbone level is averaged over a 3x3
neighbourhood (stride 1), the deeper level is upsampled (bilinear) to the first level's grid, and
the levels are concatenated.  All patches of the good training images are pooled; a greedy
k-center coreset (Algorithm 1, on a random Gaussian projection to 128 dims) keeps `coreset_ratio`
of them as the memory bank, stored at their original dimension.  At test time each patch's
anomaly score is its distance to the nearest bank feature; the map is upsampled and smoothed
(Gaussian, sigma 4).  The image score is the largest patch score s*, re-weighted as in eq. 7:
with m* the bank feature nearest to that patch and N_b(m*) the b bank features nearest to m*,
score = (1 - exp(d(patch, m*)) / sum_{m in N_b(m*)} exp(d(patch, m))) * s*.

Deviations from the paper:
- Backbone: EfficientNet-Lite0 blocks.2 + blocks.4 (40 + 112 = 152 dims at strides 8 / 16) instead
  of WideResNet50 layers 2 + 3, because its ImageNet weights ship offline.  Any timm backbone and
  layers can be set.  Features are not pooled to a fixed dimension (the paper's 1024): at 152 dims
  that would only add size.
- With num_neighbors = 1 (or a one-feature bank) eq. 7 would give 0 for every image; the score is
  then s* itself.
- Local colour (an addition, `colour_weight`, default 0.25; 0 turns it off): every patch also
  carries its cell's mean colour relative to the image's mean (components/colour.py), averaged
  over the same 3x3 neighbourhood and scaled so that its spread (RMS distance to the mean) is
  `colour_weight` times an average backbone layer's.  Pretrained features hardly see a stain
  that keeps the texture underneath (demo grass stains: 0.507 image AUROC).  Measured at 256 px
  without position calibration (below), image / pixel AUROC for weights 0 / 0.25 / 0.5:
    demo grass      0.804 / 0.908   0.856 / 0.951   0.914 / 0.975
    demo gravel     0.912 / 0.928   0.914 / 0.941   0.943 / 0.966
    demo brick      0.991 / 0.975   0.993 / 0.979
    demo flange     0.971 / 0.967   0.981 / 0.963
    magnetic tiles  0.969 / 0.833   0.969 / 0.834                   (all 761 training images)
    magnetic tiles  0.911 / 0.799   0.911 / 0.800   0.906 / 0.799   (200 training images)
    magnetic tiles  0.880 / 0.781   0.874 / 0.782   0.867 / 0.781   (60 training images)
  The real tiles (greyscale, no colour defects) lose a little as the weight grows, so the default
  is the weight that left them unchanged; surfaces where stains matter may want 0.5.
- Position calibration (an addition, `position_calibration`, default 0.5; 0 turns it off): each
  grid position's distances are divided by its typical distance on good images to the power 0.5.
  The typical distance is measured at fit time on up to 32 training images, each scored against
  the bank without its own patches, and taken relative to the mean over positions.  Border cells
  (their receptive fields reach into the zero padding) and the stride-16 level's interpolation
  seams are matched less closely than the rest, by ~10 % on the demo textures, and so held the
  maximum of nearly every good image: all 30 good grass images peaked within 26 px of the border.
  Image / pixel AUROC at 256 px, powers 0 / 0.5 / 1:
    demo grass      0.856 / 0.951   0.956 / 0.969   0.960 / 0.975
    demo gravel     0.914 / 0.941   0.958 / 0.958   0.977 / 0.971
    demo brick      0.993 / 0.979   1.000 / 0.981   1.000 / 0.982
    demo flange     0.981 / 0.963   0.993 / 0.982   0.999 / 0.989
    magnetic tiles  0.969 / 0.834   0.971 / 0.830                   (all 761 training images)
    magnetic tiles  0.911 / 0.800   0.910 / 0.795   0.904 / 0.787   (200 training images)
    magnetic tiles  0.874 / 0.782   0.869 / 0.783   0.861 / 0.781   (60 training images)
  On the real tiles the tile's own edges are part of that border, and breaks and frays sit there:
  the full division cost them, so the default takes the square root.  Reflect-padding the input
  by 32 px instead reached only 0.919 / 0.968 on grass and cost the tiles 0.018 pixel AUROC.
- Mirrored training images (an addition, `flips`, default "auto"; components/mirrors.py): a
  stochastic texture mirrored is another good image of it.  "auto" takes every 5th training image
  (up to 16) as a check image, scores it against the bank without its own patches as it is and
  flipped horizontally, vertically and both, and when the flipped copies lie no farther from the
  bank than the originals (ratio of median patch distances <= 1.01 for every flip), a second pass
  adds every training image's three mirror images to the pool and the coreset is selected again.
  The bank keeps the size the unmirrored patches give it (`coreset_ratio` of them), so inference
  costs the same; the fit extracts 4x the features, holds 4x the patches in memory and selects
  from them (256 px, 48 images: ~12 s for a demo texture against ~5 s for flange, unmirrored).  Position
  calibration holds a mirror image out with its original.  Image / pixel AUROC at 256 px with 60
  training images, off -> auto (ratio):
    demo grass      0.927 / 0.965 -> 0.982 / 0.976   (0.982, mirrored)
    demo gravel     0.942 / 0.954 -> 0.967 / 0.963   (0.986, mirrored)
    demo brick      0.998 / 0.984 -> 1.000 / 0.984   (0.993, mirrored)
    demo flange     0.993 / 0.981 -> unchanged       (1.093, not mirrored)
    magnetic tiles  unchanged                        (1.052, not mirrored)
  `flips: true` gave the tiles 0.888 / 0.781 and flange 0.999 / 0.982, but an aligned part's
  mirror image is not a good part in general (an upside-down part is a defect of its own), and
  a position-blind memory would accept it; "auto" leaves them unmirrored.

Learning more good images (`update`, which the engine's refit with the validation images uses): the
new images' patches (and their mirror images', when the fit added mirrors) are pooled with the
bank's rows and the greedy selection continues from the bank, which grows by `coreset_ratio` of
the new patches; the colour and position scales stay as fitted.  A fresh fit on all the images
would select the whole coreset again (and repeat the mirror check) for the same accuracy.

Implementation: the coreset is the exact greedy result computed in batches of matrix products
(components/coreset.py, ~150x faster than anomalib's loop); nearest neighbours are exact and
computed in bounded chunks (components/knn.py), so peak memory grows with the training patches
and the bank, never with their product.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..backbones import Backbone
from ..components.blur import upsample_and_blur
from ..components.colour import local_colour
from ..components.coreset import greedy_coreset, random_projection
from ..components.knn import NearestNeighbours, nearest_distances
from ..components.mirrors import CHECK_MIN, CHECK_STRIDE, FLIPS, check_images, worst_mirror_ratio
from ..data.sample import Batch, images_of
from ..errors import STR, AnomalensError, DataError, Interval, ListOf, OneOf
from ..progress import track
from ..registry import register_model
from .base import AnomalyModel, AnomalyOutput

# --------------------------------------------------------------------------- parameters
CALIBRATION_IMAGES = 32  # training images scored held-out to measure each position's typical distance
# flips "auto" (components/mirrors.py): each check image is scored against the bank without its own
# patches, as it is and mirrored; the mirrors join the training set when the ratio of median nearest-
# bank distances is at most FLIP_RATIO for every flip.  Measured in fit at 256 px (the worst flip):
# demo grass 0.982 / 1.002, gravel 0.986 / 0.985, brick 0.993 / 0.992 (60 / the demo's 80 images),
# flange 1.093 / 1.087; magnetic tiles 1.052 (60 images), 1.159 (200).  Per flip on 16 training
# images at 128 and 256 px: the textures 0.976-1.002, the tiles 1.023-1.039 (60) and 1.125-1.164
# (200), flange 1.051-1.121.  Nearest-neighbour distances ignore position, so mirrored aligned
# images stray less than under PaDiM's per-position Gaussians, and the bound is tighter than PaDiM's.
FLIP_RATIO = 1.01


# --------------------------------------------------------------------------- model
@register_model
class PatchCore(AnomalyModel):
    """Coreset memory bank of locally aware patch features; nearest-neighbour distance maps."""

    name = "patchcore"
    description = "Nearest-neighbour distance to a coreset memory bank of pretrained patch features (Roth et al. 2022)."
    constraints = {
        "backbone": STR,
        "layers": ListOf(STR),
        "weights": STR,
        "coreset_ratio": Interval(float, 0, 1, closed="right"),
        "projection_dim": Interval(int, 1, None),
        "num_neighbors": Interval(int, 1, None),
        "neighbourhood": OneOf(1, 3, 5, 7, 9),
        "blur_sigma": Interval(float, 0, None),
        "colour_weight": Interval(float, 0, None),
        "position_calibration": Interval(float, 0, 1),
        "flips": OneOf("auto", True, False),
        "seed": Interval(int, 0, None),
    }
    defaults = {
        "backbone": "tf_efficientnet_lite0",
        "layers": ["blocks.2", "blocks.4"],
        "weights": "imagenet",
        "coreset_ratio": 0.1,  # fraction of training patches kept in the memory bank
        "projection_dim": 128,  # random projection used only to *select* the coreset (paper: 128)
        "num_neighbors": 9,  # b in eq. 7, the bank neighbourhood used to re-weight the image score
        "neighbourhood": 3,  # p, the local aggregation window (odd, so the grid keeps its size)
        "blur_sigma": 4.0,
        "colour_weight": 0.25,  # weight of the local colour contrast beside an average backbone layer; 0 = off
        "position_calibration": 0.5,  # divide each position's distances by (their typical size)^this; 0 = off
        "flips": "auto",  # also learn mirrored training images: "auto" when good ones look normal mirrored
        "seed": 0,
    }
    # INT8 export quantises only the patch search's ranking product: the chosen neighbours' distances
    # are recomputed in float (bfloat16 where the CPU has it), so 8 bits can at worst pick a near-equal
    # neighbour (image AUROC drop 0 on demo brick, 0.0011 on gravel and grass with the bf16 rest),
    # while the 8-bit backbone's feature noise cost 0.038 image AUROC on demo brick.
    # What checkpoints saved before a parameter existed ran with (format 1 saved no resolved parameters).
    tags = {"trainable": False, "updatable": True, "int8_modules": ["patch_search"],
            "legacy_params": {"colour_weight": 0.0, "position_calibration": 0.0, "flips": False}}

    def __init__(self, **params):
        super().__init__(**params)
        hp = self.hparams
        self.backbone = Backbone(hp["backbone"], hp["layers"], hp["weights"])
        self.patch_search = NearestNeighbours()
        # Fitted state (bank size, feature dim): its shape travels with the checkpoint.
        self.register_buffer("memory_bank", torch.empty(0, 0))
        if hp["colour_weight"] > 0:  # multiplies the colour columns; fit sets it from the training patches
            self.register_buffer("colour_scale", torch.ones(()))
        if hp["position_calibration"] > 0:  # (h, w), mean 1; fit sets it from held-out training distances
            self.register_buffer("position_scale", torch.ones(0, 0))

    @property
    def fitted(self) -> bool:
        return self.memory_bank.numel() > 0

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D, h, w) locally aware patch features on the first layer's grid."""
        p = self.hparams["neighbourhood"]
        features = self.backbone(images)
        size = features[0].shape[-2:]
        if self.hparams["colour_weight"] > 0:
            features.append(local_colour(images, size))
        # Zero padding counts in the average (as in the authors' code): it damps the border patches,
        # whose features vary most; averaging only the in-grid cells gave worse maps in our tests.
        features = [F.avg_pool2d(f, p, stride=1, padding=p // 2) for f in features]
        if self.hparams["colour_weight"] > 0:  # scaled after pooling, exactly as fit scales the bank
            features[-1] = features[-1] * self.colour_scale
        features = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                    for f in features]
        return torch.cat(features, dim=1)

    @torch.no_grad()
    def fit(self, batches: Iterable[Batch]) -> PatchCore:
        """Pool the patch features of good images, keep a greedy coreset of them as the memory bank
        (with flips, a second pass adds the mirrored images' patches to the pool first)."""
        hp = self.hparams
        flips = hp["flips"]
        if flips is not False and iter(batches) is batches:
            batches = list(batches)  # a one-shot iterator: the mirrors take a second pass
        if hp["colour_weight"] > 0:
            self.colour_scale.fill_(1.0)
        chunks = []  # one (patches, D) block per batch; never concatenated, to keep the peak at ~1x
        checked, checked_at = [], []  # flips "auto": the check images and their places in the stream
        seen = 0
        for batch in track(batches, "PatchCore: extracting features"):
            images = images_of(batch).to(self.memory_bank.device)
            if flips == "auto":
                chosen = check_images(seen, len(images), len(checked_at))
                checked.append(images[chosen.to(images.device)])
                checked_at += (chosen.nonzero().flatten() + seen).tolist()
            seen += len(images)
            chunks.append(self._patches(images))
        if seen == 0:
            raise DataError("PatchCore.fit got no training images; give it at least 1 good image.")
        if hp["colour_weight"] > 0:
            self._weigh_colour(chunks)
        # The bank's size is set by the unmirrored patches: mirrors widen the choice, not the bank.
        n = sum(map(len, chunks))
        size = max(1, min(n, round(hp["coreset_ratio"] * n)))
        origin = torch.arange(seen)  # the training image each pooled image came from (mirrors: the original)
        ratio = selected = None
        if flips == "auto":  # the check measures against the unmirrored bank, which then stays if it fails
            selected = self._select(chunks, size)
            ratio = self._mirror_ratio(torch.cat(checked), checked_at, selected // self._grid_cells)
        if flips is True or (ratio is not None and ratio <= FLIP_RATIO):
            origin = torch.cat([origin, self._add_mirrors(chunks, batches)])
            selected = None  # the pool has grown: select again
        if selected is None:
            selected = self._select(chunks, size)
        self.fit_info = {"flips_used": bool(len(origin) > seen),
                         "mirror_distance_ratio": None if ratio is None else round(ratio, 4)}
        if hp["position_calibration"] > 0:
            owner = origin.to(selected.device)[selected // self._grid_cells]
            self.position_scale = self._position_scale(chunks, owner, seen)
        return self

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B * h * w, D) float32 patch features, image by image; records the grid."""
        embedding = self._embed(images)
        self._grid = tuple(embedding.shape[-2:])
        return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]).float()

    @property
    def _grid_cells(self) -> int:
        return self._grid[0] * self._grid[1]

    @torch.no_grad()
    def update(self, batches: Iterable[Batch]) -> PatchCore:
        """Learn more good images without fitting again (the engine's refit with the validation
        images): their patches, and their mirror images' if the fit added mirrors, join the bank's
        rows as the pool, and the greedy coreset continues from the bank, which grows by
        `coreset_ratio` of the new images' patches.  Colour and position scales stay as fitted.
        Costs the new images' features plus a continuation of the selection: on 48 + 12 mirrored
        textures at 256 px, ~3 s against ~16 s for a fresh fit on all 60, at the same AUROC."""
        if not self.fitted:
            raise AnomalensError("PatchCore is not fitted; call fit() before update().")
        # A checkpoint older than the fit record only knows the setting, not what "auto" chose.
        mirrored = self.fit_info.get("flips_used", self.hparams["flips"] is True)
        chunks, originals = [], 0
        for batch in track(batches, "PatchCore: adding images"):
            images = images_of(batch).to(self.memory_bank.device)
            originals += len(images)
            for dims in [(), *FLIPS] if mirrored else [()]:
                chunks.append(self._patches(images.flip(dims) if dims else images))
        if originals:
            bank = len(self.memory_bank)
            added = round(self.hparams["coreset_ratio"] * originals * self._grid_cells)
            self._select([self.memory_bank, *chunks], bank + added, given=bank)
        return self

    def _select(self, chunks: list[torch.Tensor], size: int, given: int = 0) -> torch.Tensor:
        """Greedy coreset of `size` pooled patches (sorted pool indices); sets the memory bank to them.
        `given` > 0: the pool's first rows are the bank, kept, and the selection continues from them."""
        hp = self.hparams
        projected = torch.cat([random_projection(c, hp["projection_dim"], hp["seed"]) for c in chunks])
        selected = greedy_coreset(projected, size, seed=hp["seed"], given=given).sort().values
        del projected
        # Gather the selected rows, block by block, at their original dimension.
        bank, offset = [], 0
        for c in chunks:
            inside = selected[(selected >= offset) & (selected < offset + len(c))]
            bank.append(c.index_select(0, inside - offset))
            offset += len(c)
        self.memory_bank = torch.cat(bank)
        return selected

    def _add_mirrors(self, chunks: list[torch.Tensor], batches: Iterable[Batch]) -> torch.Tensor:
        """Append the mirror images' patches to `chunks` (a second pass); returns their originals' indices."""
        origin, seen = [], 0
        for batch in track(batches, "PatchCore: adding mirrored images"):
            images = images_of(batch).to(self.memory_bank.device)
            for dims in FLIPS:  # one mirror image at a time: memory
                chunks.append(self._patches(images.flip(dims)))
                origin.append(torch.arange(seen, seen + len(images)))
            seen += len(images)
        return torch.cat(origin)

    def _mirror_ratio(self, images: torch.Tensor, indices: list[int], owner: torch.Tensor) -> float | None:
        """flips "auto": how much farther from the bank the check images' mirror images lie than the
        images themselves, each scored against the bank without its own patches (`indices`: the
        images' places in the training stream; `owner`: the training image of each bank row).
        A random sample of training patches instead of the bank did not separate the sets (demo
        grass 1.047 against magnetic tiles 1.030 at 128 px).  None when there are too few images."""
        if len(images) < CHECK_MIN:
            return None
        rows = slice(None, None, CHECK_STRIDE)

        def median_distance(view: torch.Tensor) -> torch.Tensor:
            patches = self._embed(view).flatten(2).transpose(1, 2)[:, rows]  # (B, P', D)
            return torch.stack([nearest_distances(p, self.memory_bank[owner != i])[0].median()
                                for p, i in zip(patches, indices, strict=True)])

        return worst_mirror_ratio(median_distance, images)

    def _position_scale(self, chunks: list[torch.Tensor], owner: torch.Tensor, originals: int) -> torch.Tensor:
        """(h, w) scale with mean 1 that forward divides the distances by.

        Each position's typical distance is its mean nearest-bank distance over good training images,
        each scored against the bank without its own patches (as a new good image would be scored).
        Positions that good images never match closely, such as border cells whose receptive fields
        reach into the zero padding, then no longer hold every good image's maximum.  The scale is
        that typical distance, relative to the mean over positions, to the power
        `position_calibration` (0: no scaling, 1: full).  `owner`: the training image each bank
        feature came from (a mirror image's: its original's, so that it is held out too); the
        `originals` come first in `chunks`."""
        h, w = self._grid
        images = [image for c in chunks for image in c.split(h * w)]  # views, one (h*w, D) per image
        chosen = torch.linspace(0, originals - 1, min(originals, CALIBRATION_IMAGES)).round().long().unique()
        totals, counted = torch.zeros(h * w, dtype=torch.float64), 0
        for i in track(chosen.tolist(), "PatchCore: calibrating positions"):
            others = self.memory_bank[owner != i]
            if len(others):
                totals += nearest_distances(images[i], others)[0].squeeze(1).double().cpu()
                counted += 1
        if counted == 0:  # a single training image: nothing to hold out
            return torch.ones(h, w, device=self.memory_bank.device)
        typical = totals / counted
        relative = (typical / typical.mean().clamp_min(1e-12)).clamp_min(1e-6)
        return relative.pow(self.hparams["position_calibration"]).float().view(h, w).to(self.memory_bank.device)

    def _weigh_colour(self, chunks: list[torch.Tensor]) -> None:
        """Scale the colour columns (the last 3) in place so that their spread is `colour_weight` times
        an average backbone layer's; a spread is the root mean squared distance of the patches'
        columns to their mean."""
        bounds = torch.tensor([0, *self.backbone.channels, 3]).cumsum(0).tolist()
        n = sum(len(c) for c in chunks)
        mean = sum(c.sum(0, dtype=torch.float64) for c in chunks) / n
        squares = sum((c.double() - mean).pow(2).sum(0) for c in chunks) / n
        variance = [squares[a:b].sum() for a, b in itertools.pairwise(bounds)]
        layer_variance = sum(variance[:-1]) / len(variance[:-1])
        scale = self.hparams["colour_weight"] * (layer_variance / variance[-1].clamp_min(1e-12)).sqrt()
        for c in chunks:
            c[:, -3:] *= scale.to(c.dtype)
        self.colour_scale.fill_(float(scale))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if not self.fitted:
            raise AnomalensError("PatchCore is not fitted; call fit() first.")
        embedding = self._embed(images)
        b, d, h, w = embedding.shape
        patches = embedding.permute(0, 2, 3, 1).reshape(b, h * w, d)
        dist, nearest = self.patch_search(patches.reshape(-1, d), self.memory_bank)
        dist, nearest = dist.view(b, h * w), nearest.view(b, h * w)
        if self.hparams["position_calibration"] > 0:
            dist = dist / self._scale_for((h, w)).reshape(1, h * w)
        anomaly_map = upsample_and_blur(dist.view(b, 1, h, w), tuple(images.shape[-2:]), self.hparams["blur_sigma"])
        return AnomalyOutput(score=self._image_score(patches, dist, nearest), anomaly_map=anomaly_map)

    def _scale_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The fitted position scale on `grid`, resized when images arrive at another size."""
        scale = self.position_scale
        if tuple(scale.shape) == grid:
            return scale
        return F.interpolate(scale[None, None], size=grid, mode="bilinear", align_corners=False)[0, 0]

    def _image_score(self, patches: torch.Tensor, dist: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Eq. 7: the largest patch distance s*, re-weighted by how isolated its nearest bank feature is."""
        s_star, where = dist.max(dim=1)  # (B,)
        rows = torch.arange(len(where), device=where.device)
        k = min(self.hparams["num_neighbors"], len(self.memory_bank))
        if k == 1:
            return s_star
        worst = patches[rows, where]  # (B, D) the most anomalous patch of each image
        m_star = self.memory_bank[nearest[rows, where]]  # its nearest bank feature
        _, neighbours = nearest_distances(m_star, self.memory_bank, k=k)  # N_b(m*), m* itself first
        to_neighbours = (worst.unsqueeze(1) - self.memory_bank[neighbours]).norm(dim=2)  # (B, k)
        to_m_star = (worst - m_star).norm(dim=1)  # = s* up to rounding; same formula as the line above
        # 1 - softmax at m*, in log space: exp of distances overflows float32 beyond ~88.
        weight = 1 - torch.exp(to_m_star - torch.logsumexp(to_neighbours, dim=1))
        return weight * s_star
