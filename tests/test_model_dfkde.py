"""DFKDE: the KDE against scipy.stats.gaussian_kde, and the whole model against an independent
scikit-learn PCA + scipy KDE pipeline, including the leave-one-position-out map."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import gaussian_kde
from sklearn.decomposition import PCA as SklearnPCA

from anomalens import create_model
from anomalens.components.kde import GaussianKDE, scott_factor
from anomalens.data.sample import Batch
from anomalens.errors import DataError


def test_kde_log_density_matches_scipy():
    rng = np.random.default_rng(0)
    # Correlated, anisotropic data with an offset: exercises the full bandwidth matrix.
    x = rng.normal(size=(60, 4)) @ rng.normal(size=(4, 4)) + 5.0
    queries = np.concatenate([x[:5], x[:5] + rng.normal(scale=0.3, size=(5, 4)), rng.normal(size=(5, 4)) * 4])
    ours = GaussianKDE.fit(torch.from_numpy(x)).log_density(torch.from_numpy(queries)).numpy()
    reference = gaussian_kde(x.T).logpdf(queries.T)  # Scott's rule is scipy's default
    np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-9)
    assert np.ptp(reference) > 5  # near and far queries really differ
    assert scott_factor(60, 4) == pytest.approx(gaussian_kde(x.T).factor)


def test_kde_float32_stays_close_to_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 3)) * [1.0, 10.0, 0.1]
    queries = rng.normal(size=(8, 3)) * [1.0, 10.0, 0.1] * 2
    ours = GaussianKDE.fit(torch.from_numpy(x).float()).log_density(torch.from_numpy(queries).float()).numpy()
    np.testing.assert_allclose(ours, gaussian_kde(x.T).logpdf(queries.T), rtol=1e-4, atol=1e-3)


def test_kde_rejects_a_single_point():
    with pytest.raises(DataError, match="at least 2 training samples; got 1"):
        GaussianKDE.fit(torch.zeros(1, 3))


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return (F.interpolate(coarse, size=(64, 64), mode="bilinear") * 0.6 + 0.2).clamp(0, 1)


def test_model_matches_sklearn_pca_plus_scipy_kde_and_leave_one_out_by_brute_force():
    torch.manual_seed(0)  # the random-init backbone
    model = create_model("dfkde", weights="none", layers=["blocks.2", "blocks.4"], n_components=5, blur_sigma=0.0)
    train = _images(12, seed=0)
    model.fit([Batch(part, torch.zeros(6), torch.zeros(6, 1, 64, 64), torch.zeros(6, dtype=torch.bool))
               for part in (train[:6], train[6:])])
    model.eval()
    test = _images(2, seed=1)
    test[1, :, 8:24, 8:24] = torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1)

    def grid(images):  # (B, D, 8, 8): blocks.2 at stride 8, blocks.4 (stride 16) repeated 2x2
        with torch.no_grad():
            f2, f4 = model.backbone(images)
        return torch.cat([f2, f4.repeat_interleave(2, 2).repeat_interleave(2, 3)], 1).double().flatten(2).numpy()

    pca = SklearnPCA(5).fit(grid(train).mean(2))
    kde = gaussian_kde(pca.transform(grid(train).mean(2)).T)  # the KDE is invariant to PCA's sign choices

    def reference_score(pooled):
        return -kde.logpdf(pca.transform(pooled).T)

    with torch.no_grad():
        score, contribution = model.position_scores(test)
        out = model(test)
    test_grid = grid(test)
    expected = reference_score(test_grid.mean(2))
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-4)
    assert contribution.shape == (2, 1, 8, 8)
    for b, p in ((0, 0), (1, 9), (1, 63)):
        others = np.delete(test_grid[b], p, axis=1).mean(1, keepdims=True).T
        want = expected[b] - reference_score(others)[0]
        got = float(contribution[b, 0].flatten()[p])
        assert abs(got - want) <= 1e-3 * abs(expected[b]) + 1e-4, (b, p, got, want)
    assert out.anomaly_map.shape == (2, 1, 64, 64)
    torch.testing.assert_close(out.score, score)
