"""DFM: the PCA against scikit-learn, and the scores and residual map against an independent computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA as SklearnPCA

from anomalens import create_model
from anomalens.components.pca import PCA
from anomalens.data.sample import Batch
from anomalens.errors import DataError


@pytest.mark.parametrize("n_components", [0.5, 0.9, 0.97, 3])
def test_pca_keeps_the_components_sklearn_keeps(n_components):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12)) * np.linspace(3, 0.1, 12) + 100.0
    ours = PCA.fit(torch.from_numpy(x), n_components)
    ref = SklearnPCA(n_components, svd_solver="full").fit(x)
    assert ours.components.shape == ref.components_.shape
    np.testing.assert_allclose(ours.variance.numpy(), ref.explained_variance_, rtol=1e-9)
    # Component signs are arbitrary: compare the projector and the reconstructions instead.
    q = rng.normal(size=(5, 12)) + 100.0
    np.testing.assert_allclose(ours.reconstruct(ours.project(torch.from_numpy(q))).numpy(),
                               ref.inverse_transform(ref.transform(q)), rtol=1e-9, atol=1e-9)


def test_pca_caps_components_at_the_rank_and_needs_two_samples():
    assert PCA.fit(torch.randn(4, 10), 8).components.shape == (3, 10)
    with pytest.raises(DataError, match="at least 2 training samples; got 1"):
        PCA.fit(torch.randn(1, 10), 0.9)


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(64, 64), mode="bilinear") * 0.6 + 0.2)


@pytest.mark.parametrize("score", ["fre", "nll"])
def test_scores_and_map_match_sklearn(score):
    torch.manual_seed(0)  # the random-init backbone
    model = create_model("dfm", weights="none", layers=["blocks.2"], pooling_kernel=2, pca_variance=0.9,
                         score=score, blur_sigma=0.0)
    train = _images(10, seed=0)
    model.fit([Batch(train, torch.zeros(10), torch.zeros(10, 1, 64, 64), torch.zeros(10, dtype=torch.bool))]).eval()
    test = _images(3, seed=1)
    test[2, :, 40:56, 8:24] = 1.0
    with torch.no_grad():
        out = model(test)
        pooled_train, pooled_test = (F.avg_pool2d(model.backbone(x)[0], 2).double() for x in (train, test))
    ref = SklearnPCA(0.9, svd_solver="full").fit(pooled_train.flatten(1).numpy())
    x = pooled_test.flatten(1).numpy()
    residual = (x - ref.inverse_transform(ref.transform(x))) ** 2
    if score == "fre":
        expected = residual.sum(1)
    else:
        z = ref.transform(x)
        expected = 0.5 * (z**2 / ref.explained_variance_).sum(1) + 0.5 * np.log(ref.explained_variance_).sum()
    np.testing.assert_allclose(out.score.numpy(), expected, rtol=1e-3)
    # Map: the residual per pooled cell (4x4 grid of 16 px cells), upsampled bilinearly without blur.
    grid = torch.from_numpy(residual).view(3, *pooled_test.shape[1:]).sum(1, keepdim=True)
    expected_map = F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.anomaly_map.double(), expected_map, rtol=1e-3, atol=1e-3 * float(grid.max()))
    # The white patch sits in cell (row 2-3, col 0-1): its residual is the largest of that image.
    assert int(grid[2, 0].flatten().argmax()) in (8, 9, 12, 13)


def test_wrong_input_size_is_a_clear_error():
    torch.manual_seed(0)
    model = create_model("dfm", weights="none", layers=["blocks.2"])
    train = _images(4, seed=0)
    model.fit([Batch(train, torch.zeros(4), torch.zeros(4, 1, 64, 64), torch.zeros(4, dtype=torch.bool))]).eval()
    with pytest.raises(DataError, match="use the training image size"):
        model(F.interpolate(train, size=(96, 96)))
