"""Reverse Distillation: the cosine-distance maps, and a decoder that mirrors any encoder's pyramid."""
import numpy as np
import pytest
import torch

from anomalens import create_model
from anomalens.data.sample import Batch
from anomalens.errors import ConfigError
from anomalens.models.reverse_distillation import cosine_distance_maps


def test_cosine_distance_maps_match_a_per_position_numpy_computation():
    g = torch.Generator().manual_seed(0)
    e, d = torch.randn(2, 7, 5, 4, generator=g), torch.randn(2, 7, 5, 4, generator=g)
    (got,) = cosine_distance_maps([e], [d])
    a, b = e.numpy().transpose(0, 2, 3, 1), d.numpy().transpose(0, 2, 3, 1)  # (B, h, w, C)
    expected = 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert got.shape == (2, 1, 5, 4)
    np.testing.assert_allclose(got[:, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    (same,) = cosine_distance_maps([e], [3 * e])  # scale does not matter, direction does
    assert same.abs().max() < 1e-6


@pytest.mark.parametrize("backbone, layers", [
    ("tf_efficientnet_lite0", ["blocks.0", "blocks.2", "blocks.4"]),  # strides 2 / 8 / 16: a 4x step
    ("resnet18", ["layer1", "layer2", "layer3"]),  # 64 / 128 / 256 channels
])
@pytest.mark.parametrize("size", [64, 72])  # 72 is not a multiple of the bottleneck's stride 32
def test_decoder_rebuilds_every_encoder_level_at_its_shape(backbone, layers, size):
    model = create_model("reverse_distillation", backbone=backbone, layers=layers, weights="none")
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        encoded = model.encoder(x)
        decoded = model.decoder(model.bottleneck(encoded), [f.shape[-2:] for f in encoded])
    assert [d.shape for d in decoded] == [e.shape for e in encoded]


def test_layers_must_go_from_shallow_to_deep():
    with pytest.raises(ConfigError, match=r"ordered from shallow to deep; got strides \[16, 8\]"):
        create_model("reverse_distillation", layers=["blocks.4", "blocks.2"], weights="none")


def test_training_lowers_the_distillation_loss_and_unlocks_forward():
    torch.manual_seed(0)
    model = create_model("reverse_distillation", weights="none")
    x = torch.rand(4, 3, 64, 64)
    batch = Batch(x, torch.zeros(4, dtype=torch.long), torch.zeros(4, 1, 64, 64), torch.zeros(4, dtype=torch.bool),
                  ["a"] * 4, ["good"] * 4)
    with pytest.raises(Exception, match="not fitted"):
        model.eval()(x)
    with torch.no_grad():
        before = float(model.train().training_step(batch)["loss"])
    model.fit([batch], max_epochs=20)
    with torch.no_grad():
        after = float(model.train().training_step(batch)["loss"])
        out = model.eval()(x)
    assert after < 0.5 * before
    assert out.anomaly_map.shape == (4, 1, 64, 64) and torch.isfinite(out.score).all()
