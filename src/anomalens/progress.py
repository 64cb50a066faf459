"""Progress bars for long loops (rich), silenced in tests and when asked."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
_enabled = os.environ.get("ANOMALENS_PROGRESS", "1") != "0"


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


class Bar:
    """A handle on one progress bar: advance it and show live values (loss, metrics) beside it."""

    def __init__(self, progress=None, task=None):
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def show(self, **values: float | str) -> None:
        if self._progress is not None:
            text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            self._progress.update(self._task, info=text)


@contextmanager
def bar(description: str, total: int | None = None) -> Iterator[Bar]:
    """`with bar("Training", total=epochs) as b: ... b.advance(); b.show(loss=0.12)`."""
    if not _enabled:
        yield Bar()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, transient=False) as progress:
        yield Bar(progress, progress.add_task(description, total=total, info=""))


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items` with a progress bar labelled `description`."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(description, total) as b:
        for item in items:
            yield item
            b.advance()
