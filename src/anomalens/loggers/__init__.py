"""Experiment trackers, one module per tracker; each SDK is imported lazily by its module.

Every run always keeps its local record (config, metrics.json, scores.csv, images) in its run
folder, whatever trackers are configured: that is the "csv" logger and needs no callback.
`logging.logger` names one tracker or a list, e.g. [mlflow, tensorboard].
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import SUBSECTIONS, Tracker, settings

if TYPE_CHECKING:
    from ..callbacks import Callback
    from ..config import Config

LOCAL = {"csv", "none"}
# name -> "module:class"; a module is imported only when its tracker is asked for.
TRACKERS = {
    "comet": "anomalens.loggers.comet:CometTracker",
    "mlflow": "anomalens.loggers.mlflow:MlflowTracker",
    "tensorboard": "anomalens.loggers.tensorboard:TensorBoardTracker",
}


def tracker_class(name: str) -> type[Tracker]:
    module, _, cls = TRACKERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_trackers(config: Config) -> list[Callback]:
    """The tracker callbacks named by `logging.logger`; a missing SDK raises MissingDependencyError here,
    before the run starts, with the pip command that installs it."""
    names = config.logging.logger
    names = [names] if isinstance(names, str) else list(names)
    available = sorted(LOCAL | set(TRACKERS))
    for name in names:
        if name not in available:
            raise ConfigError(f"Unknown logger {name!r}. Available: {', '.join(available)}.")
    for section in SUBSECTIONS:  # typos in logging.comet / logging.mlflow fail even when unused
        settings(config, section)
    unique = list(dict.fromkeys(n for n in names if n in TRACKERS))
    return [tracker_class(name)(config) for name in unique]


__all__ = ["build_trackers", "tracker_class", "Tracker", "TRACKERS", "LOCAL"]
