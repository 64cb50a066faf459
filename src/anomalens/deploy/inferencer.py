"""Inference on new images with exactly the engine's decisions, on any runtime.

`Inferencer.load(path)` reads a run folder, a checkpoint, or an exported artifact (.pt, .onnx,
OpenVINO .xml) and picks the runtime from it: torch, ONNX Runtime or OpenVINO.  Every runtime
runs the same graph (model + fitted post-processor, see `export.InferenceGraph`) and `predict`
returns the one output type, `AnomalyOutput` (raw and normalised scores and maps, labels, masks),
as CPU tensors.  Images are resized to the model's input size on the host by the dataset's own
function, so a runtime never sees another resize than the engine did.

`predict_to_folder` scores a folder, an image or a video and writes CSV, JSON and pictures.
"""
from __future__ import annotations

import csv
import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AnomalensError, ConfigError, DataError, missing_dependency
from ..models.base import AnomalyOutput
from .export import (
    OUTPUT_NAMES,
    InferenceGraph,
    as_output,
    build_metadata,
    default_artifact_path,
    parity_tolerance,
    read_metadata,
)

RUNTIMES = ("torch", "onnx", "openvino")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")


# --------------------------------------------------------------------------- runtimes
class TorchRuntime:
    """The InferenceGraph in eager torch, on CPU or CUDA; takes any batch size."""

    name = "torch"

    def __init__(self, graph: InferenceGraph, device: torch.device):
        self.graph, self.device = graph.eval().to(device), device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Sequence[Any]:
        return self.graph(images.to(self.device))


class OnnxRuntime:
    """An ONNX file in ONNX Runtime (CPU, or CUDA when onnxruntime-gpu provides it)."""

    name = "onnx"

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise missing_dependency("onnxruntime", "export") from None
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError("ONNX Runtime has no CUDA provider here; use --device cpu or install onnxruntime-gpu.")
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> Sequence[Any]:
        return self.session.run(list(OUTPUT_NAMES), {self.input_name: np.ascontiguousarray(images.numpy())})


class OpenVinoRuntime:
    """An OpenVINO IR (.xml) or ONNX file compiled for the CPU with an explicit inference precision.

    Recent Intel CPUs (AMX, AVX512-BF16) compute in bf16 by default, which moves scores by ~1e-2;
    the artifact's `inference_precision` is set explicitly ("f32"; "bf16" for bf16 artifacts and for
    what a backbone-wide INT8 leaves float).  One infer request per thread,
    so a server may call predict from several threads.
    """

    name = "openvino"

    def __init__(self, path: Path, inference_precision: str = "f32", device: str = "cpu",
                 threads: int | None = None):
        from .export import _import

        if device != "cpu":
            raise ConfigError("The openvino runtime runs on the CPU here; use --device cpu (or auto).")
        ov = _import("openvino")
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": inference_precision}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(str(path), "CPU", config)
        self._local = threading.local()

    def __call__(self, images: torch.Tensor) -> Sequence[Any]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({0: np.ascontiguousarray(images.numpy())})
        # The request reuses its output buffers: copy before the next call overwrites them.
        return [np.array(request.get_output_tensor(i).data) for i in range(len(OUTPUT_NAMES))]


# --------------------------------------------------------------------------- resolving a path
def _locate(path: Path, runtime: str | None) -> tuple[str, Path]:
    """(runtime, file) for a run folder, checkpoint or artifact, honouring an explicit runtime."""
    from ..engine import CHECKPOINT_NAME

    if runtime is not None and runtime not in RUNTIMES:
        raise ConfigError(f"The 'runtime' parameter of Inferencer.load must be one of {', '.join(map(repr, RUNTIMES))}. "
                          f"Got {runtime!r} instead.")
    if path.is_dir():
        found = [p for p in (path / CHECKPOINT_NAME, path / "model.onnx", path / "model.xml") if p.is_file()]
        if not found:
            raise AnomalensError(f"No model found in '{path}': pass a run folder, its {CHECKPOINT_NAME}, or an exported "
                                 "model (.pt, .onnx, .xml).")
        if found[0].suffix == ".pt" and runtime not in (None, "torch"):
            # A run folder: use its export for that runtime, made by `anomalens export`.
            fmt = "onnx" if runtime == "onnx" else "openvino"
            exported = default_artifact_path(path, fmt, "fp32")
            if not exported.is_file():
                raise ConfigError(f"Run '{path}' has no {fmt} export yet; create it with: "
                                  f"anomalens export --run {path} --format {fmt}")
            return runtime, exported
        path = found[0]
    elif not path.is_file():
        raise AnomalensError(f"No model found at '{path}': pass a run folder, its {CHECKPOINT_NAME}, or an exported "
                             "model (.pt, .onnx, .xml).")
    suffix = path.suffix.lower()
    native = {".pt": "torch", ".pth": "torch", ".onnx": "onnx", ".xml": "openvino"}.get(suffix)
    if native is None:
        raise ConfigError(f"Unknown model file type '{path.suffix}' ('{path}'): expected .pt, .onnx or .xml.")
    chosen = runtime or native
    # OpenVINO reads ONNX files too; every other pairing would need a conversion first.
    if chosen != native and not (native == "onnx" and chosen == "openvino"):
        raise ConfigError(f"A {suffix} file cannot run on the {chosen} runtime; export the run with "
                          f"`anomalens export --format {'openvino' if chosen == 'openvino' else chosen}` first.")
    return chosen, path


# --------------------------------------------------------------------------- inferencer
@dataclass
class Inferencer:
    """A loaded model on one runtime, with the metadata that says how to feed it and read it."""

    runtime: Any  # TorchRuntime | OnnxRuntime | OpenVinoRuntime: images tensor -> the six outputs
    metadata: dict[str, Any]
    device: torch.device

    @classmethod
    def load(cls, artifact_or_run: str | Path, device: str = "auto", runtime: str | None = None,
             threads: int | None = None) -> Inferencer:
        """Load a run folder, checkpoint or exported artifact; runtime None picks the artifact's own.

        With a run folder and runtime 'onnx' / 'openvino', the run's FP32 export (see
        `anomalens export`) is used.  `threads` caps the CPU threads of ONNX Runtime and OpenVINO;
        for torch it sets torch's (process-wide) thread count.
        """
        from ..engine import load_checkpoint, resolve_device

        chosen, path = _locate(Path(artifact_or_run), runtime)
        dev = resolve_device(device)
        if chosen == "torch":
            if threads is not None:
                torch.set_num_threads(threads)
            config, model, post = load_checkpoint(path, dev)
            payload = torch.load(path, map_location="cpu", weights_only=True)
            metadata = payload.get("metadata") or build_metadata(config, post, "torch", "fp32", None, path.parent,
                                                                 parity_tolerance(model), model.hparams)
            engine = TorchRuntime(InferenceGraph(model, post), dev)
        else:
            if dev.type != "cpu" and chosen == "openvino":
                dev = torch.device("cpu")  # OpenVINO's GPU plugin is for Intel GPUs: run on the CPU
            metadata = read_metadata(path)
            engine = (OnnxRuntime(path, dev.type, threads) if chosen == "onnx"
                      else OpenVinoRuntime(path, metadata.get("inference_precision", "f32"), threads=threads))
        metadata = {**metadata, "runtime": chosen, "path": str(path)}
        return cls(engine, metadata, dev)

    # -- what the model expects -----------------------------------------------------------------
    @property
    def runtime_name(self) -> str:
        return self.runtime.name

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the model takes; `to_tensor` and `predict` resize to it."""
        h, w = self.metadata["input_size"]
        return int(h), int(w)

    @property
    def batch_size(self) -> int | None:
        """The graph's fixed batch size, or None when it takes any; `predict` accepts any either way."""
        return self.metadata.get("batch_size")

    @property
    def image_threshold(self) -> float:
        return float(self.metadata["image_threshold"])

    @property
    def pixel_threshold(self) -> float:
        return float(self.metadata["pixel_threshold"])

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> float (1, 3, S, S) in [0, 1], by the same code as the training data."""
        from ..data.dataset import image_to_tensor

        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", None)
            raise DataError(f"to_tensor expects a uint8 (H, W, 3) RGB array. Got shape {shape} instead.")
        return image_to_tensor(np.ascontiguousarray(image, dtype=np.uint8), self.image_size)[None]

    def prepare(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] (or uint8) -> float32 CPU (B, 3, S, S), resized like the training data."""
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"predict expects images of shape (B, 3, H, W). Got {tuple(x.shape)} instead.")
        x = x.detach().cpu()
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
            x = x.clamp_(0.0, 1.0)
        return x.contiguous()

    def predict(self, images: torch.Tensor | np.ndarray) -> AnomalyOutput:
        """Post-processed outputs (CPU tensors) for images (B, 3, H, W) in [0, 1]."""
        x = self.prepare(images)
        fixed = self.batch_size
        if fixed is None:
            return as_output(self.runtime(x))
        # A fixed-batch graph: run chunks of exactly `fixed` images, padding the last one.
        parts = []
        for start in range(0, len(x), fixed):
            chunk = x[start:start + fixed]
            n = len(chunk)
            if n < fixed:
                chunk = torch.cat([chunk, chunk[-1:].expand(fixed - n, -1, -1, -1)])
            out = as_output(self.runtime(chunk))
            parts.append([getattr(out, k)[:n] for k in ("score", "anomaly_map", "norm_score", "norm_map",
                                                        "pred_label", "pred_mask")])
        return AnomalyOutput(*(torch.cat(values) for values in zip(*parts, strict=True)))

    def iter_predict(self, files: Sequence[Path], batch_size: int = 16) -> Iterator[tuple[list[Path], torch.Tensor,
                                                                                           AnomalyOutput]]:
        """(paths, images, outputs) for consecutive batches of image files."""
        from ..data.io import read_image

        for start in range(0, len(files), batch_size):
            chunk = list(files[start:start + batch_size])
            batch = torch.cat([self.to_tensor(read_image(p)) for p in chunk])
            yield chunk, batch, self.predict(batch)


# --------------------------------------------------------------------------- sources
def list_images(source: str | Path) -> list[Path]:
    """One image file, or every image in a folder (recursively, sorted)."""
    from ..data.io import IMAGE_EXTENSIONS, is_image_file

    path = Path(source)
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"Input not found: '{path}'.")
    files = sorted(p for p in path.rglob("*") if is_image_file(p))
    if not files:
        raise DataError(f"No images found in '{path}' (accepted: {', '.join(IMAGE_EXTENSIONS)}).")
    return files


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def list_inputs(source: str | Path) -> list[Path]:
    """One image or video file, or every image and video in a folder (recursively, sorted)."""
    from ..data.io import IMAGE_EXTENSIONS, is_image_file

    path = Path(source)
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"Input not found: '{path}'.")
    files = sorted(p for p in path.rglob("*") if is_image_file(p) or (is_video(p) and p.is_file()))
    if not files:
        accepted = ", ".join((*IMAGE_EXTENSIONS, *VIDEO_SUFFIXES))
        raise DataError(f"No images or videos found in '{path}' (accepted: {accepted}).")
    return files


def _imageio():
    try:
        import imageio.v3 as iio
    except ImportError:
        raise missing_dependency("imageio", "export") from None
    return iio


def video_frames(path: Path) -> Iterator[np.ndarray]:
    """Frames of a video as uint8 (H, W, 3) RGB arrays (imageio; mp4/avi/mov/mkv/webm need imageio-ffmpeg)."""
    iio = _imageio()
    try:
        for frame in iio.imiter(path):
            frame = np.asarray(frame)
            if frame.ndim == 2:
                frame = np.repeat(frame[..., None], 3, axis=2)
            yield np.ascontiguousarray(frame[..., :3], dtype=np.uint8)
    except ImportError:
        raise missing_dependency("imageio-ffmpeg", "export") from None
    except (OSError, ValueError, RuntimeError) as exc:
        if path.suffix.lower() != ".gif" and "ffmpeg" in str(exc).lower():
            raise missing_dependency("imageio-ffmpeg", "export") from None
        raise DataError(f"Cannot read video '{path}': {str(exc).strip().splitlines()[0] if str(exc) else exc}.") \
            from None


def count_frames(path: Path) -> int | None:
    """Frame count of a video when its header tells (None otherwise): only for progress bars."""
    try:
        iio = _imageio()
        n = iio.improps(path).n_images
        if n is not None and np.isfinite(n):
            return int(n)
        meta = iio.immeta(path)
        return int(round(meta["fps"] * meta["duration"]))
    except Exception:  # noqa: BLE001 - a missing count only makes the progress bar open-ended
        return None


@dataclass
class Frame:
    """One image to score: where it came from (file, and frame number for videos) and its pixels."""

    path: Path
    frame: int | None
    image: np.ndarray  # uint8 (H, W, 3)


def iter_frames(files: Iterable[Path]) -> Iterator[Frame]:
    from ..data.io import read_image

    for path in files:
        if is_video(path):
            for i, frame in enumerate(video_frames(path)):
                yield Frame(path, i, frame)
        else:
            yield Frame(path, None, read_image(path))


def _batched(frames: Iterable[Frame], size: int) -> Iterator[list[Frame]]:
    chunk: list[Frame] = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _picture_path(frame: Frame, source: Path) -> Path:
    """Mirror the input's sub-folders (test/good/000.png and test/hole/000.png both survive); video frames
    go to <video name>/frame_000012.png."""
    rel = frame.path.relative_to(source) if source.is_dir() else Path(frame.path.name)
    if frame.frame is not None:
        return rel.parent / rel.stem / f"frame_{frame.frame:06d}.png"
    return rel.with_suffix(".png")


# --------------------------------------------------------------------------- batch prediction
def predict_to_folder(inferencer: Inferencer, source: str | Path, out_dir: str | Path, batch_size: int = 16,
                      mode: str = "full", save_images: bool = True) -> Path:
    """Score every image (and video frame) of `source`; write predictions.csv, predictions.json and
    pictures (images/...) to out_dir; returns the CSV's path."""
    from ..progress import track
    from ..visualization import render, save_image

    if batch_size < 1:
        raise ConfigError(f"The 'batch_size' parameter of predict must be an int >= 1. Got {batch_size} instead.")
    source = Path(source)
    files = list_inputs(source)
    counts = [count_frames(p) if is_video(p) else 1 for p in files]
    total = None if None in counts else -(-sum(counts) // batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for chunk in track(_batched(iter_frames(files), batch_size), "Predicting", total=total):
        images = torch.cat([inferencer.to_tensor(f.image) for f in chunk])
        res = inferencer.predict(images)
        for i, frame in enumerate(chunk):
            label = bool(res.pred_label[i])
            rows.append({"path": str(frame.path), "frame": frame.frame, "score": float(res.score[i]),
                         "norm_score": float(res.norm_score[i]), "label": "defect" if label else "good",
                         "defect_area": float(res.pred_mask[i].float().mean())})
            if save_images:
                picture = render(images[i], res.norm_map[i], pred_mask=res.pred_mask[i], score=float(res.norm_score[i]),
                                 label=label, mode=mode, title=frame.path.name if frame.frame is None
                                 else f"{frame.path.name} #{frame.frame}")
                save_image(picture, out / "images" / _picture_path(frame, source))
    csv_path = out / "predictions.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "frame", "score", "norm_score", "label", "defect_area"])
        for r in rows:
            writer.writerow([r["path"], "" if r["frame"] is None else r["frame"], f"{r['score']:.6g}",
                             f"{r['norm_score']:.6f}", r["label"], f"{r['defect_area']:.6f}"])
    meta = inferencer.metadata
    summary = {key: meta.get(key) for key in ("model", "runtime", "precision", "input_size", "image_threshold",
                                              "pixel_threshold", "anomalens_version", "path")}
    summary["n_defect"] = sum(r["label"] == "defect" for r in rows)
    summary["predictions"] = rows
    (out / "predictions.json").write_text(json.dumps(summary, indent=2))
    return csv_path


__all__ = ["Inferencer", "TorchRuntime", "OnnxRuntime", "OpenVinoRuntime", "RUNTIMES", "predict_to_folder",
           "list_images", "list_inputs", "video_frames"]
