"""PostProcessor: thresholds, normalisation, checkpoint round trip and traceability."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import precision_recall_curve, roc_auc_score

from anomalens.errors import ConfigError, DataError
from anomalens.metrics import auroc
from anomalens.models.base import AnomalyOutput
from anomalens.postprocess import PostProcessor, false_alarm_threshold

SIZE = 8


def _split(seed: int = 0, n_good: int = 200, n_bad: int = 50, masks: bool = True):
    """Heavy-tailed raw scores (good outliers, far-out defects) and small maps with defect blobs."""
    rng = np.random.default_rng(seed)
    good = 5.0 + rng.standard_t(2, n_good)
    bad = 9.0 + 3.0 * np.abs(rng.standard_cauchy(n_bad))
    scores = np.concatenate([good, bad]).astype(np.float32)
    labels = np.r_[np.zeros(n_good, int), np.ones(n_bad, int)]
    gt = np.zeros((n_good + n_bad, 1, SIZE, SIZE), dtype=np.float32)
    gt[n_good:, :, 2:5, 3:6] = 1.0
    maps = (rng.gamma(2.0, 0.5, gt.shape) + 2.0 * gt * rng.random(gt.shape)).astype(np.float32)
    has_mask = np.r_[np.zeros(n_good, bool), np.full(n_bad, masks)]
    return scores, labels, maps, gt if masks else np.zeros_like(gt), has_mask


def _run(pp: PostProcessor, scores, maps) -> AnomalyOutput:
    return pp(AnomalyOutput(torch.as_tensor(scores), torch.as_tensor(maps)))


def test_normalisation_keeps_auroc_exactly_and_puts_threshold_at_half():
    scores, labels, maps, masks, has_mask = _split(3)  # a seed where float32 logistic ties would change AUROC
    pp = PostProcessor().fit(scores, labels, maps, masks, has_mask)
    out = _run(pp, scores, maps)
    assert auroc(labels, out.norm_score) == auroc(labels, scores)
    assert roc_auc_score(labels, out.norm_score) == roc_auc_score(labels, scores)
    assert auroc(masks.ravel(), out.norm_map.ravel()) == auroc(masks.ravel(), maps.ravel())
    # Strictly increasing in float32, even for outliers hundreds of scales above the threshold
    # (the logistic would round all of these to 1.0).
    t, s = pp.image_threshold.item(), pp.image_scale.item()
    far = torch.tensor(t + s * np.geomspace(1, 500, 400), dtype=torch.float32).unique()
    normed = _run(pp, far, torch.zeros(len(far), 1, 1, 1)).norm_score
    assert bool((normed.diff() > 0).all())
    assert normed.max() < 1.0
    # Threshold -> exactly 0.5, and norm >= 0.5 exactly when the decision is "defective".
    edge = torch.tensor([t, np.nextafter(np.float32(t), np.float32(-np.inf)), np.nextafter(np.float32(t), np.float32(np.inf))],
                        dtype=torch.float32)
    res = _run(pp, edge, edge.view(3, 1, 1, 1) * 0 + pp.pixel_threshold)
    assert res.norm_score[0] == 0.5 and res.norm_score[1] < 0.5 < res.norm_score[2]
    assert res.pred_label.tolist() == [True, False, True]
    assert bool((res.norm_map == 0.5).all()) and bool(res.pred_mask.all())
    assert torch.equal(out.pred_label, out.norm_score >= 0.5) and torch.equal(out.pred_mask, out.norm_map >= 0.5)
    # Median good value -> about 0.1, for scores and for map pixels.
    assert out.norm_score[labels == 0].median().item() == pytest.approx(0.1, abs=0.01)
    assert out.norm_map[labels == 0].median().item() == pytest.approx(0.1, abs=0.01)


def test_forward_returns_new_output_with_raw_values_untouched():
    scores, labels, maps, masks, has_mask = _split()
    pp = PostProcessor().fit(scores, labels, maps, masks, has_mask)
    raw = AnomalyOutput(torch.from_numpy(scores), torch.from_numpy(maps))
    out = pp(raw)
    assert out is not raw and raw.norm_score is None
    assert out.score is raw.score and out.anomaly_map is raw.anomaly_map
    assert out.norm_score.dtype == out.norm_map.dtype == torch.float32
    assert out.pred_label.dtype == out.pred_mask.dtype == torch.bool
    assert out.norm_map.shape == out.pred_mask.shape == maps.shape
    assert torch.equal(out.pred_label, raw.score >= pp.image_threshold)


def _sklearn_f1_threshold(labels, scores):
    p, r, t = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * p * r / (p + r))[:-1]
    return t[int(np.argmax(f1))]


def test_f1_thresholds_match_sklearn():
    scores, labels, maps, masks, has_mask = _split(1)
    pp = PostProcessor().fit(scores, labels, maps, masks, has_mask, method="f1")
    assert (pp.image_method, pp.pixel_method) == ("f1", "f1")
    assert pp.image_threshold.item() == _sklearn_f1_threshold(labels, scores)
    pixel_labels = masks.ravel()  # good images have all-zero masks, defective ones full masks
    assert pp.pixel_threshold.item() == _sklearn_f1_threshold(pixel_labels, maps.ravel())


def test_false_alarm_rate_threshold_rejects_about_rate_of_new_good_parts():
    rng = np.random.default_rng(2)
    rate = 0.01
    # Averaged over many validation sets, the false-alarm rate on new good parts is the target:
    # unbiased, not ~1/n too high as np.quantile's default would be (about 1.5 % at n = 200).
    for n in (20, 200):
        fars = [norm.sf(false_alarm_threshold(rng.normal(size=n), rate)) for _ in range(400)]
        assert 0.7 * rate < np.mean(fars) <= 1.05 * rate, n
    # Through fit: a large heavy-tailed good sample from the validation distribution.
    val = rng.lognormal(0.0, 1.0, 3000)
    fresh = rng.lognormal(0.0, 1.0, 200_000)
    maps = np.zeros((3000, 1, 2, 2), dtype=np.float32)
    maps[:, 0, 0, 0] = val  # one pixel per map carries the score, so pixel maxima follow it too
    pp = PostProcessor().fit(val.astype(np.float32), np.zeros(3000, int), maps, method="false_alarm_rate",
                             false_alarm_rate=rate)
    assert (pp.image_method, pp.pixel_method) == ("false_alarm_rate", "false_alarm_rate")
    rejected = np.mean(fresh.astype(np.float32) >= pp.image_threshold.item())
    assert 0.7 * rate <= rejected <= 1.15 * rate
    assert pp.pixel_threshold.item() == pp.image_threshold.item()  # (1 - rate) quantile of per-image maxima


def test_false_alarm_rate_with_few_images_does_not_undershoot():
    rng = np.random.default_rng(3)
    for _ in range(20):
        good = rng.normal(size=20)
        t = false_alarm_threshold(good, 0.01)
        assert t >= np.quantile(good, 0.99) and t >= good.max()
    # Tied (quantised) scores: stepping above the tie instead of rejecting every tied part.
    tied = np.r_[np.zeros(500), np.ones(500)]
    t = false_alarm_threshold(tied, 0.01)
    assert np.mean(tied >= t) <= 0.01 and t == np.nextafter(np.float32(1), np.float32(2))


def test_manual_and_auto():
    scores, labels, maps, masks, has_mask = _split(4)
    pp = PostProcessor().fit(scores, labels, maps, masks, has_mask, method="manual", manual_threshold=7.25,
                             manual_pixel_threshold=1.5)
    assert (pp.image_threshold.item(), pp.pixel_threshold.item()) == (7.25, 1.5)
    assert (pp.image_method, pp.pixel_method) == ("manual", "manual")
    # auto: defects in validation -> F1; good images only -> false-alarm rate.
    auto = PostProcessor().fit(scores, labels, maps, masks, has_mask)
    f1 = PostProcessor().fit(scores, labels, maps, masks, has_mask, method="f1")
    assert auto.image_method == "f1" and torch.equal(auto.image_threshold, f1.image_threshold)
    good = labels == 0
    auto_good = PostProcessor().fit(scores[good], labels[good], maps[good], masks[good], has_mask[good])
    assert (auto_good.image_method, auto_good.pixel_method) == ("false_alarm_rate", "false_alarm_rate")
    assert auto_good.image_threshold.item() == false_alarm_threshold(scores[good], 0.01)
    # Defects without masks: the image threshold is F1, the pixel threshold falls back to good images.
    no_masks = PostProcessor().fit(*_split(4, masks=False))
    assert (no_masks.image_method, no_masks.pixel_method) == ("f1", "false_alarm_rate")


def test_fit_errors_are_one_actionable_line():
    scores, labels, maps, masks, has_mask = _split(5)
    pp = PostProcessor()
    with pytest.raises(ConfigError, match=r"^The 'method' parameter of PostProcessor must be one of 'auto', 'f1', "
                                          r"'false_alarm_rate', 'manual'. Got 'otsu' instead.$"):
        pp.fit(scores, labels, maps, method="otsu")
    with pytest.raises(ConfigError, match=r"^The 'false_alarm_rate' parameter of PostProcessor must be a float in "
                                          r"\(0, 1\). Got 0 instead.$"):
        pp.fit(scores, labels, maps, false_alarm_rate=0)
    with pytest.raises(ConfigError, match="^method='manual' needs manual_threshold"):
        pp.fit(scores, labels, maps, method="manual")
    good = labels == 0
    with pytest.raises(ConfigError, match="^method='f1' needs defective images in the validation split"):
        pp.fit(scores[good], labels[good], maps[good], method="f1")
    with pytest.raises(DataError, match="^The validation split has no good images"):
        pp.fit(scores[~good], labels[~good], maps[~good])
    with pytest.raises(DataError, match="^The validation scores or maps contain NaN"):
        pp.fit(np.r_[scores[:-1], np.nan], labels, maps)
    assert not pp.is_fitted and pp.image_method == "unfitted"


def test_state_dict_round_trip_gives_identical_outputs():
    scores, labels, maps, masks, has_mask = _split(6)
    pp = PostProcessor().fit(scores, labels, maps, masks, has_mask, method="false_alarm_rate")
    buffer = io.BytesIO()
    torch.save(pp.state_dict(), buffer)
    buffer.seek(0)
    fresh = PostProcessor()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert (fresh.image_method, fresh.pixel_method, fresh.is_fitted) == ("false_alarm_rate", "false_alarm_rate", True)
    assert fresh.method == "false_alarm_rate"
    a, b = _run(pp, scores, maps), _run(fresh, scores, maps)
    for field in ("norm_score", "norm_map", "pred_label", "pred_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


class _Tupled(torch.nn.Module):
    """What an export wrapper does: tensors in, the filled AnomalyOutput's fields out."""

    def __init__(self, pp: PostProcessor):
        super().__init__()
        self.pp = pp

    def forward(self, score, anomaly_map):
        out = self.pp(AnomalyOutput(score, anomaly_map))
        return out.norm_score, out.norm_map, out.pred_label, out.pred_mask


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")
def test_forward_traces_to_the_same_results():
    scores, labels, maps, masks, has_mask = _split(7)
    module = _Tupled(PostProcessor().fit(scores, labels, maps, masks, has_mask)).eval()
    s, m = torch.from_numpy(scores), torch.from_numpy(maps)
    traced = torch.jit.trace(module, (s[:4], m[:4]))  # traced on 4 images, run on all 250
    for eager, graph in zip(module(s, m), traced(s, m), strict=True):
        assert torch.equal(eager, graph)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("dynamo", [False, True])
def test_forward_exports_to_onnx(dynamo, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    scores, labels, maps, masks, has_mask = _split(8)
    module = _Tupled(PostProcessor().fit(scores, labels, maps, masks, has_mask)).eval()
    s, m = torch.from_numpy(scores), torch.from_numpy(maps)
    path = str(tmp_path / "post.onnx")
    if dynamo:
        batch = torch.export.Dim("batch")
        torch.onnx.export(module, (s[:4], m[:4]), path, dynamo=True, dynamic_shapes=({0: batch}, {0: batch}))
    else:
        torch.onnx.export(module, (s[:4], m[:4]), path, input_names=["score", "anomaly_map"], dynamo=False,
                          dynamic_axes={"score": {0: "batch"}, "anomaly_map": {0: "batch"}})
    session = ort.InferenceSession(path)
    names = [i.name for i in session.get_inputs()]
    onnx_out = session.run(None, dict(zip(names, (scores, maps), strict=True)))
    for eager, graph in zip(module(s, m), onnx_out, strict=True):  # bit-identical decisions and values
        assert np.array_equal(eager.numpy(), graph)
