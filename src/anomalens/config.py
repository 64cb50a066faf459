"""Typed run configuration: defaults, YAML loading, dotted CLI overrides, one error shape.

A config has the sections `model`, `dataset`, `postprocess`, `visualization`, `logging`,
`trainer`, `project` and the scalar `seed`.  Every section but `model` is a dataclass whose
fields carry their own constraint; `model` holds `name` plus that model's parameters, which
the model class validates itself (its `constraints`).
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import BOOL, STR, AnyOf, ConfigError, Constraint, Interval, IsType, ListOf, OneOf, param_error

NONE = OneOf(None)


def _rule(constraint: Constraint, default: Any = MISSING, doc: str = "") -> Any:
    """A dataclass field that carries its constraint (and a one-line doc) in metadata."""
    meta = {"rule": constraint, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DatasetConfig:
    format: str = _rule(OneOf("demo", "mvtec", "btech", "folder", "visa"), "demo", "layout of the dataset folder")
    root: str | None = _rule(AnyOf(STR, NONE), None, "dataset folder (demo: built in a cache folder when null)")
    category: str = _rule(STR, "brick", "category sub-folder (mvtec, btech, visa, demo)")
    image_size: int = _rule(Interval(int, 32, 4096), 256, "images are resized to image_size x image_size")
    normal_dir: str = _rule(STR, "good", "folder format: good images")
    abnormal_dir: str | None = _rule(AnyOf(STR, NONE), None, "folder format: defective images (optional)")
    mask_dir: str | None = _rule(AnyOf(STR, NONE), None, "folder format: masks named like their image")
    normal_test_dir: str | None = _rule(AnyOf(STR, NONE), None, "folder format: good test images (optional)")
    test_ratio: float = _rule(Interval(float, 0, 1, "neither"), 0.2, "folder format: share of good images tested")
    val_source: str = _rule(OneOf("train", "test"), "train", "validation split taken from train goods or the test set")
    val_ratio: float = _rule(Interval(float, 0, 1, "neither"), 0.2, "share of the source moved to validation")
    skip_bad_images: bool = _rule(BOOL, False, "skip unreadable images with a warning instead of failing")
    batch_size: int = _rule(Interval(int, 1, 4096), 16)
    num_workers: int = _rule(Interval(int, 0, 256), 0)


@dataclass
class PostprocessConfig:
    threshold: str = _rule(OneOf("auto", "f1", "false_alarm_rate", "manual"), "auto",
                           "auto = f1 when validation has defects, else false_alarm_rate")
    false_alarm_rate: float = _rule(Interval(float, 0, 0.5, "right"), 0.01, "share of good parts allowed to be rejected")
    manual_threshold: float | None = _rule(AnyOf(Interval(float), NONE), None, "raw image-score threshold")
    manual_pixel_threshold: float | None = _rule(AnyOf(Interval(float), NONE), None, "raw pixel threshold")


@dataclass
class VisualizationConfig:
    mode: str = _rule(OneOf("full", "simple"), "full")
    save_images: bool = _rule(BOOL, True)
    show_images: bool = _rule(BOOL, False)
    log_images: bool = _rule(BOOL, True, "send prediction images to the trackers")
    max_images: int | None = _rule(AnyOf(Interval(int, 0), NONE), None, "cap on saved test images (null = all)")


@dataclass
class LoggingConfig:
    logger: Any = _rule(AnyOf(STR, ListOf(STR, 0)), "csv", "comet | mlflow | tensorboard | csv | none, or a list")
    log_graph: bool = _rule(BOOL, False, "send the model graph to the trackers")
    project: str | None = _rule(AnyOf(STR, NONE), None, "tracker project / experiment name (default: <dataset>-<category>)")
    # Tracker sub-sections; their keys are checked by anomalens.loggers (same message shape).
    comet: dict = _rule(IsType(dict, "a mapping"), {"mode": "auto", "workspace": None},
                        "mode: auto (online when an API key is set) | online | offline; workspace")
    mlflow: dict = _rule(IsType(dict, "a mapping"), {"tracking_uri": None},
                         "tracking_uri (default: sqlite:///<project.root>/mlflow.db)")


DICT = IsType(dict, "a mapping")


@dataclass
class TrainerConfig:
    """Trained models only (null = the model's own default, see its file); device/progress for all."""

    device: str = _rule(OneOf("auto", "cpu", "cuda"), "auto")
    max_epochs: int | None = _rule(AnyOf(Interval(int, 1), NONE), None, "epochs")
    max_steps: int | None = _rule(AnyOf(Interval(int, 1), NONE), None, "stop after this many optimiser steps")
    batch_size: int | None = _rule(AnyOf(Interval(int, 1, 4096), NONE), None,
                                   "training batch size (default: the model's, else dataset.batch_size)")
    optimizer: dict | None = _rule(AnyOf(DICT, NONE), None, "{name: adam|adamw|sgd, lr, weight_decay, ...}")
    scheduler: dict | None = _rule(AnyOf(DICT, NONE), None, "{name: cosine|step|multistep|exponential, ...}")
    gradient_clip: float | None = _rule(AnyOf(Interval(float, 0, None, "neither"), NONE), None, "max grad norm")
    precision: str = _rule(OneOf("32", "bf16-mixed", "16-mixed"), "32", "mixed precision")
    val_every_n_epochs: int = _rule(Interval(int, 1), 1)
    refit: bool = _rule(BOOL, True, "one-pass models: after calibration, fit again on train + good validation images")
    early_stopping: dict | None = _rule(AnyOf(DICT, NONE), None, "{monitor: val_loss|val_image_AUROC|..., patience}")
    progress: bool = _rule(BOOL, True, "show progress bars")


@dataclass
class ProjectConfig:
    root: str = _rule(STR, "runs", "folder that holds every run")
    run_name: str | None = _rule(AnyOf(STR, NONE), None, "run folder name (default: a timestamp)")


SECTIONS: dict[str, type] = {
    "dataset": DatasetConfig,
    "postprocess": PostprocessConfig,
    "visualization": VisualizationConfig,
    "logging": LoggingConfig,
    "trainer": TrainerConfig,
    "project": ProjectConfig,
}
SEED_RULE = Interval(int, 0, 2**32 - 1)


@dataclass
class Config:
    model: dict[str, Any] = field(default_factory=lambda: {"name": "padim"})
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    visualization: VisualizationConfig = field(default_factory=VisualizationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    project: ProjectConfig = field(default_factory=ProjectConfig)
    seed: int = 42

    @property
    def model_name(self) -> str:
        return self.model["name"]

    @property
    def model_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "name"}

    @property
    def dataset_name(self) -> str:
        """Short dataset name for run folders and trackers: the format, or the folder's name."""
        if self.dataset.format == "folder" and self.dataset.root:
            return Path(self.dataset.root).name or "folder"
        return self.dataset.format

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, e.g. {'dataset.image_size': 256, 'model.name': 'padim'}."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


# --------------------------------------------------------------------------- building
def _unknown_key(key: str, allowed: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], allowed, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"Unknown config key {key!r}.{hint} Allowed keys in {where}: {', '.join(sorted(allowed))}.")


def _build_section(name: str, cls: type, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"The config section {name!r} must be a mapping of keys to values. Got {values!r} instead.")
    specs = {f.name: f for f in fields(cls)}
    for key in values:
        if key not in specs:
            raise _unknown_key(f"{name}.{key}", list(specs), f"'{name}'")
    for key, value in values.items():
        rule: Constraint = specs[key].metadata["rule"]
        if not rule.check(value):
            raise param_error("the config", f"{name}.{key}", rule.describe(), value)
    coerced = {k: float(v) if _wants_float(specs[k]) and isinstance(v, int) and not isinstance(v, bool) else v
               for k, v in values.items()}
    return cls(**coerced)


def _wants_float(spec: Any) -> bool:
    rule = spec.metadata["rule"]
    rules = rule.choices if isinstance(rule, AnyOf) else (rule,)
    return any(isinstance(r, Interval) and r.kind is float for r in rules)


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Validate a plain mapping (from YAML) into a Config; every mistake raises ConfigError."""
    data = copy.deepcopy(data or {})
    allowed = ["model", "seed", *SECTIONS]
    for key in data:
        if key not in allowed:
            raise _unknown_key(key, allowed, "the config")
    model = data.get("model") or {"name": "padim"}
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise ConfigError("The config section 'model' must be a mapping with a 'name' (see `anomalens models`). "
                          f"Got {model!r} instead.")
    seed = data.get("seed", 42)
    if not SEED_RULE.check(seed):
        raise param_error("the config", "seed", SEED_RULE.describe(), seed)
    sections = {name: _build_section(name, cls, data.get(name)) for name, cls in SECTIONS.items()}
    config = Config(model=model, seed=seed, **sections)
    validate_model_section(config)
    return config


def validate_model_section(config: Config) -> None:
    """Check the model name and its parameters against the model's own constraints."""
    from .errors import validate_params
    from .registry import get_model_class

    cls = get_model_class(config.model_name)
    validate_params(cls.__name__, config.model_params, cls.constraints)
    if cls.tags.get("trainable"):
        from .training import TrainSettings

        TrainSettings.resolve(cls.training_defaults, asdict(config.trainer))


def parse_value(text: str) -> Any:
    """A CLI value as YAML would read it: 0.1 -> float, [a, b] -> list, null -> None."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys ('dataset.root') in a raw config mapping; validation happens later."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"Cannot set {dotted!r}: {part!r} is not a section.")
            node = child
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: '{path}'.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections. Got {type(data).__name__} instead.")
    return data or {}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated."""
    data = load_yaml(path) if path else {}
    return config_from_dict(apply_overrides(data, overrides or {}))


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


__all__ = ["Config", "config_from_dict", "load_config", "apply_overrides", "parse_value", "dump_yaml"]
