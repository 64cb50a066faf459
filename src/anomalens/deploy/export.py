"""Export a trained run as one self-contained artifact: torch, ONNX or OpenVINO (FP32, FP16, BF16, INT8).

The exported graph is `InferenceGraph`: the model (the backbone's ImageNet normalisation is a
buffer inside it; maps come out upsampled and blurred) followed by the fitted `PostProcessor`
(normalisation and thresholds).  It takes images (B, 3, S, S) in [0, 1] at the training size S
and returns six tensors, `OUTPUT_NAMES`, which every runtime turns back into an `AnomalyOutput`.

The resize to S stays on the host, done by `anomalens.data.dataset.image_to_tensor` (antialiased
bilinear) for every runtime.  An in-graph resize would reach ONNX Runtime as `Resize(antialias=1)`,
which matches torch to ~1e-5, but OpenVINO's antialiased `Interpolate` weights pixels differently
(in our test PaDiM's raw score moved by 40 and PatchCore's masks changed), so the same image could
get another decision depending on the runtime.  One host resize for all keeps decisions identical.

Metadata (model, input size, thresholds, normalisation statistics, versions, precision) travels
inside the artifact: in the torch file, in ONNX `metadata_props["anomalens"]`, and in a JSON
sidecar next to OpenVINO's model.xml.  OpenVINO telemetry is switched off before its converter or
NNCF is imported, so an export opens no outside connection.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..components.knn import norms_as_bias
from ..errors import AnomalensError, ConfigError, DataError, missing_dependency
from ..models.base import AnomalyOutput

FORMATS = ("torch", "onnx", "openvino")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# Which precisions each format offers: torch and ONNX Runtime run on float32 here.  OpenVINO:
# fp16 stores weights in half precision (computed in float32), bf16 computes in bfloat16 on CPUs
# with AMX / AVX512-BF16 (float32 elsewhere), int8 quantises with NNCF what int8_scopes names (by
# default the backbone) and computes what stays float in INT8_FLOAT_PRECISION.
# Only fp32 is held to the parity contract; the others report their AUROC change on export.
FORMAT_PRECISIONS = {"torch": ("fp32",), "onnx": ("fp32",), "openvino": PRECISIONS}
# What an INT8 artifact leaves float (PatchCore: all but its search's ranking product; PaDiM: all but
# the backbone) is computed in bfloat16 on CPUs with AMX / AVX512-BF16, float32 elsewhere: 1.2x-1.5x
# faster than float32 there.  Batch 8, 256 px, one thread: PaDiM's depthwise convolutions and
# Mahalanobis product 1.3x-1.5x (2-core Xeon with AMX); PatchCore 55.3 against 45.3 images/s (AMD
# EPYC with AVX512-BF16).  The AUROC change is measured on every export (see the README's figures).
INT8_FLOAT_PRECISION = "bf16"
INPUT_NAME = "images"
OUTPUT_NAMES = ("score", "anomaly_map", "norm_score", "norm_map", "pred_label", "pred_mask")
METADATA_KEY = "anomalens"
ARTIFACT_VERSION = 1
# The parity contract between runtimes at FP32: |a - b| <= ATOL + RTOL * |a| for scores, and
# |a - b| <= ATOL + RTOL * max|a| for maps (a map's round-off scales with its peak, not with each
# pixel: a 0.02 pixel of a probability map peaking at 1 carries the peak's error); labels and masks
# identical except where the reference value lies within that band of the threshold.
# A deep network whose float32 round-off exceeds this may declare its own bounds in its tags
# (`parity_rtol`, `parity_atol`, with the reason); they travel in the artifact's metadata.
PARITY_RTOL = 1e-4
PARITY_ATOL = 1e-5


def parity_tolerance(model_or_metadata: Any) -> tuple[float, float]:
    """(rtol, atol) of the parity contract for a model (its tags) or an artifact (its metadata)."""
    if isinstance(model_or_metadata, dict):
        bounds = model_or_metadata.get("parity") or {}
        return float(bounds.get("rtol", PARITY_RTOL)), float(bounds.get("atol", PARITY_ATOL))
    tags = getattr(model_or_metadata, "tags", {})
    return float(tags.get("parity_rtol", PARITY_RTOL)), float(tags.get("parity_atol", PARITY_ATOL))


# --------------------------------------------------------------------------- the graph
class InferenceGraph(nn.Module):
    """Model + post-processor as one module: images (B, 3, S, S) in [0, 1] -> the six OUTPUT_NAMES tensors."""

    def __init__(self, model: nn.Module, postprocessor: nn.Module):
        super().__init__()
        self.model, self.postprocessor = model, postprocessor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        shape = out.anomaly_map.shape
        # The maps are post-processed flat, (B, H*W): OpenVINO runs element-wise ops on (B, 1, H, W)
        # channels-last, their single channel innermost, ~19x slower (38 of 227 ms per batch of 8 for PaDiM).
        norm_score, norm_map, pred_label, pred_mask = self.postprocessor.apply(out.score, out.anomaly_map.flatten(1))
        return out.score, out.anomaly_map, norm_score, norm_map.reshape(shape), pred_label, pred_mask.reshape(shape)


def as_output(values: Sequence[Any]) -> AnomalyOutput:
    """The six graph outputs (torch or numpy, any runtime) -> an AnomalyOutput of CPU tensors."""
    t = [torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v.detach().cpu() for v in values]
    return AnomalyOutput(score=t[0].float(), anomaly_map=t[1].float(), norm_score=t[2].float(),
                         norm_map=t[3].float(), pred_label=t[4].bool(), pred_mask=t[5].bool())


# --------------------------------------------------------------------------- metadata
def build_metadata(config: Any, postprocessor: Any, fmt: str, precision: str = "fp32",
                   batch_size: int | None = None, source: str | Path | None = None,
                   tolerance: tuple[float, float] = (PARITY_RTOL, PARITY_ATOL),
                   model_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything an artifact's user needs to feed it and read its outputs, as plain JSON values."""
    size = config.dataset.image_size
    return {
        "artifact_version": ARTIFACT_VERSION,
        "anomalens_version": __version__,
        "model": config.model_name,
        "model_params": dict(config.model_params if model_params is None else model_params),  # defaults resolved
        "dataset": config.dataset_name,
        "category": config.dataset.category,
        "input_name": INPUT_NAME,
        "input_size": [size, size],
        "input": f"float32 RGB (B, 3, {size}, {size}) in [0, 1]; the backbone's normalisation is inside the graph",
        "resize": "antialiased bilinear to input_size on the host (anomalens.data.dataset.image_to_tensor)",
        "batch_size": batch_size,  # None: any batch; an int: the graph takes exactly that many images
        "outputs": list(OUTPUT_NAMES),
        "image_threshold": float(postprocessor.image_threshold),
        "pixel_threshold": float(postprocessor.pixel_threshold),
        "image_scale": float(postprocessor.image_scale),
        "pixel_scale": float(postprocessor.pixel_scale),
        "threshold_method": postprocessor.image_method,
        "pixel_threshold_method": postprocessor.pixel_method,
        "normalisation": "rational sigmoid, threshold -> 0.5 (anomalens.postprocess)",
        "format": fmt,
        "precision": precision,
        "int8_graph": precision == "int8",  # traced in the form INT8 quantisation expects (see trace)
        # OpenVINO on CPUs with AMX/AVX512-BF16 would silently compute in bf16: we pin f32 unless asked.
        "inference_precision": {"bf16": "bf16", "int8": INT8_FLOAT_PRECISION}.get(precision, "f32"),
        "parity": {"rtol": tolerance[0], "atol": tolerance[1], "maps": "rtol relative to each map's peak"},
        "source": None if source is None else str(source),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config.to_dict(),
    }


def sidecar_path(xml_path: str | Path) -> Path:
    """The JSON metadata file next to an OpenVINO model.xml."""
    return Path(xml_path).with_suffix(".json")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of an exported artifact (.pt, .onnx or OpenVINO .xml)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        if METADATA_KEY not in props:
            raise AnomalensError(f"'{path}' holds no anomalens metadata; export it with `anomalens export`.")
        return json.loads(props[METADATA_KEY])
    if suffix == ".xml":
        side = sidecar_path(path)
        if not side.is_file():
            raise AnomalensError(f"Metadata file '{side}' is missing; keep it next to '{path.name}' "
                                 "(it holds the input size and thresholds).")
        return json.loads(side.read_text())
    if suffix == ".pt":
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return payload.get("metadata") or {}
    raise ConfigError(f"Unknown model file type '{path.suffix}': expected .pt, .onnx or .xml.")


# --------------------------------------------------------------------------- paths and checks
def default_artifact_path(run_dir: str | Path, fmt: str, precision: str = "fp32") -> Path:
    """RUN/export/torch/model.pt, RUN/export/onnx/model.onnx, RUN/export/openvino_<precision>/model.xml."""
    base = Path(run_dir) / "export"
    if fmt == "torch":
        return base / "torch" / "model.pt"
    if fmt == "onnx":
        return base / "onnx" / "model.onnx"
    return base / f"openvino_{precision}" / "model.xml"


_SUFFIX = {"torch": ".pt", "onnx": ".onnx", "openvino": ".xml"}


def _resolve_out(out: str | Path | None, run_dir: Path, fmt: str, precision: str) -> Path:
    if out is None:
        return default_artifact_path(run_dir, fmt, precision)
    out = Path(out)
    # A path with the format's suffix is the file itself; anything else is a folder to put it in.
    return out if out.suffix.lower() == _SUFFIX[fmt] else out / f"model{_SUFFIX[fmt]}"


def check_format(fmt: str, precision: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"The 'format' parameter of export must be one of {', '.join(map(repr, FORMATS))}. "
                          f"Got {fmt!r} instead.")
    if precision not in PRECISIONS:
        raise ConfigError(f"The 'precision' parameter of export must be one of {', '.join(map(repr, PRECISIONS))}. "
                          f"Got {precision!r} instead.")
    if precision not in FORMAT_PRECISIONS[fmt]:
        raise ConfigError(f"Precision {precision!r} is not available for the {fmt} format (it exports fp32); "
                          "use --format openvino for fp16, bf16 or int8.")


def disable_openvino_telemetry() -> None:
    """Stop OpenVINO's converter and NNCF from sending usage data; call before importing them.

    Both send anonymous telemetry unless the user ran `opt_in_out --opt_out` (a file in $HOME);
    neither offers an environment switch.  Both fall back to built-in no-op stubs when the
    `openvino_telemetry` package cannot be imported, so we make it unimportable for this process.
    If it was already imported, its sender is made a no-op instead.
    """
    loaded = sys.modules.get("openvino_telemetry")
    if loaded is None:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import -> ImportError -> stubs
        return
    try:
        from openvino_telemetry.utils.sender import TelemetrySender

        TelemetrySender.send = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    except ImportError:  # pragma: no cover - another layout: nothing we know how to switch off
        pass


def _import(module: str, extra: str = "export"):
    import importlib

    if module.startswith(("openvino", "nncf")):
        disable_openvino_telemetry()
    try:
        with _quiet():  # NNCF's import logs a CUDA notice through torch on CPU-only machines
            return importlib.import_module(module)
    except ImportError:
        raise missing_dependency(module.split(".")[0], extra) from None


# --------------------------------------------------------------------------- tracing
def _model_file(path: Path) -> str:
    """How to name `path` if it is model code, else '': anomalens' own files (but not this deploy
    package) as 'anomalens/...', a user's file (outside the installed libraries) by its name."""
    import sysconfig

    path = path.resolve()
    package = Path(__file__).resolve().parents[1]
    if package in path.parents:
        return "" if path.parent.name == "deploy" else "anomalens/" + path.relative_to(package).as_posix()
    libraries = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib", "stdlib")}
    return "" if any(lib in path.parents for lib in libraries) else path.name


def _blocker(exc: BaseException) -> str:
    """The model line an export failed on, 'anomalens/models/x.py line 12 in forward: `code`', or ''
    (the deepest frame of model code in the traceback chain)."""
    found = ""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for frame in traceback.extract_tb(exc.__traceback__):
            where = "" if frame.filename.startswith("<") else _model_file(Path(frame.filename))
            if where:
                found = f"{where} line {frame.lineno} in {frame.name}" + (f": `{frame.line}`" if frame.line else "")
        exc = exc.__cause__ or exc.__context__
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__).rstrip(".")


def _export_error(model: nn.Module, fmt: str, exc: BaseException, stage: str) -> AnomalensError:
    name = type(model).__name__
    where = _blocker(exc)
    part = f"{where} is not traceable" if where else f"the {stage} step failed"
    return AnomalensError(f"Cannot export {name} to {fmt}: {part} ({type(exc).__name__}: {_first_line(exc)}). "
                          "Use tensor operations only in forward, or export with --format torch.")


def trace(model: nn.Module, postprocessor: nn.Module, image_size: int, batch_size: int | None = None,
          fmt: str = "onnx", int8: bool = False) -> tuple[Any, int | None]:
    """torch.export the InferenceGraph; returns (ExportedProgram, batch_size: None when any batch works).

    int8: trace the graph that INT8 quantisation expects (nearest-neighbour norms as a separate
    bias, see components/knn.py); float graphs fold them into their product.

    With batch_size None we ask for a dynamic batch; a model whose forward depends on the batch
    size (PatchCore's nearest-neighbour search is chunked by the number of patches) gets it fixed
    by torch.export, and we then trace again at batch 1 (or the given batch_size).
    """
    tags = getattr(model, "tags", {})
    if not tags.get("exportable", True):
        reason = tags.get("export_blocker", "it declares itself not exportable")
        raise AnomalensError(f"Cannot export {type(model).__name__} to {fmt}: {reason}. Use --format torch.")
    graph = InferenceGraph(model, postprocessor).eval()

    def run(batch: int, dynamic: bool):
        example = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        shapes = {"images": {0: torch.export.Dim.AUTO}} if dynamic else None
        with _quiet(), torch.no_grad(), norms_as_bias(int8):
            return torch.export.export(graph, (example,), dynamic_shapes=shapes, strict=False)

    try:
        if batch_size is not None:
            return run(batch_size, False), batch_size
        # Batch 2: torch.export specialises size-1 dimensions, so 1 would never come out dynamic.
        program = run(2, True)
        if _input_shape(program)[0] is None:
            return program, None
        return run(1, False), 1
    except AnomalensError:
        raise
    except Exception as exc:  # torch.export raises many types: name the line that blocks it
        raise _export_error(model, fmt, exc, "torch.export") from exc


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's exporters: on failure torch.export prints the partial graph to stderr (hundreds of
    lines) before raising; we turn the error into one line instead."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _input_shape(program: Any) -> list[int | None]:
    """The input's shape in an ExportedProgram, None for symbolic dimensions."""
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == INPUT_NAME:
            # A dimension torch.export had to pin (by a guard) is a SymInt without free symbols.
            return [None if isinstance(d, torch.SymInt) and d.node.expr.free_symbols else int(d)
                    for d in node.meta["val"].shape]
    raise AnomalensError("The exported program has no 'images' input.")  # pragma: no cover


# --------------------------------------------------------------------------- writers
def write_torch(path: Path, config: Any, model: nn.Module, postprocessor: nn.Module, metadata: dict) -> Path:
    """The checkpoint payload plus metadata: `load_checkpoint` and `Inferencer.load` both read it."""
    from ..engine import save_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, config, model, postprocessor)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["metadata"] = metadata
    torch.save(payload, path)
    return path


def write_onnx(path: Path, program: Any, metadata: dict, model: nn.Module | None = None) -> Path:
    """ExportedProgram -> ONNX file with metadata_props['anomalens'] = metadata (JSON)."""
    _import("onnxscript")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet():
            onnx_program = torch.onnx.export(program, (), dynamo=True, input_names=[INPUT_NAME],
                                              output_names=list(OUTPUT_NAMES), verbose=False, optimize=True)
    except Exception as exc:  # the ONNX translation names the operator it cannot convert
        raise _export_error(model if model is not None else program.module(), "onnx", exc, "ONNX translation") \
            from exc
    onnx_program.model.producer_name = "anomalens"
    onnx_program.model.producer_version = __version__
    onnx_program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    onnx_program.save(str(path), external_data=False)
    return path


def int8_scopes(model: nn.Module) -> list[str]:
    """Module paths (in the InferenceGraph) that INT8 quantises: the model's tag `int8_modules`, else
    its pretrained feature extractors (every `Backbone` submodule)."""
    from ..backbones import Backbone

    names = getattr(model, "tags", {}).get("int8_modules")
    if names is None:
        names = [name for name, module in model.named_modules() if isinstance(module, Backbone)]
    return [f"model.{name}" if name else "model" for name in names]


def _nodes_in_scopes(onnx_path: Path, scopes: Sequence[str]) -> set[str]:
    """Names of the ONNX nodes traced from inside the given module paths (torch.onnx records them)."""
    import ast

    import onnx

    found = set()
    for node in onnx.load(str(onnx_path)).graph.node:
        text = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        paths = ast.literal_eval(text) if text else []
        if any(p == s or p.startswith(s + ".") for p in paths for s in scopes):
            found.add(node.name)
    return found


def _model_line(stack_trace: str) -> str:
    """The deepest model-code frame of a torch.onnx node stack trace, as 'file line N in fn: `code`'."""
    import re

    frames = re.findall(r'File "(.+?)", line (\d+), in (\S+)\n\s*(.*)', stack_trace)
    lines = [(f, int(n), fn, code) for f, n, fn, code in frames if _model_file(Path(f))]
    if not lines:
        return ""
    f, n, fn, code = lines[-1]
    return f"{_model_file(Path(f))} line {n} in {fn}: `{code.strip()}`"


def openvino_blocker(onnx_path: Path, model_name: str) -> AnomalensError | None:
    """An error naming the model line OpenVINO would compute differently from torch, or None.

    OpenVINO's antialiased `Interpolate` weights pixels differently from torch's antialiased
    bilinear resize (and from ONNX Runtime, which matches torch): 27 % relative in one test, so the
    decisions would differ from the engine's.
    """
    import onnx

    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        if node.op_type == "Resize" and any(a.name == "antialias" and a.i for a in node.attribute):
            trace = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.stack_trace"), "")
            where = _model_line(trace) or f"node {node.name}"
            return AnomalensError(
                f"Cannot export {model_name} to openvino: {where} leads to an antialiased resize "
                "(F.interpolate(..., antialias=True)), which OpenVINO computes differently from torch (scores "
                "would differ by up to ~30 %). Resize without antialiasing (or pool) there, or use --format onnx.")
    return None


# What INT8 quantises inside its scope: the operations with 8-bit kernels.  Everything else, even
# in scope, stays float: NNCF would otherwise also quantise e.g. the input of PatchCore's exact
# distance recomputation, which shares its tensor with the ranking product.  Depthwise convolutions
# (GroupConvolution) stay float too: quantised, they moved PaDiM's scores by up to 25 % (brick) and
# 16 % (grass), float 5 % and 3 %, and its AUROC drop on brick went from 0.018 to 0.004.
INT8_OPS = ("Convolution", "MatMul")
# Convolutions with fewer input channels stay float as well: an 8-bit AMX tile holds 64 input
# channels (a bf16 one 32), so a narrower one leaves most of every tile empty and ran slower than
# in bf16.  PaDiM's INT8 (Lite0, 256 px, batch 8, one thread): keeping its stem and the 16-, 24- and
# 40-channel expansions float took 91 -> 80 ms per batch (bf16 throughout: 75), drop 0.0006 -> 0.
INT8_MIN_CHANNELS = 64


def _quantisable(op: Any) -> bool:
    """An OpenVINO operation with an 8-bit kernel worth using (INT8_OPS; convolutions >= INT8_MIN_CHANNELS in)."""
    if op.get_type_name() != "Convolution":
        return op.get_type_name() in INT8_OPS
    channels = op.input(1).get_partial_shape()[1]  # the weights: (out, in, kh, kw)
    return channels.is_dynamic or channels.get_length() >= INT8_MIN_CHANNELS


def write_openvino(path: Path, onnx_path: Path, metadata: dict, precision: str,
                   calibration: Sequence[np.ndarray] | None = None, int8_scope: Sequence[str] = ()) -> Path:
    """ONNX -> OpenVINO IR (model.xml + .bin) and the JSON sidecar; INT8 through NNCF calibration.

    INT8 quantises only the convolutions and matrix products (_quantisable) traced from `int8_scope`
    (module paths; empty = everything), so that a tensor shared with float code stays float there:
    convolutions of a pretrained backbone lose little at 8 bits, whereas distances to a memory bank
    or Mahalanobis distances are differences of large numbers; quantised, PaDiM's collapsed to
    chance level in our tests.  The rest stays float, computed at the artifact's `inference_precision`.
    """
    blocker = openvino_blocker(onnx_path, metadata.get("model", "the model"))
    if blocker is not None:
        raise blocker
    ov = _import("openvino")
    model = ov.convert_model(str(onnx_path))
    if precision == "int8":
        nncf = _import("nncf")
        if not calibration:
            raise DataError("INT8 quantisation needs calibration images (the run's training images); none were found.")
        ignored = None
        if int8_scope:
            keep = _nodes_in_scopes(onnx_path, int8_scope)
            # OpenVINO keeps ONNX node names, suffixed when it splits a node ('node_Conv_7/WithoutBiases');
            # an operation we cannot match stays float (the safe side).
            names = [op.get_friendly_name() for op in model.get_ordered_ops()
                     if op.get_friendly_name().split("/")[0] not in keep or not _quantisable(op)]
            ignored = nncf.IgnoredScope(names=names, validate=False)
        level = nncf.nncf_logger.level
        nncf.set_log_level(logging.ERROR)  # NNCF logs one INFO line per operation it skips
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = nncf.quantize(model, nncf.Dataset(list(calibration)), subset_size=len(calibration),
                                      ignored_scope=ignored)
        finally:
            nncf.set_log_level(level)
    path.parent.mkdir(parents=True, exist_ok=True)
    # save_model compresses float weights to fp16 by default: only the fp16 artifact asks for it.
    ov.save_model(model, str(path), compress_to_fp16=precision == "fp16")
    sidecar_path(path).write_text(json.dumps(metadata, indent=2))
    return path


# --------------------------------------------------------------------------- data of a run
def run_dir_of(run: str | Path) -> Path:
    path = Path(run)
    return path.parent if path.is_file() else path


def split_tensors(config: Any, split: str, limit: int | None = None) -> tuple[list[Any], torch.Tensor]:
    """(records, images) of a split of the run's dataset, resized exactly as the engine does."""
    from ..data.dataset import AnomalyDataset
    from ..data.formats import build_splits

    records = list(getattr(build_splits(config.dataset, seed=config.seed), split))
    if limit is not None:
        records = records[:limit]
    if not records:
        raise DataError(f"The {split} split of the run's dataset is empty.")
    dataset = AnomalyDataset(records, config.dataset.image_size, skip_bad_images=config.dataset.skip_bad_images)
    return dataset.records, torch.stack([dataset[i].image for i in range(len(dataset))])


def folder_tensors(folder: str | Path, image_size: int, limit: int | None = None) -> torch.Tensor:
    from ..data.dataset import image_to_tensor
    from ..data.io import read_image
    from .inferencer import list_images

    files = list_images(folder)[:limit]
    return torch.stack([image_to_tensor(read_image(p), (image_size, image_size)) for p in files])


def engine_scores(run_dir: Path) -> dict[str, dict[str, Any]] | None:
    """The engine's own test decisions (scores.csv of the run) by image path, or None without one."""
    import csv

    path = run_dir / "scores.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return {row["path"]: {"label": int(row["label"]), "score": float(row["score"]),
                              "pred_label": int(row["pred_label"]) if row["pred_label"] != "" else None}
                for row in csv.DictReader(fh)}


# --------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    """What `export` wrote: the artifact's path, its metadata, and (FP16/INT8) the accuracy check."""

    path: Path
    metadata: dict[str, Any]
    evaluation: dict[str, float] | None = None
    seconds: float = 0.0


def export(run: str | Path, fmt: str = "onnx", precision: str = "fp32", out: str | Path | None = None,
           batch_size: int | None = None, calibration: str | Path | None = None, calibration_size: int = 300,
           evaluate: bool | None = None, onnx: str | Path | None = None) -> ExportResult:
    """Export a run (folder or checkpoint) as a `fmt` artifact at `precision`; returns where and what.

    batch_size: None exports a dynamic batch when the model allows it (else batch 1); an int fixes
    it.  INT8 calibrates on up to `calibration_size` training images of the run's dataset (or the
    images of the `calibration` folder).  FP16 and INT8 artifacts are evaluated on the test split
    (image AUROC against the run's own) unless evaluate=False.  For OpenVINO, `onnx` may name an
    ONNX export of the same run to convert instead of tracing the model again (a float export is
    traced again for INT8, whose graph differs: see trace).
    """
    from ..engine import find_checkpoint, load_checkpoint

    check_format(fmt, precision)
    started = time.perf_counter()
    checkpoint = find_checkpoint(run)
    run_dir = checkpoint.parent
    config, model, post = load_checkpoint(checkpoint, "cpu")
    target = _resolve_out(out, run_dir, fmt, precision)
    size = config.dataset.image_size

    if fmt == "torch":
        metadata = build_metadata(config, post, fmt, precision, None, run_dir, parity_tolerance(model), model.hparams)
        write_torch(target, config, model, post, metadata)
    else:
        int8 = precision == "int8"
        if onnx is not None and fmt == "openvino" and read_metadata(onnx).get("int8_graph", False) == int8:
            program, fixed_batch = None, _reusable_onnx(Path(onnx), post, batch_size)
        else:  # no ONNX given, or one traced for the other graph form: trace again
            program, fixed_batch = trace(model, post, size, batch_size, fmt, int8)
        metadata = build_metadata(config, post, fmt, precision, fixed_batch, run_dir, parity_tolerance(model),
                                  model.hparams)
        if fmt == "onnx":
            write_onnx(target, program, metadata, model)
        else:
            images = None
            if int8:
                images = (folder_tensors(calibration, size, calibration_size) if calibration is not None
                          else split_tensors(config, "train", calibration_size)[1])
                metadata["calibration"] = {"images": len(images),
                                           "source": str(calibration) if calibration else "training split"}
            batches = None if images is None else [_batch_of(images, i, fixed_batch) for i in range(len(images))]
            scope = int8_scopes(model) if int8 else []
            if int8:
                metadata["int8_scope"] = scope or ["everything"]
            with tempfile.TemporaryDirectory(prefix="anomalens-export-") as tmp:
                # OpenVINO converts from ONNX: the given export, or one written just for this.
                source = Path(onnx) if program is None else write_onnx(Path(tmp) / "model.onnx", program, metadata, model)
                write_openvino(target, source, metadata, precision, batches, scope)

    result = ExportResult(target, metadata)
    if evaluate if evaluate is not None else precision != "fp32":
        result.evaluation = evaluate_auroc(target, run_dir, config)
        metadata["evaluation"] = result.evaluation
        if fmt == "openvino":
            sidecar_path(target).write_text(json.dumps(metadata, indent=2))
    result.seconds = time.perf_counter() - started
    return result


def _reusable_onnx(path: Path, postprocessor: Any, batch_size: int | None) -> int | None:
    """Check that an ONNX file is an export of this run (same thresholds); return its batch size."""
    meta = read_metadata(path)
    same = all(meta.get(k) == float(getattr(postprocessor, k)) for k in ("image_threshold", "pixel_threshold",
                                                                         "image_scale", "pixel_scale"))
    if not same:
        raise ConfigError(f"'{path}' was not exported from this run (its thresholds differ); export the run again.")
    if batch_size is not None and meta.get("batch_size") != batch_size:
        raise ConfigError(f"'{path}' has batch size {meta.get('batch_size')}, not {batch_size}; export the run again.")
    return meta.get("batch_size")


def _batch_of(images: torch.Tensor, i: int, fixed_batch: int | None) -> np.ndarray:
    """Image i as a calibration input: (1, 3, S, S), or repeated to the graph's fixed batch."""
    x = images[i:i + 1]
    if fixed_batch is not None and fixed_batch > 1:
        x = x.expand(fixed_batch, -1, -1, -1)
    return np.ascontiguousarray(x.numpy())


def evaluate_auroc(artifact: str | Path, run_dir: Path, config: Any, batch_size: int = 8) -> dict[str, float]:
    """Image AUROC of an artifact on the run's test split, beside the run's own (engine) AUROC."""
    from ..metrics import auroc
    from .inferencer import Inferencer

    records, images = split_tensors(config, "test")
    labels = np.array([r.label for r in records])
    inferencer = Inferencer.load(artifact)
    scores = torch.cat([inferencer.predict(images[i:i + batch_size]).score
                        for i in range(0, len(images), batch_size)]).numpy()
    reference = engine_scores(run_dir)
    if reference is not None and all(r.path in reference for r in records):
        ref_scores = np.array([reference[r.path]["score"] for r in records])
    else:  # no record of the run's test: score it with the torch model
        torch_inferencer = Inferencer.load(run_dir)
        ref_scores = torch.cat([torch_inferencer.predict(images[i:i + batch_size]).score
                                for i in range(0, len(images), batch_size)]).numpy()
    ref, got = float(auroc(labels, ref_scores)), float(auroc(labels, scores))
    return {"reference_auroc": ref, "auroc": got, "auroc_drop": ref - got, "n_test": int(len(labels))}


# --------------------------------------------------------------------------- parity and validation
@dataclass
class Parity:
    """How an artifact's outputs compare with a reference's on the same images."""

    n_images: int
    max_abs_score_diff: float
    max_rel_score_diff: float
    max_abs_map_diff: float
    scores_within_tolerance: bool
    maps_within_tolerance: bool
    label_flips: int  # images whose decision differs
    label_flips_off_threshold: int  # ... of those, whose reference score is not within tolerance of the threshold
    mask_flips: int  # pixels whose decision differs
    mask_flips_off_threshold: int
    rtol: float = PARITY_RTOL
    atol: float = PARITY_ATOL

    @property
    def ok(self) -> bool:
        """The contract: values within tolerance, and decisions differ only on the threshold itself."""
        return (self.scores_within_tolerance and self.maps_within_tolerance
                and self.label_flips_off_threshold == 0 and self.mask_flips_off_threshold == 0)


def map_tolerance(maps: np.ndarray, rtol: float = PARITY_RTOL, atol: float = PARITY_ATOL) -> np.ndarray:
    """Per-image tolerance of (B, ...) maps, broadcastable to them: atol + rtol * the map's peak |value|."""
    peak = np.abs(maps).reshape(len(maps), -1).max(axis=1, initial=0.0)
    return (atol + rtol * peak).reshape(-1, *([1] * (maps.ndim - 1)))


def compare_outputs(reference: AnomalyOutput, other: AnomalyOutput, image_threshold: float, pixel_threshold: float,
                    rtol: float = PARITY_RTOL, atol: float = PARITY_ATOL) -> Parity:
    """Compare two runtimes' outputs on the same images under the parity contract."""
    rs, os_ = reference.score.double().numpy(), other.score.double().numpy()
    rm, om = reference.anomaly_map.double().numpy(), other.anomaly_map.double().numpy()
    score_diff, score_tol = np.abs(rs - os_), atol + rtol * np.abs(rs)
    map_diff, map_tol = np.abs(rm - om), map_tolerance(rm, rtol, atol)
    labels = reference.pred_label.numpy() != other.pred_label.numpy()
    masks = reference.pred_mask.numpy() != other.pred_mask.numpy()
    # A decision may flip only where the reference value lies within its tolerance of the threshold.
    return Parity(
        n_images=len(rs),
        max_abs_score_diff=float(score_diff.max(initial=0.0)),
        max_rel_score_diff=float((score_diff / np.maximum(np.abs(rs), 1e-30)).max(initial=0.0)),
        max_abs_map_diff=float(map_diff.max(initial=0.0)),
        scores_within_tolerance=bool(np.all(score_diff <= score_tol)),
        maps_within_tolerance=bool(np.all(map_diff <= map_tol)),
        label_flips=int(labels.sum()),
        label_flips_off_threshold=int((labels & (np.abs(rs - image_threshold) > score_tol)).sum()),
        mask_flips=int(masks.sum()),
        mask_flips_off_threshold=int((masks & (np.abs(rm - pixel_threshold) > map_tol)).sum()),
        rtol=rtol, atol=atol,
    )


def predict_all(inferencer: Any, images: torch.Tensor, batch_size: int = 8) -> AnomalyOutput:
    """One AnomalyOutput for all images, predicted `batch_size` at a time."""
    parts = [inferencer.predict(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return AnomalyOutput(*(torch.cat([getattr(p, k) for p in parts]) for k in
                           ("score", "anomaly_map", "norm_score", "norm_map", "pred_label", "pred_mask")))


def artifact_size(path: str | Path) -> int:
    """Bytes on disk: the file, plus OpenVINO's .bin and JSON sidecar."""
    path = Path(path)
    files = [path]
    if path.suffix.lower() == ".xml":
        files += [path.with_suffix(".bin"), sidecar_path(path)]
    elif path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.is_file())


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every few ms), in MiB."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_mb, self.start_mb = interval, 0.0, 0.0

    def __enter__(self) -> PeakMemory:
        import threading

        import psutil

        process = psutil.Process()
        self.start_mb = self.peak_mb = process.memory_info().rss / 2**20
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2**20)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 2, max_seconds: float = 30.0) -> np.ndarray:
    """Wall-clock seconds of `repeats` calls of fn (after `warmup` calls); stops early after max_seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    budget = time.perf_counter() + max_seconds
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > budget:
            break
    return np.array(times)


def measure_speed(inferencer: Any, images: torch.Tensor, batch_size: int = 8, repeats: int = 30,
                  max_seconds: float = 30.0) -> dict[str, float]:
    """Batch-1 latency (P50/P95 ms) and batch-N throughput (images/s) of inferencer.predict."""
    one = images[:1]
    latency = time_calls(lambda: inferencer.predict(one), repeats, max_seconds=max_seconds)
    batch = images[:batch_size]
    if len(batch) < batch_size:  # a tiny split: repeat images to fill the batch
        batch = batch.repeat((batch_size + len(batch) - 1) // len(batch), 1, 1, 1)[:batch_size]
    per_batch = time_calls(lambda: inferencer.predict(batch), max(3, repeats // batch_size), warmup=1,
                           max_seconds=max_seconds)
    return {"latency_p50_ms": float(np.percentile(latency, 50) * 1e3),
            "latency_p95_ms": float(np.percentile(latency, 95) * 1e3),
            "throughput_ips": float(batch_size / np.median(per_batch)), "throughput_batch": batch_size}


@dataclass
class Validation:
    """`validate`'s report: parity against the run's torch model and the engine, speed, memory, size."""

    artifact: Path
    metadata: dict[str, Any]
    parity: Parity
    engine_score_mismatches: int | None  # images whose score differs from scores.csv beyond tolerance
    engine_label_flips_off_threshold: int | None
    speed: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    added_memory_mb: float = 0.0
    size_mb: float = 0.0
    auroc: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        engine_ok = not self.engine_score_mismatches and not self.engine_label_flips_off_threshold
        return self.parity.ok and engine_ok


def validate(artifact: str | Path, run: str | Path, runtime: str | None = None, batch_size: int = 8,
             repeats: int = 30, limit: int | None = None, max_seconds: float = 30.0) -> Validation:
    """Check an artifact against its run: parity with the torch model and with the engine's test scores
    on the run's test split, then batch-1 latency, throughput, peak memory and size on disk.

    FP16 and INT8 artifacts are not expected to meet the FP32 parity contract; for them read the
    reported AUROC change instead.
    """
    from ..engine import load_checkpoint
    from ..metrics import auroc
    from .inferencer import Inferencer

    run_dir = run_dir_of(run)
    config, _, post = load_checkpoint(run, "cpu")
    records, images = split_tensors(config, "test", limit)
    reference = predict_all(Inferencer.load(run, device="cpu"), images, batch_size)
    with PeakMemory() as memory:
        inferencer = Inferencer.load(artifact, device="cpu", runtime=runtime)
        got = predict_all(inferencer, images, batch_size)
        speed = measure_speed(inferencer, images, batch_size, repeats, max_seconds)
    rtol, atol = parity_tolerance(inferencer.metadata)
    parity = compare_outputs(reference, got, float(post.image_threshold), float(post.pixel_threshold), rtol, atol)

    mismatches = flips = None
    engine = engine_scores(run_dir)
    if engine is not None and all(r.path in engine for r in records):
        ref = np.array([engine[r.path]["score"] for r in records])
        scores = got.score.double().numpy()
        # scores.csv keeps 6 significant digits: 5e-6 relative rounding on top of the contract.
        tol = atol + (rtol + 5e-6) * np.abs(ref)
        mismatches = int((np.abs(scores - ref) > tol).sum())
        pred = np.array([engine[r.path]["pred_label"] for r in records])
        near = np.abs(ref - float(post.image_threshold)) <= tol
        flips = int(((got.pred_label.numpy().astype(int) != pred) & ~near).sum())
    labels = np.array([r.label for r in records])
    aurocs = {"reference_auroc": float(auroc(labels, reference.score.numpy())),
              "auroc": float(auroc(labels, got.score.numpy()))}
    aurocs["auroc_drop"] = aurocs["reference_auroc"] - aurocs["auroc"]
    return Validation(Path(artifact), inferencer.metadata, parity, mismatches, flips, speed, memory.peak_mb,
                      memory.peak_mb - memory.start_mb, artifact_size(artifact) / 2**20, aurocs)


__all__ = [
    "FORMATS", "PRECISIONS", "OUTPUT_NAMES", "PARITY_RTOL", "PARITY_ATOL", "parity_tolerance", "InferenceGraph", "ExportResult", "Parity",
    "Validation", "export", "validate", "compare_outputs", "read_metadata", "build_metadata", "trace",
    "default_artifact_path", "disable_openvino_telemetry", "measure_speed", "predict_all", "artifact_size",
]
