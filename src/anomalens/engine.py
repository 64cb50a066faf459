"""The engine: fit -> calibrate -> test, callbacks, run folders and checkpoints.

    images ─> model (raw score + raw map) ─> PostProcessor (normalise, threshold) ─> metrics
                                                                                 └─> images, scores.csv

Metrics are computed on raw scores; the post-processor only adds decisions.  A checkpoint
holds the resolved config, the model's state_dict and the post-processor's, so a run can be
reloaded without its original config file.
"""
from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import __version__
from .callbacks import Callback, CallbackList, ImageWriter, Timer
from .config import Config, config_from_dict, dump_yaml
from .data.sample import GOOD, Batch
from .errors import AnomalensError, ConfigError
from .models.base import AnomalyModel, AnomalyOutput
from .progress import track
from .registry import create_model, get_model_class

CHECKPOINT_NAME = "model.pt"


# --------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("The 'trainer.device' parameter of the config is 'cuda' but no CUDA device is available; "
                          "set trainer.device to 'auto' or 'cpu'.")
    return torch.device(name)


def make_loader(records: Sequence[Any], config: Config, shuffle: bool = False,
                batch_size: int | None = None) -> DataLoader:
    from .data.dataset import AnomalyDataset

    dataset = AnomalyDataset(records, config.dataset.image_size, skip_bad_images=config.dataset.skip_bad_images)
    return DataLoader(dataset, batch_size=batch_size or config.dataset.batch_size, shuffle=shuffle,
                      num_workers=config.dataset.num_workers, collate_fn=Batch.collate)


class OnDevice:
    """A loader whose batches arrive on `device`; keeps len() so progress bars know the total."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return (batch.to(self.device) for batch in self.loader)


@dataclass
class Predictions:
    """Everything the engine keeps of a pass over a split, as numpy arrays."""

    score: np.ndarray
    anomaly_map: np.ndarray  # (N, H, W) float32
    label: np.ndarray
    mask: np.ndarray  # (N, H, W) bool
    has_mask: np.ndarray
    path: list[str] = field(default_factory=list)
    defect_type: list[str] = field(default_factory=list)
    norm_score: np.ndarray | None = None
    pred_label: np.ndarray | None = None


def build_model(config: Config, for_loading: bool = False, params: dict | None = None) -> AnomalyModel:
    params = config.model_params if params is None else params
    cls = get_model_class(config.model_name)
    if for_loading and "weights" in cls.constraints:
        # The checkpoint carries the backbone weights: don't fetch pretrained ones again, but keep
        # saying which ones they are (metadata and re-saved checkpoints read hparams).
        model = create_model(config.model_name, **{**params, "weights": "none"})
        model.hparams["weights"] = params.get("weights", cls.defaults.get("weights"))
        return model
    return create_model(config.model_name, **params)


# --------------------------------------------------------------------------- engine
class Engine:
    """Runs one experiment described by a Config: `engine.run()` does fit, calibrate and test."""

    def __init__(self, config: Config, callbacks: Iterable[Callback] = ()):
        self.config = config
        self.device = resolve_device(config.trainer.device)
        self.timings: dict[str, float] = {}
        self.metrics: dict[str, float] = {}
        self.run_dir: Path | None = None
        self.model: AnomalyModel | None = None
        self.postprocessor = None
        self.splits = None
        vis = config.visualization
        base: list[Callback] = [Timer()]
        if vis.save_images or vis.show_images:
            base.append(ImageWriter(vis.mode, vis.save_images, vis.show_images, vis.max_images))
        from .loggers import build_trackers

        self.callbacks = CallbackList([*base, *build_trackers(config), *callbacks])

    # -- run folder ---------------------------------------------------------------------------
    def make_run_dir(self) -> Path:
        c = self.config
        parent = Path(c.project.root) / c.model_name / c.dataset_name / c.dataset.category
        name = c.project.run_name or time.strftime("%Y-%m-%d_%H-%M-%S")
        run_dir, n = parent / name, 1
        while run_dir.exists():  # never overwrite an earlier run
            n += 1
            run_dir = parent / f"{name}-{n}"
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(dump_yaml(c))
        self.run_dir = run_dir
        return run_dir

    # -- stages -------------------------------------------------------------------------------
    def setup(self) -> None:
        from .data.formats import build_splits

        seed_everything(self.config.seed)
        self.splits = build_splits(self.config.dataset, seed=self.config.seed)
        if not self.splits.train:
            raise AnomalensError("The training split is empty: nothing to fit on.")

    def fit(self) -> AnomalyModel:
        self.callbacks("on_fit_start", self)
        seed_everything(self.config.seed)
        model = build_model(self.config).to(self.device)
        if model.tags.get("trainable"):
            self.train(model)
        else:
            model.fit(OnDevice(make_loader(self.splits.train, self.config), self.device))
        self.model = model.eval()
        self.callbacks("on_fit_end", self)
        return self.model

    def refit(self) -> None:
        """One-pass models: fit again on the training plus the good validation images.

        Calibration needs images the model has not seen, so the first fit leaves the validation
        images out; a memory bank or a Gaussian that fits in one pass then costs little to refit
        with them, and gains what they show of normal variation.  The thresholds stay those measured
        on held-out images: with more of normal variation in the model, new good images tend to
        score lower, so the measured false-alarm rate becomes an upper estimate.  Models tagged
        "updatable" (PatchCore) learn the validation images on top of the fit instead of starting over.
        """
        good_val = [r for r in self.splits.val if r.label == GOOD]
        if self.model.tags.get("trainable") or not good_val or not self.config.trainer.refit:
            return
        t0 = time.perf_counter()
        seed_everything(self.config.seed)
        if self.model.tags.get("updatable"):
            self.model.update(OnDevice(make_loader(good_val, self.config), self.device))
        else:
            model = build_model(self.config).to(self.device)
            model.fit(OnDevice(make_loader([*self.splits.train, *good_val], self.config), self.device))
            self.model = model.eval()
        self.timings["refit_seconds"] = time.perf_counter() - t0

    def train(self, model: AnomalyModel) -> None:
        """The shared training loop, validating on the validation split each epoch."""
        from dataclasses import asdict

        from .training import Trainer, TrainSettings

        settings = TrainSettings.resolve(model.training_defaults, asdict(self.config.trainer))
        loader = make_loader(self.splits.train, self.config, shuffle=True, batch_size=settings.batch_size)
        train_batches = OnDevice(loader, self.device)
        self.model = model

        def validate() -> dict[str, float]:
            return self.validation_logs(model)

        def epoch_end(epoch: int, logs: dict[str, float]) -> None:
            self.callbacks("on_train_epoch_end", self, epoch, logs)

        trainer = Trainer(model, settings, self.device, validate=validate if self.splits.val else None,
                          on_epoch_end=epoch_end)
        self.history = trainer.fit(train_batches)
        self.best_epoch = trainer.best_epoch

    @torch.no_grad()
    def validation_logs(self, model: AnomalyModel) -> dict[str, float]:
        """val_loss (the training objective on held-out images) and, when defects exist, AUROC/AUPRO."""
        from .metrics import compute_metrics

        losses = []
        for batch in OnDevice(make_loader(self.splits.val, self.config), self.device):
            losses.append(float(model.training_step(batch)["loss"]))
        logs = {"val_loss": float(np.mean(losses))}
        preds = self.infer(self.splits.val, "Validating")
        if len(set(preds.label.tolist()) & {0, 1}) == 2:
            m = compute_metrics(preds.label, preds.score, preds.anomaly_map, preds.mask, preds.has_mask,
                                float("nan"), float("nan"))
            logs.update({f"val_{k}": m[k] for k in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")})
        return logs

    def calibrate(self) -> None:
        """Fit thresholds and normalisation on the validation split (never on the test split)."""
        from .postprocess import PostProcessor

        pp = self.config.postprocess
        records = self.splits.val
        if not records:
            raise AnomalensError("The validation split is empty: raise dataset.val_ratio or add images.")
        preds = self.infer(records, "Calibrating")
        self.postprocessor = PostProcessor().fit(
            preds.score, preds.label, preds.anomaly_map, preds.mask, preds.has_mask, method=pp.threshold,
            false_alarm_rate=pp.false_alarm_rate, manual_threshold=pp.manual_threshold,
            manual_pixel_threshold=pp.manual_pixel_threshold).to(self.device)
        self.callbacks("on_calibrate_end", self)

    def test(self, records: Sequence[Any] | None = None) -> dict[str, float]:
        from .metrics import compute_metrics

        self.callbacks("on_test_start", self)
        preds = self.infer(self.splits.test if records is None else records, "Testing", notify=True)
        metrics = compute_metrics(preds.label, preds.score, preds.anomaly_map, preds.mask, preds.has_mask,
                                  float(self.postprocessor.image_threshold), float(self.postprocessor.pixel_threshold))
        self.metrics = {k: float(v) for k, v in metrics.items()}
        self.test_predictions = preds
        self.callbacks("on_test_end", self, self.metrics)
        return self.metrics

    @torch.no_grad()
    def infer(self, records: Sequence[Any], description: str, notify: bool = False) -> Predictions:
        """Run model (+ post-processor when fitted) over records; collect raw and decided outputs."""
        loader = make_loader(records, self.config)
        parts: dict[str, list] = {k: [] for k in ("score", "map", "label", "mask", "has_mask", "norm", "pred")}
        paths: list[str] = []
        types: list[str] = []
        for batch in track(loader, description):
            batch = batch.to(self.device)
            out: AnomalyOutput = self.model(batch.image)
            if self.postprocessor is not None:
                out = self.postprocessor(out)
                parts["norm"].append(out.norm_score.cpu())
                parts["pred"].append(out.pred_label.cpu())
                if notify:
                    self.callbacks("on_test_batch_end", self, batch.to("cpu"), _to_cpu(out))
            parts["score"].append(out.score.cpu())
            parts["map"].append(out.anomaly_map[:, 0].cpu())
            parts["label"].append(batch.label.cpu())
            parts["mask"].append(batch.mask[:, 0].cpu() > 0.5)
            parts["has_mask"].append(batch.has_mask.cpu())
            paths += batch.path
            types += batch.defect_type
        cat = {k: torch.cat(v).numpy() if v else None for k, v in parts.items()}
        return Predictions(cat["score"].astype(np.float64), cat["map"].astype(np.float32), cat["label"], cat["mask"],
                           cat["has_mask"], paths, types, cat["norm"], cat["pred"])

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> Path:
        """Fit, calibrate, test and write the run folder; returns its path."""
        self.make_run_dir()
        try:
            self.callbacks("on_run_start", self)
            self.setup()
            self.fit()
            self.calibrate()
            self.refit()
            save_checkpoint(self.run_dir / CHECKPOINT_NAME, self.config, self.model, self.postprocessor)
            self.test()
            self.write_record()
            self.callbacks("on_run_end", self)
        except BaseException as exc:
            self.callbacks("on_exception", self, exc)
            raise
        return self.run_dir

    def write_record(self, suffix: str = "") -> None:
        """metrics.json and scores.csv: the local record every run keeps."""
        preds = self.test_predictions
        summary = {
            "model": self.config.model_name, "dataset": self.config.dataset_name,
            "category": self.config.dataset.category, "anomalens_version": __version__,
            "threshold_method": getattr(self.postprocessor, "method", None),
            "n_train": len(self.splits.train), "n_val": len(self.splits.val), "n_test": len(preds.score),
            "device": str(self.device), "metrics": self.metrics, "timings": self.timings,
            "fit_info": self.model.fit_info,
        }
        (self.run_dir / f"metrics{suffix}.json").write_text(json.dumps(summary, indent=2, allow_nan=True))
        write_scores_csv(self.run_dir / f"scores{suffix}.csv", preds)


def _to_cpu(out: AnomalyOutput) -> AnomalyOutput:
    return AnomalyOutput(*(None if v is None else v.cpu() for v in
                           (out.score, out.anomaly_map, out.norm_score, out.norm_map, out.pred_label, out.pred_mask)))


def write_scores_csv(path: Path, preds: Predictions) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "defect_type", "label", "score", "norm_score", "pred_label"])
        for i, p in enumerate(preds.path):
            norm = "" if preds.norm_score is None else f"{preds.norm_score[i]:.6f}"
            pred = "" if preds.pred_label is None else int(preds.pred_label[i])
            writer.writerow([p, preds.defect_type[i], int(preds.label[i]), f"{preds.score[i]:.6g}", norm, pred])


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, config: Config, model: AnomalyModel, postprocessor: Any) -> None:
    payload = {
        "format_version": 2,
        "anomalens_version": __version__,
        "config": config.to_dict(),
        # Every parameter, defaults resolved: a later change of a default must not change a saved model.
        "model_params": dict(model.hparams),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "fit_info": dict(model.fit_info),  # what fit chose from the data (e.g. mirrors), for update()
        "postprocess_state": {k: v.detach().cpu() for k, v in postprocessor.state_dict().items()},
    }
    tmp = Path(path).with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint


def find_checkpoint(run_or_file: str | Path) -> Path:
    path = Path(run_or_file)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise AnomalensError(f"No checkpoint found at '{path}': pass a run folder or its {CHECKPOINT_NAME}.")
    return path


def load_checkpoint(run_or_file: str | Path, device: str | torch.device = "cpu"):
    """Return (config, model, postprocessor) from a run folder or checkpoint file."""
    from .postprocess import PostProcessor

    path = find_checkpoint(run_or_file)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    config = config_from_dict(payload["config"])
    # The resolved parameters (format 1 saved only those the config set); a parameter the checkpoint
    # predates takes the value the model ran with before it existed (tag legacy_params).
    saved = payload.get("model_params")
    saved = config.model_params if saved is None else saved
    params = {**get_model_class(config.model_name).tags.get("legacy_params", {}), **saved}
    model = build_model(config, for_loading=True, params=params)
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise AnomalensError(f"Checkpoint '{path}' (anomalens {payload.get('anomalens_version', '?')}) does not fit "
                             f"this version's {type(model).__name__}: {detail}") from None
    model.fit_info = dict(payload.get("fit_info", {}))
    postprocessor = PostProcessor()
    postprocessor.load_state_dict(payload["postprocess_state"])
    return config, model.eval().to(device), postprocessor.eval().to(device)
