"""What every tracker logs, and when; a tracker module only says *how* (the backend methods).

    on_run_start       start; parameters (flattened config, defaults resolved); tags (model, dataset, git, system); packages; code
    on_train_epoch_end per-epoch losses and validation metrics, step = epoch
    on_calibrate_end   model graph (when logging.log_graph); system load, fit/calibration durations
    on_test_batch_end  prediction images, rendered here only when the run saves none
    on_test_end        final metrics (AUROC, F1, AUPRO, thresholds, false-reject and escape rates)
    on_run_end         system load, durations, the saved prediction images, the per-image score table; finish

A run that is not an engine run (a benchmark's summary) is logged in one call, `log_summary`.

A backend error propagates to the engine's CallbackList, which warns once and disables the
tracker; before it does, the tracker closes its run (marked failed) so nothing is left half open.
The local record in the run folder never depends on a tracker.
"""
from __future__ import annotations

import csv
import math
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlparse

import numpy as np

from ..callbacks import Callback
from ..errors import ConfigError
from . import system

if TYPE_CHECKING:
    from ..config import Config
    from ..data.sample import Batch
    from ..engine import Engine
    from ..models.base import AnomalyOutput

# Defaults and allowed values of the tracker sub-sections of `logging` (config.LoggingConfig).
SUBSECTIONS: dict[str, dict[str, Any]] = {
    "comet": {"mode": "auto", "workspace": None},
    "mlflow": {"tracking_uri": None},
}
_CHOICES = {("comet", "mode"): ("auto", "online", "offline")}


def settings(config: Config, tracker: str) -> dict[str, Any]:
    """`logging.<tracker>` merged over its defaults, every key and value checked."""
    values = {**SUBSECTIONS[tracker], **(getattr(config.logging, tracker) or {})}
    for key, value in values.items():
        if key not in SUBSECTIONS[tracker]:
            allowed = ", ".join(sorted(SUBSECTIONS[tracker]))
            raise ConfigError(f"Unknown config key 'logging.{tracker}.{key}'. Allowed keys in "
                              f"'logging.{tracker}': {allowed}.")
        choices = _CHOICES.get((tracker, key))
        ok = value in choices if choices else value is None or isinstance(value, str)
        if not ok:
            expected = "one of " + ", ".join(repr(c) for c in choices) if choices else "a str or None"
            raise ConfigError(f"The 'logging.{tracker}.{key}' parameter of the config must be {expected}. "
                              f"Got {value!r} instead.")
    return values


def project_name(config: Config) -> str:
    """Tracker project / experiment: `logging.project`, else '<dataset>-<category>' (e.g. mvtec-bottle)."""
    return config.logging.project or f"{config.dataset_name}-{config.dataset.category}"


def run_name(engine: Engine) -> str:
    """'<model>-<run folder>', e.g. padim-2024-05-01_10-00-00: unique within a project."""
    return f"{engine.config.model_name}-{engine.run_dir.name}"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def with_model_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict with its model's defaults filled in (a run that left PaDiM's n_features alone
    used 100); a model this version does not know keeps what the config wrote."""
    model = dict(data.get("model") or {})
    try:
        from ..registry import get_model_class

        model = {**get_model_class(model.get("name", "")).defaults, **model}
    except ConfigError:
        pass
    return {**data, "model": model}


def resolved_config(config: Config) -> dict[str, Any]:
    """The config as the run uses it: the model's defaults filled in and, for a trained model, the
    training settings it resolves to."""
    data = with_model_defaults(config.to_dict())
    try:
        from ..registry import get_model_class

        cls = get_model_class(config.model_name)
        if cls.tags.get("trainable"):
            from dataclasses import asdict

            from ..training import TrainSettings

            data["trainer"] = {**data["trainer"], **asdict(TrainSettings.resolve(cls.training_defaults,
                                                                                 data["trainer"]))}
    except ConfigError:  # the run fails on the same error, and says so
        pass
    return data


def finite(metrics: dict[str, Any]) -> dict[str, float]:
    """Numbers only, NaN/inf dropped (a metric that cannot be computed, e.g. pixel AUROC without masks)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def check_reachable(url: str, what: str, timeout: float = 3.0) -> None:
    """Raise ConnectionError now when nothing answers at an http(s) URL's host and port: one clear
    message, instead of an SDK retrying for minutes."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"{what} at {url} is unreachable ({exc})") from None


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return (rows[0], rows[1:]) if rows else ([], [])


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class TrackerError(Exception):
    """A tracker's backend failed with a multi-line message; this one holds its first line."""


@dataclass
class RunFolder:
    """What `Tracker.start` reads of an engine (its config and run folder), for a run without one."""

    config: Config
    run_dir: Path


class Tracker(Callback):
    """Base of every tracker: the hooks below decide what is logged; subclasses implement the backend."""

    name: ClassVar[str] = ""

    def __init__(self, config: Config):
        self.config = config
        self.step = 0  # the last training epoch seen; final metrics and images are logged at it
        self.started = False
        self._rendered = 0  # images rendered here, when the run saves none

    # -- backend: what each tracker implements ----------------------------------------------------
    def start(self, engine: Engine) -> None:
        """Open the run / experiment."""
        raise NotImplementedError

    def log_params(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_tags(self, tags: dict[str, str]) -> None:
        """Run facts that are not hyper-parameters: model, dataset, git commit, machine."""
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_packages(self, packages: list[str]) -> None:
        raise NotImplementedError

    def log_code(self, snapshot: Path) -> None:
        """`snapshot` is <run>/code.zip (system.source_snapshot)."""
        raise NotImplementedError

    def log_graph(self, model: Any, example: Any) -> None:
        raise NotImplementedError

    def log_image(self, image: np.ndarray, name: str, step: int) -> None:
        """`image` is (H, W, 3) uint8; `name` is '<defect_type>/<stem>', the same in every run."""
        raise NotImplementedError

    def log_table(self, path: Path) -> None:
        """The per-image score table (scores.csv)."""
        raise NotImplementedError

    def log_file(self, path: Path) -> None:
        """Any other file of the local record (metrics.json)."""
        raise NotImplementedError

    def finish(self, failed: bool = False) -> None:
        """Close the run; `failed` marks it so in the tracker."""
        raise NotImplementedError

    def report(self) -> None:
        """Tell the user where the run went (printed at the very end)."""

    # -- hooks: what every tracker logs ---------------------------------------------------------
    @contextmanager
    def _closing_on_error(self) -> Iterator[None]:
        # The CallbackList warns once and disables us; close our run first so it is not left open.
        try:
            yield
        except Exception as exc:
            if self.started:
                self.started = False
                try:
                    self.finish(failed=True)
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    pass
            lines = str(exc).strip().splitlines()
            if len(lines) > 1:  # e.g. SQLAlchemy appends the SQL statement: the warning keeps one line
                raise TrackerError(f"{type(exc).__name__}: {lines[0]}") from exc
            raise

    def on_run_start(self, engine: Engine) -> None:
        with self._closing_on_error():
            self.start(engine)
            self.started = True
            self.log_params(flatten(resolved_config(engine.config)))
            c = engine.config
            self.log_tags({"model": c.model_name, "dataset": c.dataset_name, "category": c.dataset.category,
                           "run_dir": str(engine.run_dir), "device": str(engine.device),
                           **{k: str(v) for k, v in system.system_info().items()}, **system.git_info()})
            self.log_packages(list(system.installed_packages()))
            self.log_code(system.source_snapshot(engine.run_dir))
            system.system_metrics()  # starts the CPU-percent window

    def on_train_epoch_end(self, engine: Engine, epoch: int, logs: dict[str, float]) -> None:
        if self.started:
            with self._closing_on_error():
                self.step = epoch
                self.log_metrics(finite(logs), step=epoch)

    def on_calibrate_end(self, engine: Engine) -> None:
        # Not in on_fit_end: the Timer measures calibration from there, and tracing a graph takes seconds.
        if not self.started:
            return
        with self._closing_on_error():
            if self.config.logging.log_graph:
                import torch

                size = self.config.dataset.image_size
                self.log_graph(engine.model, torch.zeros(1, 3, size, size, device=engine.device))
            self.log_metrics(finite({**system.system_metrics(), **_durations(engine)}), step=self.step)

    def on_test_batch_end(self, engine: Engine, batch: Batch, output: AnomalyOutput) -> None:
        vis = self.config.visualization
        # Saved images are read back from the run folder at the end; render (and send at once, so
        # that none pile up in memory) only when the run saves none.
        if not (self.started and vis.log_images) or vis.save_images:
            return
        from ..visualization import render

        with self._closing_on_error():
            for i in range(len(batch)):
                if vis.max_images is not None and self._rendered >= vis.max_images:
                    return
                self._rendered += 1
                gt = batch.mask[i] if bool(batch.has_mask[i]) else None
                picture = render(batch.image[i], output.norm_map[i], pred_mask=output.pred_mask[i], gt_mask=gt,
                                 score=float(output.norm_score[i]), label=bool(output.pred_label[i]),
                                 mode=vis.mode, title=Path(batch.path[i]).name)
                self.log_image(picture, f"{batch.defect_type[i] or 'unknown'}/{Path(batch.path[i]).stem}", self.step)

    def on_test_end(self, engine: Engine, metrics: dict[str, float]) -> None:
        if self.started:
            with self._closing_on_error():
                self.log_metrics(finite(metrics), step=self.step)

    def on_run_end(self, engine: Engine) -> None:
        if not self.started:
            return
        with self._closing_on_error():
            run_dir = engine.run_dir
            self.log_metrics(finite({**system.system_metrics(), **_durations(engine)}), step=self.step)
            vis = self.config.visualization
            if vis.log_images and vis.save_images:
                for path in sorted((run_dir / "images").glob("*/*.png")):
                    self.log_image(load_rgb(path), f"{path.parent.name}/{path.stem}", self.step)
            if (run_dir / "scores.csv").is_file():
                self.log_table(run_dir / "scores.csv")
            if (run_dir / "metrics.json").is_file():
                self.log_file(run_dir / "metrics.json")
            self.started = False
            self.finish()
        self.report()

    def on_exception(self, engine: Engine, error: BaseException) -> None:
        if self.started:
            self.started = False
            self.finish(failed=True)
            self.report()

    # -- a run outside the engine ---------------------------------------------------------------
    def log_summary(self, run_dir: Path, params: dict[str, Any], tags: dict[str, str], metrics: dict[str, float],
                    tables: Sequence[Path] = (), images: Sequence[Path] = ()) -> None:
        """Log one complete run that no engine made (e.g. a benchmark's summary) and close it.

        It opens in `run_dir` (a tracker keeps its files there, as in a run folder) and is named
        '<config's model name>-<run_dir name>'.  `tags` should hold 'model', 'dataset' and 'category',
        like an engine run's; `tables` are CSV files, `images` PNG files (logged as 'summary/<stem>').
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with self._closing_on_error():
            self.start(RunFolder(self.config, run_dir))
            self.started = True
            self.log_params(params)
            self.log_tags(tags)
            self.log_metrics(finite(metrics), step=0)
            for path in tables:
                self.log_table(Path(path))
            for path in images:
                self.log_image(load_rgb(Path(path)), f"summary/{Path(path).stem}", 0)
            self.started = False
            self.finish()
        self.report()


def _durations(engine: Engine) -> dict[str, float]:
    return {f"time/{k}": v for k, v in engine.timings.items()}
