"""EfficientAD: PDN geometry, teacher statistics and the quantile map normalisation."""
import numpy as np
import pytest
import torch

from anomalens import create_model
from anomalens.data.sample import Batch
from anomalens.models.efficient_ad import pdn


def _batch(images):
    n, size = len(images), images.shape[-1]
    return Batch(images, torch.zeros(n, dtype=torch.long), torch.zeros(n, 1, size, size),
                 torch.zeros(n, dtype=torch.bool), ["x.png"] * n, ["good"] * n)


@pytest.mark.parametrize("variant", ["small", "medium"])
def test_pdn_has_stride_4_and_a_33_pixel_receptive_field(variant):
    net = pdn(variant, 5, 0.125)
    with torch.no_grad():  # positive weights keep every ReLU open, so the gradient shows the full field
        for p in net.parameters():
            p.copy_(torch.rand_like(p) if p.ndim > 1 else torch.zeros_like(p))
    x = torch.rand(1, 3, 96, 96, requires_grad=True)
    out = net(x)
    assert out.shape == (1, 5, 24, 24)
    out[0, :, 12, 12].sum().backward()
    rows = np.flatnonzero(x.grad[0].abs().sum((0, 2)).numpy())
    cols = np.flatnonzero(x.grad[0].abs().sum((0, 1)).numpy())
    assert rows[-1] - rows[0] + 1 == 33 and cols[-1] - cols[0] + 1 == 33
    assert rows[0] <= 48 <= rows[-1]  # output cell 12 covers input pixels around 4 * 12


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = create_model("efficient_ad", weights="none", width=0.125, distill_steps=3, distill_batch=2)
    batches = [_batch(torch.rand(3, 3, 64, 64)) for _ in range(2)]
    model.fit(batches, max_epochs=1, max_steps=2)
    return model, batches


def test_teacher_statistics_are_the_per_channel_moments_of_its_outputs(trained):
    model, batches = trained
    with torch.no_grad():
        out = torch.cat([model.teacher(b.image) for b in batches]).double()
    torch.testing.assert_close(model.teacher_mean.double().flatten(), out.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.teacher_std.double().flatten(), out.std((0, 2, 3), unbiased=False) + 1e-6,
                               rtol=1e-4, atol=1e-6)
    assert bool(model.teacher_ready) and not any(p.requires_grad for p in model.teacher.parameters())


def test_normalised_maps_put_q_a_at_0_and_q_b_at_0_1_on_the_training_images(trained):
    model, batches = trained
    with torch.no_grad():
        st, ae = (torch.cat(m).numpy() for m in zip(*[model._maps(b.image) for b in batches], strict=True))
    for raw, (q_a, q_b) in ((st, model.st_quantiles.tolist()), (ae, model.ae_quantiles.tolist())):
        norm = 0.1 * (raw - q_a) / (q_b - q_a)
        assert np.quantile(norm, 0.9) == pytest.approx(0.0, abs=1e-6)
        assert np.quantile(norm, 0.995) == pytest.approx(0.1, abs=1e-6)
    # forward averages both normalised maps and upsamples them bilinearly (no smoothing here)
    model.hparams["blur_sigma"] = 0.0
    try:
        with torch.no_grad():
            out = model(batches[0].image)
    finally:
        model.hparams["blur_sigma"] = 4.0
    (q_a, q_b), (r_a, r_b) = model.st_quantiles.tolist(), model.ae_quantiles.tolist()
    expected = 0.5 * 0.1 * (st[:3] - q_a) / (q_b - q_a) + 0.5 * 0.1 * (ae[:3] - r_a) / (r_b - r_a)
    expected = torch.nn.functional.interpolate(torch.from_numpy(expected), size=(64, 64), mode="bilinear")
    torch.testing.assert_close(out.anomaly_map, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.score, expected.amax((1, 2, 3)), rtol=1e-4, atol=1e-6)
