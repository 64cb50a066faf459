"""TensorBoard tracker: event files in <run>/tensorboard (scalars, images, text, hparams, graph).

`tensorboard --logdir <project.root>` then shows every run, named by its folder.  TensorBoard has
no artifact store: packages, tags and the score table go to the Text tab, and the source
snapshot is the run folder's code.zip.
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import missing_dependency
from .base import Tracker, finite, read_table

if TYPE_CHECKING:
    from ..config import Config
    from ..engine import Engine

LOG_DIR = "tensorboard"
MAX_TABLE_ROWS = 500  # the Text tab slows down on huge markdown tables; the CSV has every row


def import_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise missing_dependency("tensorboard", "tensorboard") from None
    return SummaryWriter


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, config: Config):
        super().__init__(config)
        self.writer_class = import_writer()
        self.writer: Any = None
        self.hparams: dict[str, Any] = {}
        self.final: dict[str, float] = {}

    # -- backend ------------------------------------------------------------------------------------
    def start(self, engine: Engine) -> None:
        _quiet_writer_thread()
        self.writer = self.writer_class(log_dir=str(engine.run_dir / LOG_DIR))

    def log_params(self, params: dict[str, Any]) -> None:
        # The hparams plugin takes numbers, strings and bools; written at the end with final metrics.
        self.hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}

    def log_tags(self, tags: dict[str, str]) -> None:
        self.writer.add_text("run/tags", _markdown_table(["tag", "value"], [[k, v] for k, v in tags.items()]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.final.update(metrics)

    def log_packages(self, packages: list[str]) -> None:
        self.writer.add_text("run/packages", "    " + "\n    ".join(packages))  # indented = code block

    def log_code(self, snapshot: Path) -> None:
        self.writer.add_text("run/source", f"Source snapshot: `{snapshot}`")

    def log_graph(self, model: Any, example: Any) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about data-dependent shapes
                self.writer.add_graph(_Traceable(model), example)
        except Exception as exc:  # noqa: BLE001 - not every model traces; the text form always works
            self.writer.add_text("model/graph", f"(not traceable: {type(exc).__name__})\n\n    "
                                 + str(model).replace("\n", "\n    "))

    def log_image(self, image: np.ndarray, name: str, step: int) -> None:
        self.writer.add_image(name, image, step, dataformats="HWC")

    def log_table(self, path: Path) -> None:
        headers, rows = read_table(path)
        text = _markdown_table(headers, rows[:MAX_TABLE_ROWS])
        if len(rows) > MAX_TABLE_ROWS:
            text += f"\n\n... {len(rows) - MAX_TABLE_ROWS} more rows in {path}"
        self.writer.add_text(f"run/{path.stem}", text)  # scores.csv -> run/scores

    def log_file(self, path: Path) -> None:
        self.writer.add_text(f"run/{path.name}", "    " + path.read_text().replace("\n", "\n    "))

    def finish(self, failed: bool = False) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Written by hand (not SummaryWriter.add_hparams) so that the final metrics are not logged a
        # second time into a sub-folder: the hparams view reads the scalars already in this folder.
        metrics = finite(self.final) or {"status/failed": 1.0}
        for summary in hparams(self.hparams, metrics):
            self.writer.file_writer.add_summary(summary)
        self.writer.close()

    def report(self) -> None:
        print(f"TensorBoard: tensorboard --logdir {Path(self.config.project.root)}")


def _quiet_writer_thread() -> None:
    """TensorBoard's writer thread keeps its error (a full disk) for the next call, which raises it:
    the tracker then warns once.  Don't let Python also print the thread's traceback."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "_anomalens_quiet", False):
        return

    def hook(args: Any) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, Exception)):
            previous(args)

    hook._anomalens_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class _Traceable(torch.nn.Module):
    """The model with a tuple output, which torch.jit.trace (used by add_graph) can follow."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out.score, out.anomaly_map


def _markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)
