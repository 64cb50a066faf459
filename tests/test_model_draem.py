"""DRAEM's maths: SSIM, focal loss, the Perlin anomaly simulator and precise BatchNorm."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from anomalens.components.batchnorm import recalibrate_batchnorm
from anomalens.components.losses import focal_loss
from anomalens.components.ssim import ssim_loss, ssim_map
from anomalens.components.synthetic import perlin_anomalies


def test_ssim_map_matches_scikit_image_away_from_the_border():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 48, 40, generator=g)
    y = (x + 0.2 * torch.rand(1, 3, 48, 40, generator=g)).clamp(0, 1)
    _, full = structural_similarity(x[0].numpy(), y[0].numpy(), channel_axis=0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0, full=True)
    got = ssim_map(x, y)
    assert got.shape == (1, 1, 48, 40)
    np.testing.assert_allclose(got[0, 0, 5:-5, 5:-5].numpy(), full.mean(0)[5:-5, 5:-5], atol=1e-5)
    assert float(ssim_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(ssim_loss(x, y)) > 0.02


def test_focal_loss_is_cross_entropy_at_gamma_0_and_down_weights_easy_pixels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 5, 6, generator=g) * 3
    mask = (torch.rand(2, 1, 5, 6, generator=g) > 0.7).float()
    target = mask[:, 0].long()
    assert float(focal_loss(logits, mask, gamma=0)) == pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-6)
    p_t = logits.softmax(1).gather(1, target[:, None])[:, 0]
    expected = (-(1 - p_t) ** 2 * p_t.log()).mean()
    assert float(focal_loss(logits, mask)) == pytest.approx(float(expected), rel=1e-5)
    assert torch.isfinite(focal_loss(torch.tensor([[[[500.0]], [[-500.0]]]]), torch.ones(1, 1, 1, 1)))


def test_perlin_anomalies_change_only_the_masked_pixels():
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 0.2 + 0.4
    out, masks = perlin_anomalies(images, np.random.default_rng(3), p_anomaly=1.0)
    assert out.shape == images.shape and masks.shape == (6, 1, 64, 64)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert masks.sum() > 0
    outside = (masks == 0).expand_as(images)
    assert torch.equal(out[outside], images[outside])  # byte-exact outside the blobs
    changed = ((out - images).abs().amax(1, keepdim=True) > 1e-6).float()
    assert (changed <= masks).all()
    same, none = perlin_anomalies(images, np.random.default_rng(3), p_anomaly=0.0)
    assert torch.equal(same, images) and none.sum() == 0
    again, again_masks = perlin_anomalies(images, np.random.default_rng(3), p_anomaly=1.0)
    assert torch.equal(again, out) and torch.equal(again_masks, masks)  # seeded: reproducible


def test_recalibrated_batchnorm_holds_the_exact_statistics_of_its_inputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    inputs = [torch.rand(2, 3, 8, 8) * 5 + 1 for _ in range(3)]
    recalibrate_batchnorm(net, inputs)
    with torch.no_grad():
        feats = torch.cat([net[0](x) for x in inputs])
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, feats.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    # each batch's unbiased variance, averaged over the (equal-sized) batches
    per_batch = torch.stack([net[0](x).detach().var((0, 2, 3), unbiased=True) for x in inputs]).mean(0)
    torch.testing.assert_close(bn.running_var, per_batch, rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.1 and not net.training
