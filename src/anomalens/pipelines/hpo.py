"""Hyper-parameter search over any config field: `anomalens hpo --config hpo.yaml`.

An HPO file names a base config and the dotted config keys to search (see configs/hpo/):

    base: ../padim.yaml                   # a config file (relative to this file) or an inline mapping
    overrides: {visualization.save_images: false}   # dotted keys set in the base for every trial
    search_space:
      model.n_features: {type: int, low: 50, high: 300, step: 10}
      model.blur_sigma: {type: float, low: 1.0, high: 8.0}
      trainer.optimizer.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
      model.layers: {type: categorical, choices: [[blocks.1, blocks.2], [blocks.2, blocks.4]]}
    objective: {metric: image_AUROC, direction: maximize, split: test}
    n_trials: 30
    sampler: tpe                          # tpe | random | grid, or {name: tpe, n_startup_trials: 5, ...}
    pruner: none                          # none | median | percentile | hyperband | successive_halving | threshold
    backend: optuna                       # optuna | comet (Comet Optimizer; needs a Comet API key)

Each trial is an ordinary run (fit, calibrate, test) of the base config with the trial's values
set, written under <output>/trials/.  Optuna keeps the study in a storage (sqlite in the output
folder by default, or any RDB URL such as postgresql://... shared by workers on many machines),
so a study can be resumed and several workers can feed one study.  Pruning stops a trained model
early from its per-epoch validation logs (the pruner sees them through an engine callback).
The report (trials.csv, best_config.yaml, parameter statistics, plots) is written by
hpo_report.py once the trials are done.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import os
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..callbacks import Callback, StopRun
from ..errors import AnomalensError, ConfigError, missing_dependency, param_error

# --------------------------------------------------------------------------- vocabulary
BACKENDS = ("optuna", "comet")
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler"}
PRUNERS = {"none": "NopPruner", "median": "MedianPruner", "percentile": "PercentilePruner",
           "hyperband": "HyperbandPruner", "successive_halving": "SuccessiveHalvingPruner",
           "threshold": "ThresholdPruner"}
SPLITS = ("test", "val")
TIMINGS = ("fit_seconds", "calibrate_seconds", "test_seconds")
# Metrics a study may optimise, with their natural direction (the default when none is given).
MINIMISED_METRICS = {"false_reject_rate", "escape_rate", *TIMINGS}
# The per-epoch validation logs a pruner may watch (Engine.validation_logs); val_loss falls.
MONITORS = ("val_loss", "val_image_AUROC", "val_pixel_AUROC", "val_pixel_AUPRO")
SPEC_KEYS = ("base", "overrides", "search_space", "objective", "n_trials", "sampler", "pruner", "backend", "storage",
             "study_name", "output", "seed", "log_trials", "grid_size", "comet")
PARAM_KEYS = {"int": ("type", "low", "high", "step", "log"), "float": ("type", "low", "high", "step", "log"),
              "categorical": ("type", "choices")}
TYPE_ALIASES = {"integer": "int", "log_float": "float", "loguniform": "float", "choice": "categorical"}


def objective_metrics() -> tuple[str, ...]:
    from ..metrics import METRIC_KEYS

    return tuple(k for k in METRIC_KEYS if not k.endswith("_threshold")) + TIMINGS


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise missing_dependency("optuna", "hpo") from None
    # Optuna's per-trial INFO lines would double ours (one line per trial, see _announce).
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _unknown(key: str, allowed: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"Unknown key {key!r} in {where}.{hint} Allowed: {', '.join(allowed)}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _label(value: Any) -> str:
    """A choice as one line of YAML: [blocks.1, blocks.2], true, null, resnet18."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- search space
@dataclass(frozen=True)
class Param:
    """One searched config key: an int or float range (optionally log-scaled or stepped) or a choice.

    Optuna stores categorical choices as they are when they are plain scalars, else as their YAML
    label ("[blocks.1, blocks.2]"); `encode` / `decode` translate between stored and config values.
    """

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()

    @classmethod
    def parse(cls, key: str, spec: Any) -> Param:
        owner = f"search_space {key!r}"
        if isinstance(spec, list):  # shorthand: a list is the choices of a categorical
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, dict):
            raise ConfigError(f"The search_space entry {key!r} must be a mapping such as {{type: float, low: 0.1, "
                              f"high: 1.0}} or a list of choices. Got {spec!r} instead.")
        spec = dict(spec)
        kind = spec.get("type")
        if kind == "log_float" or kind == "loguniform":
            spec["log"] = spec.get("log", True)
        kind = TYPE_ALIASES.get(kind, kind)
        if kind not in PARAM_KEYS:
            raise param_error(owner, "type", "one of 'int', 'float', 'log_float', 'categorical'", spec.get("type"))
        for name in spec:
            if name not in PARAM_KEYS[kind]:
                raise _unknown(name, PARAM_KEYS[kind], f"{owner} (type {kind})")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise param_error(owner, "choices", "a non-empty list", choices)
            param = cls(key, kind, choices=tuple(choices))
            if len({_label(c) for c in choices}) != len(choices):
                raise param_error(owner, "choices", "a list without duplicates", choices)
            return param
        number = "an int" if kind == "int" else "a float"
        check = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if kind == "int" else _is_number
        for name in ("low", "high"):
            if name not in spec:
                raise ConfigError(f"The search_space entry {key!r} needs '{name}' (type {kind}).")
            if not check(spec[name]):
                raise param_error(owner, name, number, spec[name])
        low, high = spec["low"], spec["high"]
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise param_error(owner, "log", "a bool", log)
        if not low < high:
            raise param_error(owner, "high", f"{number} greater than low ({low})", high)
        if log and low <= 0:
            raise param_error(owner, "low", f"{number} > 0 (log: true)", low)
        step = spec.get("step")
        if step is not None:
            if not check(step) or step <= 0:
                raise param_error(owner, "step", f"{number} > 0", step)
            if log and step != 1:
                raise ConfigError(f"The search_space entry {key!r} has both log: true and a step; use one of them.")
        if kind == "float":
            low, high = float(low), float(high)
            step = None if step is None else float(step)
        return cls(key, kind, low, high, step if step != 1 or kind == "float" else None, log)

    # -- values ------------------------------------------------------------------------------
    @property
    def labelled(self) -> bool:
        """True when the choices are stored as YAML labels (lists, mappings: Optuna takes scalars only)."""
        return self.type == "categorical" and not all(
            c is None or isinstance(c, (bool, int, float, str)) for c in self.choices)

    def encode(self, value: Any) -> Any:
        """Config value -> the value a study stores."""
        if self.labelled:
            return _label(value)
        return value

    def decode(self, stored: Any) -> Any:
        """Stored value -> config value (a copy: trials must not share mutable choices)."""
        if self.type == "categorical":
            for choice in self.choices:
                if _same(self.encode(choice), stored):
                    return copy.deepcopy(choice)
            for choice in self.choices:  # a backend that hands back labels or strings (Comet)
                if _label(choice) == str(stored) or (_is_number(choice) and _as_float(stored) == choice):
                    return copy.deepcopy(choice)
            raise AnomalensError(f"The value {stored!r} is not one of the choices of search_space {self.key!r}.")
        if self.type == "int":
            return int(round(float(stored)))
        return float(stored)

    def index(self, value: Any) -> int:
        """Position of a config value among the choices (categoricals)."""
        for i, choice in enumerate(self.choices):
            if _same(choice, value) or _label(choice) == _label(value):
                return i
        raise AnomalensError(f"The value {value!r} is not one of the choices of search_space {self.key!r}.")

    def numeric(self, value: Any) -> float:
        """A number for statistics and plots: the value itself, or a categorical's choice index."""
        return float(self.index(value)) if self.type == "categorical" else float(value)

    def representatives(self) -> list[Any]:
        """Values checked against the base config before any trial runs: both ends, every choice."""
        return list(self.choices) if self.type == "categorical" else [self.decode(self.low), self.decode(self.high)]

    def grid(self, size: int) -> list[Any]:
        """Stored values of a grid search: every choice, the stepped range, else `size` points."""
        import numpy as np

        if self.type == "categorical":
            return [self.encode(c) for c in self.choices]
        if self.step is not None or (self.type == "int" and self.high - self.low + 1 <= size):
            step = self.step or 1
            n = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
            values = [self.low + i * step for i in range(n)]
        elif self.log:
            values = np.geomspace(self.low, self.high, size).tolist()
        else:
            values = np.linspace(self.low, self.high, size).tolist()
        if self.type == "int":
            return sorted({int(round(v)) for v in values})
        return [float(round(v, 12)) for v in values]

    # -- optuna --------------------------------------------------------------------------------
    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial for a value; returns the config value."""
        if self.type == "categorical":
            return self.decode(trial.suggest_categorical(self.key, [self.encode(c) for c in self.choices]))
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def distribution(self) -> Any:
        optuna = import_optuna()
        d = optuna.distributions
        if self.type == "categorical":
            return d.CategoricalDistribution([self.encode(c) for c in self.choices])
        if self.type == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> str:
        if self.type == "categorical":
            return "one of " + ", ".join(_label(c) for c in self.choices)
        text = f"{self.type} in [{self.low:g}, {self.high:g}]"
        return text + (" log" if self.log else "") + (f" step {self.step:g}" if self.step else "")

    def to_dict(self) -> dict[str, Any]:
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.type, "low": self.decode(self.low), "high": self.decode(self.high)}
        if self.step is not None:
            out["step"] = self.decode(self.step)
        if self.log:
            out["log"] = True
        return out


# --------------------------------------------------------------------------- the study spec
@dataclass
class HpoSpec:
    """A validated HPO file: what to search, how, and where the study lives."""

    base: dict[str, Any]
    space: dict[str, Param]
    metric: str = "image_AUROC"
    direction: str = "maximize"
    split: str = "test"
    n_trials: int | None = 20
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    backend: str = "optuna"
    storage: str | None = None
    study_name: str = "hpo"
    output: Path = Path("runs/hpo/hpo")
    seed: int = 42
    log_trials: bool = True
    grid_size: int = 5
    comet: dict[str, Any] = field(default_factory=dict)

    @property
    def storage_url(self) -> str:
        """The Optuna storage: the one given, else sqlite:///<output>/study.db."""
        return self.storage or f"sqlite:///{(self.output / 'study.db').resolve()}"

    @property
    def monitor(self) -> str | None:
        """The validation log the pruner watches (None: decided at the first epoch, see PruningCallback)."""
        return self.pruner.get("monitor")

    def base_config(self, values: Mapping[str, Any] | None = None):
        """The base config with `values` (dotted keys) set, validated."""
        from ..config import apply_overrides, config_from_dict

        return config_from_dict(apply_overrides(self.base, dict(values or {})))

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (base inlined, paths absolute): what workers load."""
        return {"base": self.base, "search_space": {k: p.to_dict() for k, p in self.space.items()},
                "objective": {"metric": self.metric, "direction": self.direction, "split": self.split},
                "n_trials": self.n_trials, "sampler": self.sampler, "pruner": self.pruner, "backend": self.backend,
                "storage": self.storage_url if self.backend == "optuna" else self.storage,
                "study_name": self.study_name, "output": str(self.output.resolve()), "seed": self.seed,
                "log_trials": self.log_trials, "grid_size": self.grid_size, "comet": self.comet}


def load_spec(path: str | Path, overrides: Mapping[str, Any] | None = None, **settings: Any) -> HpoSpec:
    """Read an HPO file; `overrides` (dotted keys) apply to the base config, `settings` (n_trials,
    storage, study_name, output, backend; None = keep the file's) to the study."""
    from ..config import load_yaml

    path = Path(path)
    data = load_yaml(path)
    data.update({k: v for k, v in settings.items() if v is not None})
    return spec_from_dict(data, base_dir=path.parent, default_name=f"hpo-{path.stem}", overrides=overrides)


def spec_from_dict(data: Mapping[str, Any], base_dir: str | Path = ".", default_name: str = "hpo",
                   overrides: Mapping[str, Any] | None = None) -> HpoSpec:
    """Validate a raw HPO mapping; every mistake raises a ConfigError naming the key at fault."""
    from ..config import apply_overrides, load_yaml

    data = dict(data)
    for key in data:
        if key not in SPEC_KEYS:
            raise _unknown(key, SPEC_KEYS, "the HPO file")
    base = data.get("base", {})
    if isinstance(base, str):
        base_path = Path(base) if Path(base).is_absolute() else Path(base_dir) / base
        base = load_yaml(base_path)
    elif base is None:
        base = {}
    if not isinstance(base, dict):
        raise ConfigError(f"The 'base' of the HPO file must be a config file path or a config mapping. "
                          f"Got {base!r} instead.")
    fixed = data.get("overrides") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"The 'overrides' of the HPO file must be a mapping of dotted config keys to values "
                          f"(e.g. dataset.image_size: 128). Got {fixed!r} instead.")
    base = apply_overrides(base, {**fixed, **dict(overrides or {})})

    raw_space = data.get("search_space")
    if not isinstance(raw_space, dict) or not raw_space:
        raise ConfigError("The HPO file needs a 'search_space': a mapping of dotted config keys to ranges, e.g. "
                          "{model.n_features: {type: int, low: 50, high: 300}}.")
    space = {str(key): Param.parse(str(key), spec) for key, spec in raw_space.items()}

    objective = data.get("objective") or {}
    if isinstance(objective, str):
        objective = {"metric": objective}
    if not isinstance(objective, dict):
        raise ConfigError(f"The 'objective' of the HPO file must be a mapping {{metric, direction, split}}. "
                          f"Got {objective!r} instead.")
    for key in objective:
        if key not in ("metric", "direction", "split"):
            raise _unknown(key, ("metric", "direction", "split"), "'objective'")
    metric = objective.get("metric", "image_AUROC")
    if metric not in objective_metrics():
        raise param_error("the HPO objective", "metric", "one of " + ", ".join(objective_metrics()), metric)
    direction = objective.get("direction", "minimize" if metric in MINIMISED_METRICS else "maximize")
    if direction not in ("maximize", "minimize"):
        raise param_error("the HPO objective", "direction", "one of 'maximize', 'minimize'", direction)
    split = objective.get("split", "test")
    if split not in SPLITS:
        raise param_error("the HPO objective", "split", "one of 'test', 'val'", split)
    if split == "val" and metric in TIMINGS:
        raise ConfigError(f"The objective {metric!r} is a duration; it has no split. Remove objective.split.")

    sampler = _named(data.get("sampler", "tpe"), "sampler", SAMPLERS)
    pruner = _named(data.get("pruner", "none"), "pruner", PRUNERS)
    if "monitor" in pruner and pruner["monitor"] not in MONITORS:
        raise param_error("the HPO pruner", "monitor", "one of " + ", ".join(repr(m) for m in MONITORS),
                          pruner["monitor"])
    backend = data.get("backend", "optuna")
    if backend not in BACKENDS:
        raise param_error("the HPO file", "backend", "one of 'optuna', 'comet'", backend)
    if backend == "comet" and pruner["name"] != "none":
        raise ConfigError("Pruning needs the optuna backend: the Comet Optimizer cannot stop a trial early. "
                          "Set pruner: none or backend: optuna.")

    n_trials = data.get("n_trials", 20)
    if n_trials is None and sampler["name"] != "grid":
        raise ConfigError("n_trials may be null only for a grid search (the whole grid); set n_trials.")
    if n_trials is not None and (not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1):
        raise param_error("the HPO file", "n_trials", "an int >= 1 (or null for a whole grid)", n_trials)
    for key, rule, expected in (("seed", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                                 "an int >= 0"),
                                ("log_trials", lambda v: isinstance(v, bool), "a bool"),
                                ("grid_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2,
                                 "an int >= 2"),
                                ("storage", lambda v: v is None or isinstance(v, str), "a URL string or null"),
                                ("study_name", lambda v: v is None or (isinstance(v, str) and v), "a str"),
                                ("output", lambda v: v is None or isinstance(v, str), "a folder path or null"),
                                ("comet", lambda v: v is None or isinstance(v, dict), "a mapping")):
        if key in data and not rule(data[key]):
            raise param_error("the HPO file", key, expected, data[key])

    spec = HpoSpec(base=base, space=space, metric=metric, direction=direction, split=split, n_trials=n_trials,
                   sampler=sampler, pruner=pruner, backend=backend, storage=data.get("storage"),
                   study_name=data.get("study_name") or default_name, seed=data.get("seed", base.get("seed", 42)),
                   log_trials=data.get("log_trials", True), grid_size=data.get("grid_size", 5),
                   comet=data.get("comet") or {})
    config = _check_base(spec)
    spec.output = Path(data.get("output") or Path(config.project.root) / "hpo" / spec.study_name)
    if backend == "optuna":
        make_pruner(spec)  # a wrong pruner setting fails now, not in every trial
        make_sampler(spec, 0)
    else:
        from .comet_optimizer import build_config, validate_config

        validate_config(build_config(spec))
    return spec


def _named(value: Any, what: str, known: Mapping[str, str]) -> dict[str, Any]:
    """'tpe' or {name: tpe, n_startup_trials: 5} -> {'name': 'tpe', ...}."""
    if isinstance(value, str) or value is None:
        value = {"name": value or "none"}
    if not isinstance(value, dict) or value.get("name") not in known:
        shown = value.get("name") if isinstance(value, dict) else value
        raise param_error(f"the HPO {what}", "name", "one of " + ", ".join(repr(k) for k in known), shown)
    return dict(value)


def _check_base(spec: HpoSpec):
    """The base config is valid, and so is every searched key at both ends of its range."""
    from ..registry import get_model_class

    config = spec.base_config()
    trainable = get_model_class(config.model_name).tags.get("trainable", False)
    for key, param in spec.space.items():
        if key.startswith("trainer.") and key != "trainer.device" and not trainable:
            raise ConfigError(f"The search_space key {key!r} has no effect: {config.model_name} is not trained "
                              "(no epochs, no optimizer). Search its model.* parameters instead.")
        for value in param.representatives():
            try:
                spec.base_config({key: value})
            except ConfigError as exc:
                raise ConfigError(f"The search_space entry {key!r} allows {value!r}, which the config rejects: "
                                  f"{exc}") from None
    return config


def make_sampler(spec: HpoSpec, worker: int) -> Any:
    """The Optuna sampler; each worker gets its own seed (equal seeds would propose equal trials)."""
    optuna = import_optuna()
    kwargs = {k: v for k, v in spec.sampler.items() if k != "name"}
    kwargs.setdefault("seed", spec.seed + worker)
    name = spec.sampler["name"]
    if name == "grid":
        kwargs["search_space"] = {key: p.grid(spec.grid_size) for key, p in spec.space.items()}
    try:
        return getattr(optuna.samplers, SAMPLERS[name])(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Invalid sampler settings {spec.sampler!r}: {exc}") from None


def make_pruner(spec: HpoSpec) -> Any:
    optuna = import_optuna()
    kwargs = {k: v for k, v in spec.pruner.items() if k not in ("name", "monitor")}
    try:
        return getattr(optuna.pruners, PRUNERS[spec.pruner["name"]])(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Invalid pruner settings {spec.pruner!r}: {exc}") from None


# --------------------------------------------------------------------------- one trial
class PrunedRun(StopRun):
    """The pruner stopped this trial's training."""


class PruningCallback(Callback):
    """Reports a validation log of each epoch to the Optuna trial and stops the run when it says prune.

    Values are reported in the study's direction: val_loss (which falls) is negated in a study that
    maximises, so the pruner compares like with like.  Without a `monitor`, the validation twin of
    the objective (val_image_AUROC for image_AUROC) is used when the validation split yields it,
    else val_loss.
    """

    def __init__(self, trial: Any, monitor: str | None, metric: str, direction: str):
        self.trial, self.monitor, self.metric, self.direction = trial, monitor, metric, direction
        self.reported = 0
        self.seen: set[str] = set()

    def sign(self, monitor: str) -> float:
        falls = monitor == "val_loss"
        return -1.0 if falls == (self.direction == "maximize") else 1.0

    def on_train_epoch_end(self, engine: Any, epoch: int, logs: dict[str, float]) -> None:
        self.seen |= set(logs)
        if self.monitor is None:
            twin = f"val_{self.metric}"
            if twin in logs and twin in MONITORS:
                self.monitor = twin
            elif "val_loss" in logs:
                self.monitor = "val_loss"
        value = logs.get(self.monitor) if self.monitor else None
        if value is None or not math.isfinite(value):
            return
        self.trial.report(self.sign(self.monitor) * float(value), epoch)
        self.reported += 1
        if self.trial.should_prune():
            raise PrunedRun(f"pruned after epoch {epoch}: {self.monitor} = {value:.4g}")

    def on_fit_end(self, engine: Any) -> None:
        if self.monitor and self.reported == 0 and self.seen:
            warnings.warn(f"The pruner's monitor {self.monitor!r} never appeared in the validation logs "
                          f"(seen: {', '.join(sorted(self.seen))}); this trial could not be pruned.", stacklevel=2)


@dataclass
class TrialResult:
    value: float
    metrics: dict[str, float]
    run_dir: str


def run_trial(spec: HpoSpec, values: Mapping[str, Any], number: int, callbacks: Sequence[Callback] = (),
              drop_loggers: Sequence[str] = (), progress: bool | None = None,
              run_dirs: list[str] | None = None) -> TrialResult:
    """Fit, calibrate and test the base config with `values` set; returns the objective.

    The run goes to <output>/trials/.../trial-NNNN; its folder is appended to `run_dirs` as soon as
    it exists (so that a failed trial still points at what it left).
    """
    from ..config import apply_overrides, config_from_dict
    from ..engine import Engine
    from ..progress import set_enabled

    data = apply_overrides(spec.base, dict(values))
    data = apply_overrides(data, {"project.root": str(spec.output / "trials"),
                                  "project.run_name": f"trial-{number:04d}", "visualization.show_images": False})
    logging = data.get("logging") or {}
    loggers = logging.get("logger", "csv") if spec.log_trials else "csv"
    loggers = [loggers] if isinstance(loggers, str) else list(loggers)
    data["logging"] = {**logging, "logger": [n for n in loggers if n not in drop_loggers] or "csv"}
    config = config_from_dict(data)
    set_enabled(config.trainer.progress if progress is None else progress)
    engine = Engine(config, callbacks=callbacks)
    try:
        engine.run()
    finally:
        if run_dirs is not None and engine.run_dir is not None:
            run_dirs.append(str(engine.run_dir))
    metrics = dict(engine.metrics)
    if spec.split == "val":
        metrics = _validation_metrics(engine)
    metrics.update(engine.timings)
    value = metrics.get(spec.metric, float("nan"))
    if value is None or not math.isfinite(value):
        hint = (" Pixel metrics need ground-truth masks." if spec.metric.startswith("pixel") else
                " The split needs both good and defective images." if "AUROC" in spec.metric else "")
        raise AnomalensError(f"The objective {spec.metric} is {value} on the {spec.split} split of this trial.{hint}")
    return TrialResult(float(value), {k: float(v) for k, v in metrics.items() if _is_number(v)}, str(engine.run_dir))


def _validation_metrics(engine: Any) -> dict[str, float]:
    """Metrics on the validation split (objective.split: val), with the fitted thresholds."""
    from ..metrics import compute_metrics

    preds = engine.infer(engine.splits.val, "Validating")
    if len(set(preds.label.tolist()) & {0, 1}) < 2:
        raise AnomalensError("objective.split is 'val' but the validation split has no defective images: set "
                             "dataset.val_source: test (validation drawn from the test set).")
    pp = engine.postprocessor
    return compute_metrics(preds.label, preds.score, preds.anomaly_map, preds.mask, preds.has_mask,
                           float(pp.image_threshold), float(pp.pixel_threshold))


# --------------------------------------------------------------------------- trial records
@dataclass
class TrialRecord:
    """One trial as the report sees it, whatever the backend."""

    number: int
    state: str  # complete | pruned | fail | running | waiting
    value: float | None
    params: dict[str, Any]  # config values
    duration_s: float | None = None
    worker: str = ""
    run_dir: str = ""
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    intermediate: dict[int, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "intermediate": {str(k): v for k, v in self.intermediate.items()}},
                          default=str)

    @classmethod
    def from_json(cls, line: str) -> TrialRecord:
        data = json.loads(line)
        data["intermediate"] = {int(k): v for k, v in data.get("intermediate", {}).items()}
        return cls(**data)


def worker_id(index: int) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:w{index}"


def record_from_optuna(trial: Any, spec: HpoSpec) -> TrialRecord:
    params = {}
    for key, stored in trial.params.items():
        param = spec.space.get(key)
        params[key] = param.decode(stored) if param is not None else stored
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    attrs = trial.user_attrs
    return TrialRecord(trial.number, trial.state.name.lower(), trial.value, params, duration,
                       attrs.get("worker", ""), attrs.get("run_dir", ""), attrs.get("error", attrs.get("pruned", "")),
                       attrs.get("metrics", {}), dict(trial.intermediate_values))


# --------------------------------------------------------------------------- the optuna backend
def make_storage(spec: HpoSpec) -> Any:
    """An Optuna RDB storage; sqlite waits for the file lock (several local workers share the file)."""
    optuna = import_optuna()
    url = spec.storage_url
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and have been for years
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Heartbeats: a trial whose worker died is marked failed instead of running forever.
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180, **kwargs)
    except ImportError as exc:
        raise AnomalensError(f"The storage {url.split('://')[0]}:// needs a database driver that is not installed "
                             f"({exc}); e.g. pip install psycopg2-binary for PostgreSQL.") from None


def open_study(spec: HpoSpec, resume: bool, create: bool = True) -> Any:
    """Create the study, or load it: an existing study is continued only when asked (--resume)."""
    optuna = import_optuna()
    storage = make_storage(spec)
    names = {s.study_name: s for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    existing = names.get(spec.study_name)
    if existing is not None and not resume and create:
        raise ConfigError(f"The study {spec.study_name!r} already exists in {spec.storage_url} with "
                          f"{existing.n_trials} trials. Pass --resume to add trials to it, or choose another "
                          "--study-name (or --output).")
    if existing is None and not create:
        raise AnomalensError(f"No study {spec.study_name!r} in {spec.storage_url}.")
    study = optuna.create_study(storage=storage, study_name=spec.study_name, direction=spec.direction,
                                load_if_exists=True)
    if study.direction.name.lower() != spec.direction:
        raise ConfigError(f"The study {spec.study_name!r} was created to {study.direction.name.lower()} its "
                          f"objective; this HPO file asks to {spec.direction}. Use another study_name.")
    saved = study.user_attrs.get("search_space")
    current = {k: p.to_dict() for k, p in spec.space.items()}
    if saved is None:
        study.set_user_attr("search_space", current)
        study.set_user_attr("objective", {"metric": spec.metric, "direction": spec.direction, "split": spec.split})
    elif saved != json.loads(json.dumps(current)):
        warnings.warn(f"The search space of study {spec.study_name!r} differs from the one it was created with; "
                      "the report covers every trial, each with its own values.", stacklevel=2)
    return study


def optimize(spec: HpoSpec, study: Any, n_trials: int | None, worker: int = 0, progress: bool | None = None) -> None:
    """Run trials of `study` in this process; a failed trial is recorded (state fail, its error) and the
    study goes on."""
    optuna = import_optuna()
    # A failed trial is announced in one line (with a traceback only for a bug, see objective).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study.sampler = make_sampler(spec, worker)
    study.pruner = make_pruner(spec)
    who = worker_id(worker)

    def objective(trial: Any) -> float:
        values = {key: param.suggest(trial) for key, param in spec.space.items()}
        trial.set_user_attr("worker", who)
        callbacks = [PruningCallback(trial, spec.monitor, spec.metric, spec.direction)]
        run_dirs: list[str] = []
        try:
            result = run_trial(spec, values, trial.number, callbacks, progress=progress, run_dirs=run_dirs)
        except PrunedRun as exc:
            _set_run_dir(trial, run_dirs)
            trial.set_user_attr("pruned", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        except Exception as exc:
            _set_run_dir(trial, run_dirs)
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            if not isinstance(exc, AnomalensError):  # a bug, not a setting: keep its traceback
                traceback.print_exc()
            raise
        trial.set_user_attr("run_dir", result.run_dir)
        trial.set_user_attr("metrics", result.metrics)
        return result.value

    study.optimize(objective, n_trials=n_trials, catch=(Exception,), callbacks=[_announce(spec, who)])


def _set_run_dir(trial: Any, run_dirs: list[str]) -> None:
    if run_dirs:
        trial.set_user_attr("run_dir", run_dirs[-1])


def _announce(spec: HpoSpec, who: str) -> Callable[[Any, Any], None]:
    def report(study: Any, trial: Any) -> None:
        state = trial.state.name.lower()
        values = ", ".join(f"{k}={_short(spec.space[k].decode(v)) if k in spec.space else v}"
                           for k, v in trial.params.items())
        if state == "complete":
            outcome = f"{spec.metric} = {trial.value:.4f}"
        else:
            outcome = trial.user_attrs.get("error") or trial.user_attrs.get("pruned") or ""
        print(f"[hpo {who}] trial {trial.number} {state}: {outcome}  ({values})", flush=True)

    return report


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else _label(value)


def split_trials(n_trials: int | None, workers: int) -> list[int | None]:
    """Trials per worker: n spread evenly (the first ones take the remainder); None = until the grid ends."""
    if n_trials is None:
        return [None] * workers
    workers = min(workers, n_trials)
    return [n_trials // workers + (1 if i < n_trials % workers else 0) for i in range(workers)]


def run_optuna(spec: HpoSpec, workers: int = 1, resume: bool = False) -> list[TrialRecord]:
    optuna = import_optuna()
    study = open_study(spec, resume)
    counts = split_trials(spec.n_trials, workers)
    if len(counts) == 1:
        optimize(spec, study, counts[0])
    else:
        run_workers(spec, counts)
    study = optuna.load_study(study_name=spec.study_name, storage=make_storage(spec))
    return [record_from_optuna(t, spec) for t in study.get_trials(deepcopy=False)]


# --------------------------------------------------------------------------- worker processes
def run_workers(spec: HpoSpec, counts: Sequence[int | None], extra: Sequence[str] = ()) -> None:
    """Start one process per entry of `counts` on the resolved spec (<output>/study.yaml); wait for all."""
    study_file = spec.output / "study.yaml"
    env = {**os.environ, "ANOMALENS_PROGRESS": "0"}
    procs = []
    code = "import sys; from anomalens.pipelines.hpo import worker_main; sys.exit(worker_main(sys.argv[1:]))"
    try:
        for index, count in enumerate(counts):
            argv = [sys.executable, "-c", code, str(study_file), "--worker", str(index),
                    "--n-trials", "all" if count is None else str(count), *extra]
            procs.append(subprocess.Popen(argv, env=env))
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:  # Ctrl-C: stop our workers, not just ourselves
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        raise
    for index, rc in enumerate(codes):
        if rc != 0:
            warnings.warn(f"HPO worker {index} exited with code {rc}; the report covers the trials it finished.",
                          stacklevel=2)


def worker_main(argv: Sequence[str]) -> int:
    """Entry point of a worker process: run trials of an existing study, no report."""
    import argparse

    parser = argparse.ArgumentParser(prog="anomalens-hpo-worker")
    parser.add_argument("study_file")
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--n-trials", default="all")
    parser.add_argument("--optimizer-id")
    args = parser.parse_args(argv)
    spec = load_spec(args.study_file)
    n_trials = None if args.n_trials == "all" else int(args.n_trials)
    try:
        if spec.backend == "optuna":
            optimize(spec, open_study(spec, resume=True, create=False), n_trials, worker=args.worker, progress=False)
        else:
            from .comet_optimizer import drive

            drive(spec, args.optimizer_id, n_trials, worker=args.worker, progress=False)
    except AnomalensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------- the whole search
def run_hpo(spec: HpoSpec, workers: int = 1, resume: bool = False, optimizer_factory: Any = None):
    """Run the study (in this process, or `workers` processes sharing it), then write the report.

    `optimizer_factory` replaces comet_ml.Optimizer (tests: a fake without network).
    """
    from .hpo_report import write_report

    if not isinstance(workers, int) or workers < 1:
        raise param_error("the hpo command", "workers", "an int >= 1", workers)
    spec.output.mkdir(parents=True, exist_ok=True)
    (spec.output / "study.yaml").write_text(
        "# The resolved HPO spec (base config inlined): what every worker of this study reads.\n"
        + yaml.safe_dump(spec.to_dict(), sort_keys=False))
    _check_trackers(spec)
    started = time.time()
    if spec.backend == "optuna":
        records = run_optuna(spec, workers, resume)
    else:
        from .comet_optimizer import run_comet

        records = run_comet(spec, workers, resume, optimizer_factory)
    return write_report(spec, records, elapsed=time.time() - started)


def _check_trackers(spec: HpoSpec) -> None:
    """A tracker whose SDK is missing fails now, once, rather than in every trial."""
    from ..loggers import build_trackers

    build_trackers(spec.base_config())


__all__ = ["HpoSpec", "Param", "PruningCallback", "TrialRecord", "load_spec", "spec_from_dict", "run_hpo",
           "run_trial", "import_optuna"]
