"""Callbacks: every hook is a no-op; a visualiser or a tracker overrides only what it needs.

The engine calls hooks in this order:
    on_run_start -> on_fit_start -> on_fit_end -> on_calibrate_end
    -> on_test_start -> on_test_batch_end (per batch) -> on_test_end -> on_run_end
and on_exception if anything fails.  A callback that raises is reported once and disabled, so
a broken tracker never fails or corrupts a run; only `StopRun` (raised on purpose, e.g. by the
HPO pruner) ends the run.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data.sample import Batch
    from .engine import Engine
    from .models.base import AnomalyOutput


class StopRun(Exception):
    """Raised by a callback to end the run on purpose (an HPO trial pruned); never swallowed."""


class Callback:
    def on_run_start(self, engine: Engine) -> None:
        """The run folder exists and the config is resolved."""

    def on_fit_start(self, engine: Engine) -> None:
        """The model is built and about to see the training images."""

    def on_train_epoch_end(self, engine: Engine, epoch: int, logs: dict[str, float]) -> None:
        """A trained model finished an epoch; logs hold its losses and validation metrics."""

    def on_fit_end(self, engine: Engine) -> None:
        """The model is fitted."""

    def on_calibrate_end(self, engine: Engine) -> None:
        """Thresholds and normalisation are fitted on the validation split."""

    def on_test_start(self, engine: Engine) -> None:
        """The test pass begins."""

    def on_test_batch_end(self, engine: Engine, batch: Batch, output: AnomalyOutput) -> None:
        """A post-processed test batch is ready."""

    def on_test_end(self, engine: Engine, metrics: dict[str, float]) -> None:
        """Test metrics are computed."""

    def on_run_end(self, engine: Engine) -> None:
        """Everything is written to the run folder."""

    def on_exception(self, engine: Engine, error: BaseException) -> None:
        """The run failed with `error`."""


class CallbackList:
    """Dispatches hooks; a failing callback warns once and is switched off."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def __call__(self, hook: str, *args: Any) -> None:
        for cb in list(self.callbacks):
            try:
                getattr(cb, hook)(*args)
            except StopRun:
                raise
            except Exception as exc:  # noqa: BLE001 - a callback must never break the run
                warnings.warn(f"{type(cb).__name__}.{hook} failed and is disabled for this run: "
                              f"{type(exc).__name__}: {exc}", stacklevel=2)
                self.callbacks.remove(cb)


class Timer(Callback):
    """Measures fit, calibration and test durations into engine.timings (seconds)."""

    def on_fit_start(self, engine: Engine) -> None:
        self._t = time.perf_counter()

    def on_fit_end(self, engine: Engine) -> None:
        engine.timings["fit_seconds"] = time.perf_counter() - self._t
        self._t = time.perf_counter()

    def on_calibrate_end(self, engine: Engine) -> None:
        engine.timings["calibrate_seconds"] = time.perf_counter() - self._t

    def on_test_start(self, engine: Engine) -> None:
        self._t = time.perf_counter()

    def on_test_end(self, engine: Engine, metrics: dict[str, float]) -> None:
        engine.timings["test_seconds"] = time.perf_counter() - self._t


class ImageWriter(Callback):
    """Renders each test prediction (full or simple mode) into <run>/images/<defect_type>/."""

    def __init__(self, mode: str = "full", save: bool = True, show: bool = False, max_images: int | None = None):
        self.mode, self.save, self.show, self.max_images = mode, save, show, max_images
        self.written: list[Path] = []
        self._count = 0

    def on_test_batch_end(self, engine: Engine, batch: Batch, output: AnomalyOutput) -> None:
        from .visualization import render, save_image, show_image

        for i in range(len(batch)):
            if self.max_images is not None and self._count >= self.max_images:
                return
            self._count += 1
            gt = batch.mask[i] if bool(batch.has_mask[i]) else None
            picture = render(batch.image[i], output.norm_map[i], pred_mask=output.pred_mask[i], gt_mask=gt,
                             score=float(output.norm_score[i]), label=bool(output.pred_label[i]),
                             mode=self.mode, title=Path(batch.path[i]).name)
            if self.save:
                path = engine.run_dir / "images" / (batch.defect_type[i] or "unknown") / (Path(batch.path[i]).stem + ".png")
                save_image(picture, path)
                self.written.append(path)
            if self.show:
                show_image(picture, Path(batch.path[i]).name)
