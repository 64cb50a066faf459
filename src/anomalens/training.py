"""The training loop for trained models (tags["trainable"] = True).

A trained model implements `training_step(batch) -> {"loss": tensor, ...}` and may override
`on_train_start(batches)` (statistics before the first epoch) and `prepare_inference(batches)`
(whatever inference needs after training, e.g. map-normalisation quantiles).  Everything else
lives here, once: optimizer and schedule from the config (the model's paper defaults where the
config is silent), epochs or steps, gradient clipping, mixed precision, validation every n
epochs, early stopping on a chosen metric, and keeping the best weights.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .errors import ConfigError, Interval, ListOf, OneOf, validate_params
from .progress import bar

OPTIMIZER_RULES = {
    "name": OneOf("adam", "adamw", "sgd"),
    "lr": Interval(float, 0, None, "neither"),
    "weight_decay": Interval(float, 0),
    "momentum": Interval(float, 0, 1),
    "betas": ListOf(Interval(float, 0, 1, "left"), 2),
}
SCHEDULER_RULES = {
    "name": OneOf("none", "cosine", "step", "multistep", "exponential"),
    "step_size": Interval(int, 1),
    "milestones": ListOf(Interval(int, 1), 1),
    "gamma": Interval(float, 0, 1, "right"),
    "min_lr": Interval(float, 0),
}
EARLY_STOPPING_RULES = {
    "monitor": OneOf("val_loss", "val_image_AUROC", "val_pixel_AUROC", "val_pixel_AUPRO"),
    "patience": Interval(int, 1),
    "min_delta": Interval(float, 0),
}
MINIMISED = {"val_loss"}  # every other monitored metric is maximised
PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass
class TrainSettings:
    """Resolved training settings: the model's defaults overridden by the config's trainer section."""

    max_epochs: int = 10
    max_steps: int | None = None
    batch_size: int | None = None  # training batches; None: the dataset's batch size
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adam", "lr": 1e-3})
    scheduler: dict[str, Any] | None = None
    gradient_clip: float | None = None
    precision: str = "32"
    val_every_n_epochs: int = 1
    early_stopping: dict[str, Any] | None = None

    @classmethod
    def resolve(cls, model_defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> TrainSettings:
        names = {f.name for f in fields(cls)}
        merged = {k: v for k, v in model_defaults.items() if k in names}
        merged.update({k: v for k, v in (overrides or {}).items() if k in names and v is not None})
        optimizer = (overrides or {}).get("optimizer")
        if optimizer is not None and "name" not in optimizer:  # {lr: 0.01} tweaks the model's own optimizer
            merged["optimizer"] = {**model_defaults.get("optimizer", {"name": "adam", "lr": 1e-3}), **optimizer}
        settings = cls(**merged)
        settings.validate()
        return settings

    def validate(self) -> None:
        validate_params("the trainer optimizer", self.optimizer, OPTIMIZER_RULES)
        if "name" not in self.optimizer or "lr" not in self.optimizer:
            raise ConfigError("The trainer optimizer needs a 'name' and an 'lr', e.g. {name: adam, lr: 0.001}. "
                              f"Got {self.optimizer!r} instead.")
        if self.scheduler is not None:
            validate_params("the trainer scheduler", self.scheduler, SCHEDULER_RULES)
        if self.early_stopping is not None:
            validate_params("the trainer early_stopping", self.early_stopping, EARLY_STOPPING_RULES)
            if "monitor" not in self.early_stopping:
                raise ConfigError("The trainer early_stopping needs a 'monitor' (val_loss, val_image_AUROC, "
                                  "val_pixel_AUROC or val_pixel_AUPRO).")


def build_optimizer(parameters: Iterable[torch.nn.Parameter], spec: Mapping[str, Any]) -> torch.optim.Optimizer:
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    if spec["name"] != "sgd":
        kwargs.pop("momentum", None)
    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[spec["name"]](
        list(parameters), **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: Mapping[str, Any] | None, epochs: int):
    """An epoch-wise learning-rate schedule, or None."""
    if not spec or spec["name"] == "none":
        return None
    sched = torch.optim.lr_scheduler
    name = spec["name"]
    if name == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=max(1, epochs), eta_min=spec.get("min_lr", 0.0))
    if name == "step":
        return sched.StepLR(optimizer, step_size=spec.get("step_size", max(1, epochs // 3)),
                            gamma=spec.get("gamma", 0.1))
    if name == "multistep":
        return sched.MultiStepLR(optimizer, milestones=spec.get("milestones", [max(1, epochs * 2 // 3)]),
                                 gamma=spec.get("gamma", 0.1))
    return sched.ExponentialLR(optimizer, gamma=spec.get("gamma", 0.95))


def _improved(value: float, best: float | None, monitor: str, min_delta: float) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if monitor in MINIMISED else value > best + min_delta


class Trainer:
    """Runs the loop; `validate()` (optional) returns validation logs such as val_loss and image_AUROC."""

    def __init__(self, model: torch.nn.Module, settings: TrainSettings, device: torch.device | str = "cpu",
                 validate: Callable[[], dict[str, float]] | None = None,
                 on_epoch_end: Callable[[int, dict[str, float]], None] | None = None):
        self.model, self.settings, self.device = model, settings, torch.device(device)
        self.validate, self.on_epoch_end = validate, on_epoch_end
        self.history: list[dict[str, float]] = []
        self.best_epoch: int | None = None

    def fit(self, batches: Iterable[Any]) -> list[dict[str, float]]:
        s, model = self.settings, self.model
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"{type(model).__name__} has no trainable parameters.")
        optimizer = build_optimizer(params, s.optimizer)
        scheduler = build_scheduler(optimizer, s.scheduler, s.max_epochs)
        amp_dtype = PRECISIONS[s.precision]
        scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype is torch.float16
                                      and self.device.type == "cuda")
        monitor = (s.early_stopping or {}).get("monitor")
        patience = (s.early_stopping or {}).get("patience", 5)
        min_delta = (s.early_stopping or {}).get("min_delta", 0.0)
        best, best_state, stale, step = None, None, 0, 0

        model.on_train_start(batches)
        # enable_grad: a caller inside torch.no_grad() must still get a trained model.
        with torch.enable_grad(), bar(f"Training {type(model).__name__}", total=s.max_epochs) as progress:
            for epoch in range(s.max_epochs):
                model.train()
                losses: dict[str, float] = {}
                n = 0
                # A model may split a batch into several optimiser steps (CFlow: patch-vector batches).
                for batch in (unit for images in batches for unit in model.training_units(images)):
                    with torch.autocast(self.device.type, dtype=amp_dtype or torch.float32,
                                        enabled=amp_dtype is not None):
                        out = model.training_step(batch)
                    loss = out["loss"]
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"{type(model).__name__} training loss became {loss.item()} at "
                                                 f"epoch {epoch + 1}; lower trainer.optimizer.lr or set "
                                                 "trainer.gradient_clip.")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if s.gradient_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, s.gradient_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    for key, value in out.items():
                        losses[f"train_{key}"] = losses.get(f"train_{key}", 0.0) + float(value.detach())
                    n += 1
                    step += 1
                    if s.max_steps is not None and step >= s.max_steps:
                        break
                if scheduler is not None:
                    scheduler.step()
                logs = {k: v / max(n, 1) for k, v in losses.items()}
                logs["lr"] = optimizer.param_groups[0]["lr"]
                last = epoch + 1 == s.max_epochs or (s.max_steps is not None and step >= s.max_steps)
                if self.validate is not None and ((epoch + 1) % s.val_every_n_epochs == 0 or last):
                    model.eval()
                    model.prepare_inference(batches)
                    logs.update(self.validate())
                self.history.append({"epoch": epoch + 1, **logs})
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch + 1, logs)
                progress.advance()
                progress.show(**{k: v for k, v in logs.items() if k != "lr"})
                if monitor and monitor in logs:
                    if _improved(logs[monitor], best, monitor, min_delta):
                        best, stale, self.best_epoch = logs[monitor], 0, epoch + 1
                        best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
                    else:
                        stale += 1
                        if stale >= patience:
                            break
                if last:
                    break
        if best_state is not None:
            model.load_state_dict(best_state)  # keep the best epoch's weights, not the last
        model.eval()
        model.prepare_inference(batches)
        return self.history


__all__ = ["TrainSettings", "Trainer", "build_optimizer", "build_scheduler"]
