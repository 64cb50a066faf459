"""PaDiM: Gaussian maths against numpy/scipy, fit/predict behaviour on tiny synthetic images, checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from anomalens import create_model, list_models
from anomalens.components.gaussian import GaussianAccumulator, mahalanobis
from anomalens.data.sample import Batch
from anomalens.errors import AnomalensError, ConfigError, DataError

SIZE = 64
SQUARE = (slice(20, 36), slice(30, 46))  # rows, cols of the pasted defect


def _textures(n: int, seed: int) -> torch.Tensor:
    """Smooth noise textures (n, 3, SIZE, SIZE) in [0, 1]: grey with low-frequency colour blotches."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, SIZE // 8, SIZE // 8, generator=g)
    smooth = F.interpolate(noise, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    return (0.45 + 0.08 * smooth).clamp(0, 1)


def _batch(images: torch.Tensor) -> Batch:
    n = images.shape[0]
    return Batch(image=images, label=torch.zeros(n, dtype=torch.long), mask=torch.zeros(n, 1, SIZE, SIZE),
                 has_mask=torch.zeros(n, dtype=torch.bool))


@pytest.fixture(scope="module")
def fitted():
    train = _textures(10, seed=0)
    model = create_model("padim")
    return model.fit([_batch(train[:4]), _batch(train[4:])]), train


# --------------------------------------------------------------------------- Gaussian maths
def test_accumulator_matches_numpy_cov_over_uneven_batches():
    rng = np.random.default_rng(0)
    # A large common offset checks that the online sums do not lose precision.
    x = rng.normal(size=(8, 3, 5)) * rng.uniform(0.5, 2, size=(1, 1, 5)) + 1000.0
    acc = GaussianAccumulator()
    for part in (x[:3], x[3:4], x[4:]):
        acc.update(torch.from_numpy(part))
    mean, cov = acc.mean(), acc.covariance(eps=0.01)
    inv_cov = acc.precision(eps=0.01, dtype=torch.float64, chunk=2)  # chunk < P exercises the chunked loop
    for p in range(3):
        expected = np.cov(x[:, p], rowvar=False) + 0.01 * np.eye(5)
        np.testing.assert_allclose(mean[p].numpy(), x[:, p].mean(0), rtol=0, atol=1e-9)
        np.testing.assert_allclose(cov[p].numpy(), expected, atol=1e-9)
        np.testing.assert_allclose(inv_cov[p].numpy(), np.linalg.inv(expected), rtol=1e-7, atol=1e-9)


def test_oas_shrinkage_matches_scikit_learn():
    from sklearn.covariance import OAS

    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 3, 9)) * rng.uniform(0.1, 3, size=(1, 1, 9)) + 50.0  # fewer samples than 2 x dims
    acc = GaussianAccumulator()
    acc.update(torch.from_numpy(x[:5]))
    acc.update(torch.from_numpy(x[5:]))
    cov = acc.covariance(eps=0.01, shrinkage="oas")
    for p in range(3):
        expected = OAS().fit(x[:, p]).covariance_ + 0.01 * np.eye(9)
        np.testing.assert_allclose(cov[p].numpy(), expected, atol=1e-9)
        assert not np.allclose(expected, np.cov(x[:, p], rowvar=False) + 0.01 * np.eye(9), atol=1e-3)
    with pytest.raises(ValueError, match="shrinkage must be"):
        acc.covariance(shrinkage="ledoit")


def test_pooled_shrinkage_mixes_in_the_covariance_shared_by_all_positions():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4, 8)) * rng.uniform(0.5, 2, size=(1, 4, 8)) + 20.0  # 6 samples < 8 dims: singular
    acc = GaussianAccumulator()
    acc.update(torch.from_numpy(x[:2]))
    acc.update(torch.from_numpy(x[2:]))
    per_position = np.stack([np.cov(x[:, p], rowvar=False) for p in range(4)])
    pooled = per_position.mean(0)
    np.testing.assert_allclose(acc.pooled_covariance(chunk=3).numpy(), pooled, atol=1e-9)
    cov = acc.covariance(eps=0.01, shrinkage="pooled", pooled_weight=0.25)
    inv_cov = acc.precision(eps=0.01, dtype=torch.float64, shrinkage="pooled", pooled_weight=0.25)
    for p in range(4):
        expected = 0.75 * per_position[p] + 0.25 * pooled + 0.01 * np.eye(8)
        np.testing.assert_allclose(cov[p].numpy(), expected, atol=1e-9)
        np.testing.assert_allclose(inv_cov[p].numpy(), np.linalg.inv(expected), rtol=1e-6, atol=1e-6)
    # The shared spread fills the directions one position's 6 samples leave empty.
    assert np.linalg.eigvalsh(per_position[0]).min() < 1e-9 < np.linalg.eigvalsh(cov[0].numpy() - 0.01 * np.eye(8)).min()
    acc.update(torch.from_numpy(x[:1] + 5.0))  # new data: the cached pooled covariance is recomputed
    assert not np.allclose(acc.pooled_covariance().numpy(), pooled, atol=1e-3)


def test_accumulator_needs_two_samples():
    acc = GaussianAccumulator()
    acc.update(torch.zeros(1, 2, 3))
    with pytest.raises(DataError, match="at least 2 training images; got 1"):
        acc.covariance()


def test_mahalanobis_matches_scipy():
    rng = np.random.default_rng(1)
    b, p, d = 3, 4, 6
    x, mean = rng.normal(size=(b, p, d)), rng.normal(size=(p, d))
    a = rng.normal(size=(p, d, d))
    inv_cov = np.linalg.inv(a @ a.transpose(0, 2, 1) + 0.1 * np.eye(d))
    got = mahalanobis(*(torch.from_numpy(v).float() for v in (x, mean, inv_cov)))
    expected = [[scipy_mahalanobis(x[i, j], mean[j], inv_cov[j]) for j in range(p)] for i in range(b)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


# --------------------------------------------------------------------------- model
def test_registered_with_declared_defaults():
    assert "padim" in list_models()
    model = create_model("padim", n_features=20, seed=3)
    assert model.tags["trainable"] is False and model.description
    assert model.backbone.channels == [24, 40, 112] and model.backbone.strides == [4, 8, 16]
    # The channel subset is a seeded draw: reproducible, seed-dependent, without repeats.
    assert torch.equal(model.index, create_model("padim", n_features=20, seed=3).index)
    assert not torch.equal(model.index, create_model("padim", n_features=20, seed=4).index)
    assert model.index.unique().numel() == 20 and int(model.index.max()) < 176


def test_fit_stores_the_papers_gaussians(fitted):
    model, train = fitted
    with torch.no_grad():
        emb = model._embed(train).permute(0, 2, 3, 1).double().numpy()  # (N, h, w, D)
    # 100 random channels + 3 colour channels
    assert model.mean.shape == (16, 16, 103) and model.inv_cov.shape == (16, 16, 103, 103)
    for i, j in [(0, 0), (7, 11), (15, 15)]:
        cov = np.cov(emb[:, i, j], rowvar=False) + 0.01 * np.eye(103)
        np.testing.assert_allclose(model.mean[i, j].numpy(), emb[:, i, j].mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(model.inv_cov[i, j].double().numpy(), np.linalg.inv(cov), rtol=1e-3, atol=1e-3)


def test_pooled_shrinkage_option_reaches_the_fitted_gaussians(fitted):
    model, train = fitted
    pooled = create_model("padim", shrinkage="pooled", pooled_weight=0.5).fit([_batch(train[:4]), _batch(train[4:])])
    with torch.no_grad():
        emb = pooled._embed(train).permute(0, 2, 3, 1).double().numpy().reshape(10, 256, 103)
    per_position = np.stack([np.cov(emb[:, p], rowvar=False) for p in (0, 100, 255)])
    shared = np.mean([np.cov(emb[:, p], rowvar=False) for p in range(256)], axis=0)
    for k, p in enumerate((0, 100, 255)):
        expected = 0.5 * per_position[k] + 0.5 * shared + 0.01 * np.eye(103)
        np.testing.assert_allclose(pooled.inv_cov.reshape(256, 103, 103)[p].double().numpy(), np.linalg.inv(expected),
                                   rtol=1e-3, atol=1e-3)
    assert not torch.allclose(pooled.inv_cov, model.inv_cov, atol=1e-2)


def test_colour_channels_are_the_cells_relative_colour_with_a_feature_channels_spread(fitted):
    model, train = fitted
    with torch.no_grad():
        emb = model._embed(train)
    cells = train.reshape(10, 3, 16, 4, 16, 4).mean(dim=(3, 5)) - train.mean(dim=(2, 3), keepdim=True)
    cells = F.avg_pool2d(cells, 3, stride=1, padding=1, count_include_pad=False)  # the 3x3 neighbourhood
    torch.testing.assert_close(emb[:, 100:], cells * model.colour_scale, rtol=1e-4, atol=1e-5)
    first = emb[:4].transpose(0, 1).flatten(1).std(dim=1)  # the scale comes from the first batch (4 images)
    assert float(first[100:].mean()) == pytest.approx(float(first[:100].mean()), rel=1e-4)
    plain = create_model("padim", local_colour=False).fit([_batch(train)])
    assert plain.mean.shape == (16, 16, 100)


def test_neighbourhood_averages_each_embedding_over_the_cells_around_it(fitted):
    model, train = fitted
    plain = create_model("padim", neighbourhood=1)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        cells, pooled = plain._embed(train).numpy(), model._embed(train).numpy()  # (N, D, 16, 16)
    for i, j in [(0, 0), (0, 7), (8, 8), (15, 14)]:  # corner (4 neighbours), edge (6), inside (9)
        window = cells[:, :, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
        np.testing.assert_allclose(pooled[:, :, i, j], window.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    assert model.hparams["neighbourhood"] == 3 and not np.allclose(cells, pooled)


def _aligned(n: int, seed: int) -> torch.Tensor:
    """Textures with the same asymmetric part in every image: a bright bar near the top-left corner."""
    images = _textures(n, seed)
    images[:, :, 6:14, 4:40] = 0.9
    return images


def _assert_same_gaussians(a, b):
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.inv_cov, b.inv_cov, rtol=1e-3, atol=1e-3)


def test_flips_true_fits_every_images_three_mirror_images_too():
    train = _textures(6, seed=7)
    mirrored = create_model("padim", flips=True).fit([_batch(train)])
    views = [train, train.flip(-1), train.flip(-2), train.flip((-2, -1))]
    _assert_same_gaussians(mirrored, create_model("padim", flips=False).fit([_batch(v) for v in views]))
    assert mirrored.fit_info == {"flips_used": True, "mirror_distance_ratio": None}


def test_flips_auto_mirrors_a_texture_but_not_an_aligned_part():
    # 40 images: every 5th (8) is held out of a first fit, then scored as it is and mirrored.
    texture, part = _textures(40, seed=8), _aligned(40, seed=8)
    kwargs = {"local_colour": False}  # the colour scale comes from the first batch, which the held-out images leave
    auto_texture = create_model("padim", flips="auto", **kwargs).fit([_batch(texture[:16]), _batch(texture[16:])])
    auto_part = create_model("padim", flips="auto", **kwargs).fit([_batch(part[:16]), _batch(part[16:])])
    assert auto_texture.fit_info["flips_used"] and auto_texture.fit_info["mirror_distance_ratio"] <= 1.05
    assert not auto_part.fit_info["flips_used"] and auto_part.fit_info["mirror_distance_ratio"] > 1.05
    # Either way every image ends up in the Gaussians: the held-out ones are added back.
    _assert_same_gaussians(auto_texture, create_model("padim", flips=True, **kwargs).fit([_batch(texture)]))
    _assert_same_gaussians(auto_part, create_model("padim", flips=False, **kwargs).fit([_batch(part)]))


def test_flips_auto_takes_a_one_shot_iterator_and_skips_the_check_with_few_images():
    texture = _textures(40, seed=8)
    from_list = create_model("padim").fit([_batch(texture[:16]), _batch(texture[16:])])
    from_generator = create_model("padim").fit(_batch(t) for t in (texture[:16], texture[16:]))
    _assert_same_gaussians(from_list, from_generator)
    assert from_generator.fit_info == from_list.fit_info
    few = create_model("padim", local_colour=False).fit([_batch(texture[:10])])  # 2 held out: too few to judge
    assert few.fit_info == {"flips_used": False, "mirror_distance_ratio": None}
    _assert_same_gaussians(few, create_model("padim", flips=False, local_colour=False).fit([_batch(texture[:10])]))


def test_defect_scores_higher_and_map_peaks_inside_it(fitted):
    model, _ = fitted
    normals = _textures(3, seed=1)
    defect = _textures(1, seed=2)
    defect[:, :, SQUARE[0], SQUARE[1]] = 1.0
    with torch.no_grad():
        out = model(torch.cat([normals, defect]))
    assert out.score.shape == (4,) and out.anomaly_map.shape == (4, 1, SIZE, SIZE)
    assert torch.isfinite(out.anomaly_map).all() and (out.anomaly_map >= 0).all()
    assert out.score[3] > out.score[:3].max()
    # The score is the mean of the map's top 1 % of 4x4 cell averages (3 of 256), and the defect
    # image's peak lies inside the square.
    cells = out.anomaly_map.numpy().reshape(4, 16, 4, 16, 4).mean(axis=(2, 4)).reshape(4, -1)
    top = np.sort(cells, axis=1)[:, -3:].mean(axis=1)
    np.testing.assert_allclose(out.score.numpy(), top, rtol=1e-6)
    row, col = divmod(int(out.anomaly_map[3, 0].argmax()), SIZE)
    assert SQUARE[0].start <= row < SQUARE[0].stop and SQUARE[1].start <= col < SQUARE[1].stop


def test_score_share_zero_is_the_papers_maximum_and_one_the_maps_mean(fitted):
    model, _ = fitted
    images = torch.cat([_textures(1, seed=6), torch.rand(1, 3, SIZE, SIZE)])
    state = model.state_dict()
    for share, reduce in ((0.0, lambda m: m.amax(1)), (1.0, lambda m: m.mean(1))):  # the cells' mean is the map's
        other = create_model("padim", score_share=share)
        other.load_state_dict(state)
        with torch.no_grad():
            out = other(images)
        torch.testing.assert_close(out.score, reduce(out.anomaly_map.flatten(1)))


def test_state_dict_round_trip_gives_identical_outputs(fitted):
    model, _ = fitted
    images = _textures(2, seed=5)
    fresh = create_model("padim", seed=99)  # another channel subset: the loaded one must replace it everywhere
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model(images), fresh(images)
    assert torch.equal(a.score, b.score) and torch.equal(a.anomaly_map, b.anomaly_map)


def test_unfitted_model_refuses_to_predict():
    with pytest.raises(AnomalensError, match=r"^PaDiM is not fitted; call fit\(\) first\.$"):
        create_model("padim")(torch.rand(1, 3, SIZE, SIZE))


def test_other_input_size_is_a_clear_error(fitted):
    model, _ = fitted
    with pytest.raises(DataError, match="fitted on a 16x16 feature grid but this 96x96 input gives 24x24"):
        model(torch.rand(1, 3, 96, 96))


@pytest.mark.parametrize(("value", "expected"), [(0, "an int in [1, inf)"), (177, "an int in [1, 176]")])
def test_invalid_n_features(value, expected):
    with pytest.raises(ConfigError) as err:
        create_model("padim", n_features=value)
    assert str(err.value) == f"The 'n_features' parameter of PaDiM must be {expected}. Got {value} instead."


def test_fit_needs_images():
    with pytest.raises(DataError, match="no training images"):
        create_model("padim", n_features=10).fit([])
