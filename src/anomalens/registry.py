"""The one table of models: a decorator registers a class, everyone else reads the table."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .models.base import AnomalyModel

_MODELS: dict[str, type[AnomalyModel]] = {}


def register_model(cls: type[AnomalyModel]) -> type[AnomalyModel]:
    """Class decorator: make `cls` available under `cls.name`."""
    if cls.name in _MODELS and _MODELS[cls.name] is not cls:
        raise ValueError(f"model name {cls.name!r} registered twice")
    _MODELS[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    from . import models  # noqa: F401  (importing the package registers every model)


def list_models() -> list[str]:
    _ensure_loaded()
    return sorted(_MODELS)


def get_model_class(name: str) -> type[AnomalyModel]:
    _ensure_loaded()
    if name not in _MODELS:
        raise ConfigError(f"Unknown model {name!r}. Available models: {', '.join(sorted(_MODELS))}.")
    return _MODELS[name]


def create_model(name: str, **params: Any) -> AnomalyModel:
    """Build a registered model; parameters are validated by the model."""
    return get_model_class(name)(**params)
