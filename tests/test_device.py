"""Devices and precisions: every model fits and predicts on an accelerator; mixed precision trains.

The accelerator tests need CUDA and skip without it; `ANOMALENS_TEST_DEVICE=cpu` runs them on the
CPU instead, which is how this file itself is checked on a machine without a GPU.  The
mixed-precision engine runs always run on the CPU too.
"""
import math
import os

import pytest
import torch

from anomalens import create_model
from anomalens.config import config_from_dict
from anomalens.engine import Engine, seed_everything
from test_models_common import MODELS, batches, textures, tiny_params

DEVICE = os.environ.get("ANOMALENS_TEST_DEVICE", "cuda")
needs_device = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                  reason="no CUDA device here (ANOMALENS_TEST_DEVICE=cpu runs these on the CPU)")
ENGINE_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="no CUDA device here"))]


def fit_on(device: str, model_name: str):
    seed_everything(0)
    model = create_model(model_name, **tiny_params(model_name)).to(device)
    train = [b.to(device) for b in batches(textures(8, seed=1))]
    return model.fit(train, **model.tags.get("test_training", {})).eval()


@needs_device
@pytest.mark.parametrize("model_name", MODELS)
def test_every_model_fits_and_predicts_on_the_device(model_name):
    model = fit_on(DEVICE, model_name)
    with torch.no_grad():
        out = model(textures(2, seed=7).to(DEVICE))
    assert out.score.device.type == out.anomaly_map.device.type == DEVICE
    assert out.anomaly_map.shape == (2, 1, 64, 64)
    assert torch.isfinite(out.score).all() and torch.isfinite(out.anomaly_map).all()


@needs_device
@pytest.mark.parametrize("model_name", ["padim", "dfm"])
def test_one_pass_models_score_alike_on_the_device_and_the_cpu(model_name):
    # Closed-form fits: only float rounding differs (GPUs run convolutions in TF32 by default).
    images = textures(3, seed=7)
    with torch.no_grad():
        on_device = fit_on(DEVICE, model_name)(images.to(DEVICE)).score.cpu()
        on_cpu = fit_on("cpu", model_name)(images).score
    torch.testing.assert_close(on_device, on_cpu, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("device", ENGINE_DEVICES)
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_engine_trains_in_mixed_precision(precision, device, tiny_demo_root, tmp_path):
    config = config_from_dict({
        "model": {"name": "stfpm", "weights": "none"},
        "dataset": {"format": "demo", "root": str(tiny_demo_root), "category": "brick", "image_size": 64,
                    "batch_size": 4},
        "trainer": {"device": device, "precision": precision, "max_epochs": 2, "progress": False},
        "visualization": {"save_images": False}, "logging": {"logger": "none"},
        "project": {"root": str(tmp_path)},
    })
    engine = Engine(config)
    engine.run()
    assert engine.device.type == device
    assert len(engine.history) == 2 and all(math.isfinite(h["train_loss"]) for h in engine.history)
    assert engine.history[1]["train_loss"] < engine.history[0]["train_loss"]  # it learns, not only runs
    assert all(math.isfinite(v) for k, v in engine.metrics.items() if "AUROC" in k)
    assert next(engine.model.parameters()).dtype == torch.float32  # autocast: the weights stay float32
