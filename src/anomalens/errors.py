"""One error type and one message shape for every user-facing mistake.

Parameter messages read the same everywhere (scikit-learn style):
    The 'k' parameter of PatchCore must be an int in [1, 100]. Got 0 instead.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class AnomalensError(Exception):
    """Base of every error we raise on purpose; the message is one actionable line."""


class ConfigError(AnomalensError, ValueError):
    """A config key or value is wrong."""


class DataError(AnomalensError, ValueError):
    """A dataset folder, image or mask is missing, unreadable or inconsistent."""


class WeightsError(AnomalensError, RuntimeError):
    """Pretrained weights cannot be had (offline, missing file, wrong keys)."""


class MissingDependencyError(AnomalensError, ImportError):
    """An optional dependency is not installed."""


def missing_dependency(package: str, extra: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"{package} is required for this feature. Install it with: pip install 'anomalens[{extra}]'"
    )


# --------------------------------------------------------------------------- constraints
class Constraint:
    """A rule a parameter value must satisfy; `describe` completes 'must be ...'."""

    def check(self, value: Any) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Interval(Constraint):
    """A number of `kind` (int or float) in [low, high]; None means unbounded."""

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"  # "both", "left", "right", "neither"

    def check(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if self.kind is float and not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        left_ok = self.low is None or (value >= self.low if self.closed in ("both", "left") else value > self.low)
        right_ok = self.high is None or (value <= self.high if self.closed in ("both", "right") else value < self.high)
        return left_ok and right_ok

    def describe(self) -> str:
        name = "an int" if self.kind is int else "a float"
        if self.low is None and self.high is None:
            return name
        lb = "[" if self.closed in ("both", "left") and self.low is not None else "("
        rb = "]" if self.closed in ("both", "right") and self.high is not None else ")"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{name} in {lb}{lo}, {hi}{rb}"


@dataclass(frozen=True)
class OneOf(Constraint):
    options: tuple

    def __init__(self, *options: Any):
        object.__setattr__(self, "options", tuple(options))

    def check(self, value: Any) -> bool:
        return any(value == o and type(value) is type(o) for o in self.options)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)


@dataclass(frozen=True)
class IsType(Constraint):
    kind: type
    label: str

    def check(self, value: Any) -> bool:
        return isinstance(value, self.kind) and not (self.kind is not bool and isinstance(value, bool))

    def describe(self) -> str:
        return self.label


@dataclass(frozen=True)
class ListOf(Constraint):
    item: Constraint
    min_len: int = 1

    def check(self, value: Any) -> bool:
        return isinstance(value, (list, tuple)) and len(value) >= self.min_len and all(self.item.check(v) for v in value)

    def describe(self) -> str:
        return f"a list of at least {self.min_len} items, each {self.item.describe()}"


@dataclass(frozen=True)
class AnyOf(Constraint):
    choices: tuple

    def __init__(self, *choices: Constraint):
        object.__setattr__(self, "choices", tuple(choices))

    def check(self, value: Any) -> bool:
        return any(c.check(value) for c in self.choices)

    def describe(self) -> str:
        return " or ".join(c.describe() for c in self.choices)


BOOL = IsType(bool, "a bool")
STR = IsType(str, "a str")


def param_error(owner: str, name: str, expected: str, got: Any) -> ConfigError:
    return ConfigError(f"The {name!r} parameter of {owner} must be {expected}. Got {got!r} instead.")


def validate_params(owner: str, params: Mapping[str, Any], constraints: Mapping[str, Constraint]) -> None:
    """Raise ConfigError for the first unknown key or value that breaks its constraint."""
    for key in params:
        if key not in constraints:
            allowed = ", ".join(sorted(constraints))
            raise ConfigError(f"Unknown parameter {key!r} for {owner}. Allowed: {allowed}.")
    for key, value in params.items():
        rule = constraints[key]
        if not rule.check(value):
            raise param_error(owner, key, rule.describe(), value)
