"""Inference on new images with exactly the engine's decisions.

`Inferencer.load(run_dir)` rebuilds the model and its fitted post-processor from the run's
checkpoint; `predict` takes file paths or arrays and returns the one output type,
`AnomalyOutput`, post-processed (scores, maps, labels, masks).
"""
from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..models.base import AnomalyOutput

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(source: str | Path) -> list[Path]:
    """One image file, or every image in a folder (recursively, sorted)."""
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"Input not found: '{path}'.")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"No images found in '{path}' (accepted: {', '.join(sorted(IMAGE_SUFFIXES))}).")
    return files


@dataclass
class Inferencer:
    """A fitted model plus its post-processor, ready for new images."""

    config: object
    model: torch.nn.Module
    postprocessor: torch.nn.Module
    device: torch.device

    @classmethod
    def load(cls, run_or_checkpoint: str | Path, device: str = "auto") -> Inferencer:
        from ..engine import load_checkpoint, resolve_device

        dev = resolve_device(device)
        config, model, post = load_checkpoint(run_or_checkpoint, dev)
        return cls(config, model, post, dev)

    @property
    def image_size(self) -> int:
        return self.config.dataset.image_size

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> float (1, 3, S, S) in [0, 1], by the same code as the training data."""
        from ..data.dataset import image_to_tensor

        return image_to_tensor(np.ascontiguousarray(image), (self.image_size, self.image_size))[None]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        """images: (B, 3, S, S) in [0, 1]."""
        return self.postprocessor(self.model(images.to(self.device)))

    def iter_predict(self, files: Sequence[Path], batch_size: int = 16) -> Iterator[tuple[list[Path], torch.Tensor,
                                                                                           AnomalyOutput]]:
        from ..data.io import read_image

        for start in range(0, len(files), batch_size):
            chunk = list(files[start:start + batch_size])
            batch = torch.cat([self.to_tensor(read_image(p)) for p in chunk])
            yield chunk, batch, self.predict(batch)


def _relative_png(path: Path, source: str | Path) -> Path:
    """Mirror the input's sub-folders so that test/good/000.png and test/hole/000.png both survive."""
    root = Path(source)
    rel = path.relative_to(root) if root.is_dir() else Path(path.name)
    return rel.with_suffix(".png")


def predict_to_folder(inferencer: Inferencer, source: str | Path, out_dir: str | Path, batch_size: int = 16,
                      mode: str = "full", save_images: bool = True) -> Path:
    """Score every image of `source`; write predictions.csv and heat-map images to out_dir."""
    from ..progress import track
    from ..visualization import render, save_image

    files = list_images(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    n_batches = (len(files) + batch_size - 1) // batch_size
    for chunk, images, res in track(inferencer.iter_predict(files, batch_size), "Predicting", total=n_batches):
        for i, path in enumerate(chunk):
            label = bool(res.pred_label[i])
            rows.append([str(path), f"{float(res.score[i]):.6g}", f"{float(res.norm_score[i]):.6f}",
                         "defect" if label else "good", f"{float(res.pred_mask[i].float().mean()):.6f}"])
            if save_images:
                picture = render(images[i], res.norm_map[i].cpu(), pred_mask=res.pred_mask[i].cpu(),
                                 score=float(res.norm_score[i]), label=label, mode=mode, title=path.name)
                save_image(picture, out / "images" / _relative_png(path, source))
    csv_path = out / "predictions.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "norm_score", "label", "defect_area"])
        writer.writerows(rows)
    return csv_path
