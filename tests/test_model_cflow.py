"""CFlow: the 2D positional encoding, the condition_dim rule, and the training-max map normalisation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anomalens import create_model
from anomalens.data.sample import Batch
from anomalens.errors import ConfigError
from anomalens.models.cflow import positional_encoding_2d


def test_positional_encoding_formula_and_structure():
    pe = positional_encoding_2d(16, 5, 7)
    assert pe.shape == (16, 5, 7)
    # Channel 2k / 2k+1 of the first half: sin / cos(column * 10000^(-k/4)); second half: the same of the row.
    row, col, k = 3, 6, 2
    freq = 10000 ** (-k / 4)
    assert pe[2 * k, row, col] == pytest.approx(math.sin(col * freq), abs=1e-6)
    assert pe[2 * k + 1, row, col] == pytest.approx(math.cos(col * freq), abs=1e-6)
    assert pe[8 + 2 * k, row, col] == pytest.approx(math.sin(row * freq), abs=1e-6)
    assert pe[8 + 2 * k + 1, row, col] == pytest.approx(math.cos(row * freq), abs=1e-6)
    assert torch.all(pe[:8] == pe[:8, :1])  # the column half does not change along rows
    assert torch.all(pe[8:] == pe[8:, :, :1])  # the row half does not change along columns
    codes = pe.flatten(1).T
    assert torch.cdist(codes, codes).add(torch.eye(35) * 10).min() > 0.1  # every position distinct


def test_condition_dim_must_be_a_multiple_of_four():
    with pytest.raises(ConfigError, match=r"^The 'condition_dim' parameter of CFlow must be a multiple of 4 in "
                                          r"\[4, 1024\]\. Got 30 instead\.$"):
        create_model("cflow", weights="none", condition_dim=30)


def test_training_patches_normalise_to_at_most_one_and_the_likeliest_to_zero_anomaly():
    torch.manual_seed(0)
    model = create_model("cflow", weights="none", layers=["blocks.2"], condition_dim=8, blur_sigma=0.0)
    images = torch.rand(4, 3, 32, 32)
    batches = [Batch(images, torch.zeros(4), torch.zeros(4, 1, 32, 32), torch.zeros(4, dtype=torch.bool))]
    model.fit(batches, max_epochs=2)
    assert model.level_max.shape == (1,)
    with torch.no_grad():
        log_p = model._log_likelihood_maps(images)[0]  # (4, 4, 4) on the stride-8 grid
        out = model.eval()(images)
    assert float(log_p.max()) == pytest.approx(float(model.level_max[0]), abs=1e-5)
    # The per-level term 1 - exp(logp - max) is 0 at the likeliest training patch and positive elsewhere.
    expected_grid = 1 - torch.exp(log_p - model.level_max[0])
    assert float(expected_grid.min()) == pytest.approx(0.0, abs=1e-5) and float(expected_grid.max()) > 0
    # Without blur the map is the bilinear upsampling of that grid; the score is its maximum.
    expected_map = F.interpolate(expected_grid.unsqueeze(1), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.anomaly_map, expected_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.score, expected_map.amax(dim=(1, 2, 3)))


def test_each_training_batch_becomes_one_optimiser_step_per_fiber_batch_covering_every_vector():
    torch.manual_seed(0)
    model = create_model("cflow", weights="none", layers=["blocks.2", "blocks.4"], condition_dim=8, fiber_batch=5)
    images = torch.rand(2, 3, 32, 32)
    batch = Batch(images, torch.zeros(2), torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.bool))
    seen = []
    step = model.training_step
    model.training_step = lambda unit: (seen.append(unit), step(unit))[1]  # the Trainer calls the instance's
    model.fit([batch], max_epochs=1)
    # blocks.2: 2 images x 4 x 4 = 32 vectors -> 7 steps of <= 5; blocks.4: 2 x 2 x 2 = 8 -> 2 steps.
    assert [u.level for u in seen] == [0] * 7 + [1] * 2
    assert [len(u.vectors) for u in seen] == [5] * 6 + [2] + [5, 3]
    with torch.no_grad():
        x, cond = model._vectors(model._features(images)[0])
    got = torch.cat([torch.cat([u.vectors, u.conditions], 1) for u in seen if u.level == 0])
    want = torch.cat([x, cond], 1)
    # Every vector exactly once, with its own position's condition (compare as sorted rows).
    torch.testing.assert_close(got[torch.argsort(got[:, 0])], want[torch.argsort(want[:, 0])])
