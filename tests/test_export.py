"""Export and the parity contract: torch, ONNX Runtime and OpenVINO FP32 reach the same decisions.

Every exportable registered model (tag `exportable`, default true) is trained on tiny demo data,
exported once to ONNX and converted to OpenVINO from that file; the three runtimes are compared
with each other and with the engine's own test decisions (scores.csv), independently of the
library's `compare_outputs`.
"""
import csv
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from anomalens import create_model  # noqa: E402
from anomalens.config import config_from_dict  # noqa: E402
from anomalens.deploy.export import (  # noqa: E402
    PARITY_ATOL,
    PARITY_RTOL,
    InferenceGraph,
    compare_outputs,
    export,
    predict_all,
    read_metadata,
    sidecar_path,
    split_tensors,
    trace,
    write_onnx,
    write_openvino,
)
from anomalens.deploy.inferencer import Inferencer  # noqa: E402
from anomalens.engine import Engine, load_checkpoint  # noqa: E402
from anomalens.errors import AnomalensError, ConfigError  # noqa: E402
from anomalens.metrics import auroc  # noqa: E402
from anomalens.models.base import AnomalyModel, AnomalyOutput  # noqa: E402
from anomalens.postprocess import PostProcessor  # noqa: E402
from anomalens.registry import get_model_class, list_models  # noqa: E402

EXPORTABLE = [name for name in list_models() if get_model_class(name).tags.get("exportable", True)]


def tiny_run(root, project, model):
    """A real engine run at 64 px; a model's tags say how to keep it small (as in the common suite)."""
    cls = get_model_class(model)
    params = {"weights": "none"} if "weights" in cls.constraints else {}
    config = config_from_dict({
        "model": {"name": model, **params, **cls.tags.get("test_params", {})},
        "dataset": {"format": "mvtec", "root": str(root), "category": "brick", "image_size": 64, "batch_size": 8},
        "visualization": {"save_images": False},
        "trainer": {"progress": False, "device": "cpu", **cls.tags.get("test_training", {})},
        "project": {"root": str(project)},
    })
    return Engine(config).run()


class Exports:
    """Per model, on first use: a tiny run, its ONNX export, and OpenVINO FP32 converted from that file.

    A failure is kept too, so a model that cannot export fails each of its tests without retrying.
    """

    def __init__(self, root, project):
        self.root, self.project, self.cache = root, project, {}

    def __getitem__(self, name):
        if name not in self.cache:
            try:
                run = tiny_run(self.root, self.project, name)
                onnx_path = export(run, "onnx").path
                self.cache[name] = (run, onnx_path, export(run, "openvino", "fp32", onnx=onnx_path).path)
            except Exception as exc:  # noqa: BLE001 - re-raised by every test of this model
                self.cache[name] = exc
        if isinstance(self.cache[name], Exception):
            raise self.cache[name]
        return self.cache[name]


@pytest.fixture(scope="module")
def exported(tiny_demo_root, tmp_path_factory):
    return Exports(tiny_demo_root, tmp_path_factory.mktemp("export"))


# The fast tests use one model; the contract over every registered model is marked slow (one
# export costs ~5-20 s of CPU per model), run by `make test`, skipped by `make test-fast`.
FAST = "patchcore"
EVERY_MODEL = [pytest.param(name, marks=pytest.mark.slow) for name in EXPORTABLE]


def _outputs(artifact, images, runtime=None):
    return predict_all(Inferencer.load(artifact, device="cpu", runtime=runtime), images, batch_size=4)


def check_parity_contract(run, onnx_path, xml_path):
    """torch vs ONNX Runtime vs OpenVINO FP32 on the run's test split, and vs the engine's scores.csv."""
    config, _, post = load_checkpoint(run)
    records, images = split_tensors(config, "test")
    t_img, t_pix = float(post.image_threshold), float(post.pixel_threshold)
    reference = _outputs(run, images)
    with open(run / "scores.csv", newline="") as fh:
        engine = {row["path"]: row for row in csv.DictReader(fh)}
    # The contract's bounds: the defaults, unless the model's tags declare others (they travel in the metadata).
    tags = get_model_class(config.model_name).tags
    rtol, atol = tags.get("parity_rtol", PARITY_RTOL), tags.get("parity_atol", PARITY_ATOL)
    assert read_metadata(onnx_path)["parity"]["rtol"] == rtol and read_metadata(xml_path)["parity"]["atol"] == atol
    for artifact, runtime in [(onnx_path, None), (xml_path, None), (onnx_path, "openvino")]:
        got = _outputs(artifact, images, runtime)
        # Scores and maps: |a - b| <= atol + rtol |a|, checked here without the library's helper.
        ref_score, ref_map = reference.score.double().numpy(), reference.anomaly_map.double().numpy()
        score_tol = atol + rtol * np.abs(ref_score)
        assert (np.abs(got.score.numpy() - ref_score) <= score_tol).all()
        # Maps: the relative part is taken against each map's peak.
        map_tol = atol + rtol * np.abs(ref_map).max(axis=(1, 2, 3), keepdims=True)
        excess = np.abs(got.anomaly_map.numpy() - ref_map) - map_tol
        worst = np.unravel_index(excess.argmax(), excess.shape)
        assert excess.max() <= 0, (f"{artifact.name} ({runtime}): map differs by {excess.max() + map_tol[worst[0]].item():.3g} "
                                   f"at {worst} (value {ref_map[worst]:.4g}, tolerance {map_tol[worst[0]].item():.3g})")
        np.testing.assert_allclose(got.norm_score.numpy(), reference.norm_score.numpy(), atol=1e-5)
        # Decisions: identical, except where the reference value sits on the threshold within tolerance.
        near_img = np.abs(ref_score - t_img) <= score_tol
        assert not ((got.pred_label != reference.pred_label).numpy() & ~near_img).any()
        near_pix = np.abs(ref_map - t_pix) <= map_tol
        off = (got.pred_mask != reference.pred_mask).numpy() & ~near_pix
        assert off.sum() == 0, f"{off.sum()} mask pixels differ away from the threshold"
        assert compare_outputs(reference, got, t_img, t_pix, rtol, atol).ok
        # The engine's own test decisions (scores.csv keeps 6 significant digits).
        for i, record in enumerate(records):
            row = engine[record.path]
            assert float(got.score[i]) == pytest.approx(float(row["score"]), rel=rtol + 5e-6, abs=atol)
            assert int(got.pred_label[i]) == int(row["pred_label"])


def check_metadata(run, onnx_path, xml_path, name):
    import onnx

    config, model, post = load_checkpoint(run)
    for artifact in (onnx_path, xml_path):
        meta = read_metadata(artifact)
        assert meta["model"] == name and meta["input_size"] == [64, 64]
        # Every parameter the model ran with, defaults resolved, and the weights it was trained from.
        expected = dict(model.hparams)
        if "weights" in expected:  # loading swapped them for the checkpoint's own
            expected["weights"] = config.model_params.get("weights", "imagenet")
        assert meta["model_params"] == expected
        assert meta["image_threshold"] == float(post.image_threshold)
        assert meta["pixel_threshold"] == float(post.pixel_threshold)
        assert meta["image_scale"] == float(post.image_scale) and meta["pixel_scale"] == float(post.pixel_scale)
        assert meta["anomalens_version"] and meta["precision"] == "fp32" and meta["inference_precision"] == "f32"
        assert meta["config"] == config.to_dict()
    assert read_metadata(onnx_path)["format"] == "onnx" and read_metadata(xml_path)["format"] == "openvino"
    assert sidecar_path(xml_path).is_file() and xml_path.with_suffix(".bin").is_file()
    # A graph torch.export could not keep batch-dynamic is traced at batch 1, and says so.
    meta = read_metadata(onnx_path)
    dim = onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert bool(dim.dim_param) if meta["batch_size"] is None else dim.dim_value == meta["batch_size"] == 1


@pytest.mark.parametrize("name", EVERY_MODEL)
def test_every_exportable_model_keeps_its_decisions_on_every_runtime(exported, name):
    run, onnx_path, xml_path = exported[name]
    check_parity_contract(run, onnx_path, xml_path)
    check_metadata(run, onnx_path, xml_path, name)


def test_parity_contract(exported):
    check_parity_contract(*exported[FAST])


def test_metadata_travels_with_the_artifact(exported):
    check_metadata(*exported[FAST], FAST)


def test_openvino_post_processes_the_maps_flat(exported):
    """The maps' normalisation and threshold run on (B, H*W): on (B, 1, H, W) OpenVINO lays a map out
    channels-last, its single channel innermost, and those element-wise ops took 17 % of PaDiM's time."""
    import openvino as ov

    _, _, xml_path = exported[FAST]
    graph = ov.Core().read_model(str(xml_path))
    decisions = [op for op in graph.get_ordered_ops() if op.get_type_name() in ("Select", "GreaterEqual")]
    assert decisions and all(op.get_output_partial_shape(0).rank.get_length() <= 2 for op in decisions)
    # The outputs keep their (B, 1, H, W) shape.
    shapes = {out.get_any_name(): out.get_partial_shape() for out in graph.outputs}
    assert shapes["norm_map"] == shapes["pred_mask"] == shapes["anomaly_map"]
    assert shapes["anomaly_map"].rank.get_length() == 4


def test_int8_and_fp16_report_their_auroc_against_the_run(exported):
    run, onnx_path, xml_path = exported[FAST]
    result = export(run, "openvino", "int8", onnx=onnx_path)
    ev = result.evaluation
    # The reference is the engine's own test AUROC, recomputed here from scores.csv.
    with open(run / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    expected = auroc(np.array([int(r["label"]) for r in rows]), np.array([float(r["score"]) for r in rows]))
    assert ev["reference_auroc"] == pytest.approx(expected)
    assert ev["auroc_drop"] == pytest.approx(ev["reference_auroc"] - ev["auroc"])
    meta = read_metadata(result.path)
    assert meta["precision"] == "int8" and meta["evaluation"] == ev and meta["int8_scope"] == ["model.patch_search"]
    assert meta["inference_precision"] == "bf16"  # what stays float: bfloat16 where the CPU has it
    # Only PatchCore's ranking product is 8-bit: every quantiser feeds a matrix product, none the
    # float32 recomputation of the chosen distances that shares its input.
    import openvino as ov

    graph = ov.Core().read_model(str(result.path))
    quantisers = [op for op in graph.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    fed = {t.get_node().get_type_name() for q in quantisers for t in q.output(0).get_target_inputs()}
    assert quantisers and fed == {"MatMul"}
    assert meta["calibration"]["images"] == 8  # the tiny run's training split
    # The int8 model's own AUROC, recomputed independently.
    config, _, _ = load_checkpoint(run)
    records, images = split_tensors(config, "test")
    scores = _outputs(result.path, images).score.numpy()
    assert ev["auroc"] == pytest.approx(auroc(np.array([r.label for r in records]), scores))
    # An 8-bit ranking can only pick a near-equal neighbour, whose distance is then recomputed in
    # float (bfloat16 where the CPU has it, ~0.4 % per value): maps and scores stay that close.
    int8, fp32 = _outputs(result.path, images), _outputs(xml_path, images)
    assert ((int8.anomaly_map - fp32.anomaly_map).abs() <= 0.03 * fp32.anomaly_map.max()).all()
    assert np.median(np.abs(scores / fp32.score.numpy() - 1)) < 0.02

    bf16 = export(run, "openvino", "bf16", onnx=onnx_path, evaluate=False).path
    assert read_metadata(bf16)["inference_precision"] == "bf16"  # the compute precision the runtime sets
    fp16 = export(run, "openvino", "fp16", onnx=onnx_path, evaluate=False).path
    assert read_metadata(fp16)["inference_precision"] == "f32"
    fp32_bytes, fp16_bytes = xml_path.with_suffix(".bin").stat().st_size, fp16.with_suffix(".bin").stat().st_size
    assert 0.4 < fp16_bytes / fp32_bytes < 0.6  # weights stored in half precision


def test_int8_of_a_backbone_keeps_depthwise_and_narrow_convolutions_float_and_the_rest_bf16(exported):
    """Quantised depthwise convolutions moved PaDiM's scores by up to 25 % (float: 5 %), and ones with
    fewer than 64 input channels ran slower at 8 bits than in bf16; what stays float in a
    backbone-wide INT8 runs in bf16 where the CPU has it."""
    import openvino as ov

    run, onnx_path, _ = exported["padim"]
    result = export(run, "openvino", "int8", onnx=onnx_path, evaluate=False)
    meta = read_metadata(result.path)
    assert meta["int8_scope"] == ["model.backbone"] and meta["inference_precision"] == "bf16"
    graph = ov.Core().read_model(str(result.path))
    fed = [t.get_node().get_type_name() for op in graph.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
           for t in op.output(0).get_target_inputs()]
    assert "Convolution" in fed and "GroupConvolution" not in fed
    assert any(op.get_type_name() == "GroupConvolution" for op in graph.get_ordered_ops())  # still depthwise
    quantised = {}  # convolution -> (8-bit?, input channels)
    for op in graph.get_ordered_ops():
        if op.get_type_name() == "Convolution":
            sources = [op.input(i).get_source_output().get_node().get_type_name() for i in range(2)]
            quantised[op.get_friendly_name()] = ("FakeQuantize" in sources, op.input(1).get_partial_shape()[1].get_length())
    assert {channels >= 64 for is_8bit, channels in quantised.values() if is_8bit} == {True}
    assert any(not is_8bit and channels < 64 for is_8bit, channels in quantised.values())


def test_export_opens_no_outside_connection(exported, monkeypatch, tmp_path):
    """OpenVINO's converter would send usage events, each from a forked process (a socket guard in
    this process alone would miss them), after writing a client id under $HOME/intel."""
    import multiprocessing

    run, onnx_path, _ = exported[FAST]
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(multiprocessing.Process, "start", refuse)
    export(run, "openvino", "fp32", out=tmp_path / "offline", onnx=onnx_path)
    assert attempts == []
    assert list((tmp_path / "home").iterdir()) == []  # no telemetry client id or usage counter


@pytest.mark.parametrize("fmt, precision, message", [
    ("onnx", "int8", "Precision 'int8' is not available for the onnx format (it exports fp32); use --format openvino "
                     "for fp16, bf16 or int8."),
    ("tflite", "fp32", "The 'format' parameter of export must be one of 'torch', 'onnx', 'openvino'. Got 'tflite' "
                       "instead."),
])
def test_unsupported_format_or_precision_is_one_clear_line(exported, fmt, precision, message):
    run = exported[FAST][0]
    with pytest.raises(ConfigError) as err:
        export(run, fmt, precision)
    assert str(err.value) == message


class _Branchy(AnomalyModel):
    """Not registered: its forward branches on a tensor's value, which no static graph can hold."""

    name = "branchy"

    def forward(self, images):
        score = images.mean(dim=(1, 2, 3))
        if float(score.max()) > 0.5:  # data-dependent Python control flow
            score = score * 2
        return AnomalyOutput(score=score, anomaly_map=images[:, :1])


def test_a_model_that_cannot_export_names_the_line_that_blocks_it(exported):
    _, _, post = load_checkpoint(exported[FAST][0])
    with pytest.raises(AnomalensError) as err:
        trace(_Branchy(), post, 32)
    text = str(err.value)
    assert text.startswith("Cannot export _Branchy to onnx: test_export.py line ")
    assert "in forward: `if float(score.max()) > 0.5:" in text and "\n" not in text

    class Declared(_Branchy):
        tags = {"exportable": False, "export_blocker": "its k-d tree search runs in Python"}

    with pytest.raises(AnomalensError, match=r"^Cannot export Declared to openvino: its k-d tree search runs in "
                                             r"Python\. Use --format torch\.$"):
        trace(Declared(), post, 32, fmt="openvino")


class _Shrinking(AnomalyModel):
    """Not registered: an antialiased downscale inside forward, which OpenVINO computes differently."""

    name = "shrinking"

    def forward(self, images):
        small = F.interpolate(images, scale_factor=0.5, mode="bilinear", antialias=True)
        anomaly_map = F.interpolate(small.mean(1, keepdim=True), size=images.shape[-2:], mode="bilinear")
        return AnomalyOutput(score=anomaly_map.amax(dim=(1, 2, 3)), anomaly_map=anomaly_map)


def test_openvino_export_refuses_an_antialiased_resize_and_names_its_line(exported, tmp_path):
    import onnxruntime as ort

    _, _, post = load_checkpoint(exported[FAST][0])
    model = _Shrinking()
    program, _ = trace(model, post, 32)
    onnx_path = write_onnx(tmp_path / "m.onnx", program, {"model": "_Shrinking"}, model)
    # ONNX Runtime's antialiased Resize matches torch ...
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[1], model(x).anomaly_map.numpy(), atol=1e-5)
    # ... OpenVINO's does not: the export says where the resize comes from.
    with pytest.raises(AnomalensError) as err:
        write_openvino(tmp_path / "m.xml", onnx_path, {"model": "_Shrinking"}, "fp32")
    assert str(err.value).startswith("Cannot export _Shrinking to openvino: test_export.py line ")
    assert "in forward: `small = F.interpolate(images, scale_factor=0.5" in str(err.value)
    assert not (tmp_path / "m.xml").exists()


def test_torch_artifact_is_a_checkpoint_with_metadata(exported, tmp_path):
    run = exported[FAST][0]
    path = export(run, "torch", out=tmp_path).path
    assert path == tmp_path / "model.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["metadata"]["format"] == "torch" and payload["metadata"]["batch_size"] is None
    config, model, post = load_checkpoint(path)  # the engine can read it back
    assert float(post.image_threshold) == payload["metadata"]["image_threshold"]


def test_export_and_validate_commands(exported, tmp_path, capsys):
    from anomalens.cli import main

    run, onnx_path, xml_path = exported[FAST]
    assert main(["export", "--run", str(run), "--format", "torch", "--out", str(tmp_path / "t.pt")]) == 0
    assert (tmp_path / "t.pt").is_file() and "Exported" in capsys.readouterr().out
    assert main(["validate", str(xml_path), "--run", str(run), "--repeats", "3", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "Parity: OK" in out and "Latency, batch 1" in out and "Size on disk" in out
    assert main(["export", "--run", str(run), "--format", "onnx", "--precision", "int8"]) == 2
    assert capsys.readouterr().err.startswith("error: Precision 'int8' is not available for the onnx format")
    int8 = tmp_path / "int8" / "model.xml"
    assert main(["export", "--run", str(run), "--format", "openvino", "--precision", "int8", "--onnx", str(onnx_path),
                 "--out", str(int8)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert ("8-bit: the convolutions (except depthwise ones and those under 64 input channels) and matrix "
            "products of model.patch_search "
            "(calibrated on 8 images); the rest is bfloat16 on CPUs with AMX / AVX512-BF16, else float32.") in out
    assert "Image AUROC on the test split" in out


def test_export_in_a_fresh_process(exported, tmp_path):
    """`anomalens export` as a user runs it: a new process that never ran the model eagerly, so nothing
    computed by an earlier forward (cached blur matrices, say) can hide an untraceable line."""
    import subprocess
    import sys

    run = exported[FAST][0]
    code = "import sys; from anomalens.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "export", "--run", str(run), "--format", "onnx",
                           "--out", str(tmp_path / "m.onnx")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "m.onnx").is_file()


def test_float_graphs_fold_the_bank_norms_into_the_product_and_int8_keeps_them_apart(exported):
    """PatchCore's ranking product: one matrix product with the norms as a column for float runtimes,
    product plus bias for INT8 (which fuses it); both forms give the eager model's outputs."""
    run = exported[FAST][0]
    _, model, post = load_checkpoint(run)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = model(images)
    for int8, addmm in ((False, 0), (True, 2)):  # INT8: the patch search and the image score's search
        program, _ = trace(model, post, 64, batch_size=2, int8=int8)
        ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert ops.count("aten.addmm.default") == addmm
        score, anomaly_map = program.module()(images)[:2]
        torch.testing.assert_close(score, reference.score, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(anomaly_map, reference.anomaly_map, rtol=1e-4, atol=1e-4)


def test_padim_exports_with_a_dynamic_batch():
    """Nothing in PaDiM's graph depends on the batch size, so its artifacts take any batch.  A len()
    of the batch anywhere in the forward (the backbone's CPU steps once had one) makes torch.export
    fix it, and the batch-1 graph ran PaDiM's OpenVINO FP32 at 35 instead of 60 images/s."""
    model = create_model("padim", weights="none").fit([torch.rand(4, 3, 64, 64)]).eval()
    _, batch = trace(model, PostProcessor(), 64)
    assert batch is None


def test_a_fixed_batch_export_runs_the_backbone_in_steps_with_the_same_outputs(monkeypatch):
    """At a fixed batch the backbone's CPU steps unroll into the graph (two 256 px images each,
    whatever the exporting machine's threads), and the graph still computes the eager outputs."""
    model = create_model("padim", weights="none").fit([torch.rand(2, 3, 256, 256)]).eval()
    post = PostProcessor()
    images = torch.rand(4, 3, 256, 256, generator=torch.Generator().manual_seed(2))

    def stems(program):
        return sum(1 for n in program.graph.nodes if n.op == "call_function" and "conv" in str(n.target)
                   and any("conv_stem" in str(a) for a in n.args))

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # eager would step 8 images at once
    dynamic, batch = trace(model, post, 256)
    fixed, _ = trace(model, post, 256, batch_size=4)
    assert batch is None and stems(dynamic) == 1 and stems(fixed) == 2
    reference = InferenceGraph(model, post).eval()(images)
    for got, want in zip(fixed.module()(images), reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)  # unfitted post-processor
