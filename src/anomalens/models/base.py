"""The model contract and the one output type every model returns.

A model is an nn.Module whose constructor only stores (validated) parameters;
`fit` learns from good images and returns self; learned state lives in buffers
or parameters so that `state_dict()` is the whole checkpoint.  `forward` takes
images in [0, 1] (B, 3, H, W) and returns raw scores: higher = more anomalous.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..data.sample import Batch
from ..errors import Constraint, validate_params


@dataclass
class AnomalyOutput:
    """The one output type, from a model and (filled in) after post-processing.

    A model fills `score` (B,) and `anomaly_map` (B, 1, H, W) at the input resolution, both raw
    (higher = more anomalous).  The post-processor adds the normalised values (0.5 = threshold)
    and the decisions; every runtime (torch, ONNX, OpenVINO) returns this same type.
    """

    score: torch.Tensor
    anomaly_map: torch.Tensor
    norm_score: torch.Tensor | None = None  # (B,) strictly monotonic in score, threshold -> 0.5
    norm_map: torch.Tensor | None = None  # (B, 1, H, W), pixel threshold -> 0.5
    pred_label: torch.Tensor | None = None  # (B,) bool, True = defective
    pred_mask: torch.Tensor | None = None  # (B, 1, H, W) bool


class AnomalyModel(nn.Module):
    """Base class: parameter validation, fitted-buffer bookkeeping, the fit/forward contract."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line, shown by `anomalens models`
    # Parameter name -> Constraint; defaults come from `defaults`.
    constraints: ClassVar[dict[str, Constraint]] = {}
    defaults: ClassVar[dict[str, Any]] = {}
    # Per-model facts the common test-suite and engine read (never `if name == ...`).
    tags: ClassVar[dict[str, Any]] = {"trainable": False}

    def __init__(self, **params: Any):
        super().__init__()
        validate_params(type(self).__name__, params, self.constraints)
        self.hparams: dict[str, Any] = {**self.defaults, **params}
        # What `fit` chose from the data (e.g. PaDiM's flips); the run record keeps it (metrics.json).
        self.fit_info: dict[str, Any] = {}

    # Trained models: the paper's (or a CPU-feasible) training recipe, overridable from the
    # config's trainer section: max_epochs, optimizer {name, lr, ...}, scheduler, gradient_clip.
    training_defaults: ClassVar[dict[str, Any]] = {}

    # -- contract ---------------------------------------------------------------------------
    def fit(self, batches: Iterable[Batch], **train_overrides: Any) -> AnomalyModel:
        """Learn from batches of good images (`batch.image`); return self.

        Memory-bank models override this (use `anomalens.progress.track` for long loops).  Trained
        models implement `training_step` instead and inherit this: the shared loop with their
        `training_defaults` (the engine runs the same loop with validation and early stopping).
        """
        if not self.tags.get("trainable"):
            raise NotImplementedError(f"{type(self).__name__} must implement fit()")
        from ..training import Trainer, TrainSettings

        device = next(self.parameters()).device
        Trainer(self, TrainSettings.resolve(self.training_defaults, train_overrides), device).fit(batches)
        return self

    def update(self, batches: Iterable[Batch]) -> AnomalyModel:
        """Fitted one-pass models tagged "updatable": learn more good images in place, without
        fitting again; return self.  The engine's refit uses it when it can."""
        raise NotImplementedError(f"{type(self).__name__} cannot learn more images without fitting again")

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Trained models: one optimisation step's losses; the key 'loss' is minimised."""
        raise NotImplementedError

    def training_units(self, batch: Batch) -> Iterable[Any]:
        """Trained models: what one batch is split into, one `training_step` and optimiser step each.

        Default: the batch itself.  CFlow computes the frozen encoder's features once and yields
        several random patch-vector batches, as in its paper.
        """
        return (batch,)

    def on_train_start(self, batches: Iterable[Batch]) -> None:
        """Trained models: called once before the first epoch (e.g. feature statistics)."""

    def prepare_inference(self, batches: Iterable[Batch]) -> None:
        """Trained models: called after training and before each validation (e.g. map quantiles)."""

    def forward(self, images: torch.Tensor) -> AnomalyOutput:  # pragma: no cover - interface
        raise NotImplementedError

    # -- the "trained" flag of trained models -------------------------------------------------
    def register_trained_flag(self) -> None:
        """Trained models: a buffer that stays empty until the first training step.  `fitted`
        reads its shape, not its value, so that checking it in forward stays exportable."""
        self.register_buffer("trained", torch.empty(0))

    def mark_trained(self) -> None:
        """Trained models: call in `training_step`."""
        if not self.fitted:
            self.trained = torch.ones(1, device=self.trained.device)

    @property
    def fitted(self) -> bool:
        """Whether the model can predict.  Models without the trained flag override this."""
        return self.trained.numel() > 0

    # -- checkpoint support -----------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        # Fitted buffers (memory banks, Gaussians) have data-dependent shapes: resize ours first.
        own = dict(self.named_buffers())
        for key, value in state_dict.items():
            if key in own and own[key].shape != value.shape:
                module_path, _, buf_name = key.rpartition(".")
                module = self.get_submodule(module_path) if module_path else self
                module._buffers[buf_name] = torch.empty_like(value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
