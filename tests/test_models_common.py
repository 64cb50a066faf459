"""The common suite: every registered model passes the same checks (timm/sklearn style).

Per-model quirks come from the model's `tags`, never from `if name == ...` here.
"""
import re

import pytest
import torch

from anomalens import create_model, list_models
from anomalens.data.sample import Batch
from anomalens.engine import load_checkpoint, save_checkpoint, seed_everything
from anomalens.errors import AnomalensError, ConfigError
from anomalens.postprocess import PostProcessor
from anomalens.registry import get_model_class

SIZE = 64
MODELS = list_models()


def tiny_params(name: str) -> dict:
    """Random-init backbone keeps the suite fast; a model may ask for more via tags['test_params']."""
    cls = get_model_class(name)
    params = {"weights": "none"} if "weights" in cls.constraints else {}
    return {**params, **cls.tags.get("test_params", {})}


def textures(n: int, seed: int) -> torch.Tensor:
    """Smooth random textures in [0, 1]: a stand-in for good parts."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    fine = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.1
    return (torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear") * 0.8 + fine).clamp(0, 1)


def batches(images: torch.Tensor, size: int = 4) -> list[Batch]:
    """A re-iterable list of batches (trained models make several passes)."""
    out = []
    for i in range(0, len(images), size):
        part = images[i:i + size]
        n = len(part)
        out.append(Batch(part, torch.zeros(n, dtype=torch.long), torch.zeros(n, 1, SIZE, SIZE),
                         torch.zeros(n, dtype=torch.bool), [f"img{i + j}.png" for j in range(n)], ["good"] * n))
    return out


def fit(model, images):
    """Memory-bank models take one pass; trained models get their short test recipe (tags)."""
    return model.fit(batches(images), **model.tags.get("test_training", {}))


def fitted(name: str, seed: int = 0):
    seed_everything(seed)
    model = create_model(name, **tiny_params(name))
    assert fit(model, textures(8, seed=1)) is model  # fit returns self
    return model.eval()


_FITTED: dict[str, object] = {}


def shared_fit(name: str):
    """One fit per model, reused by the read-only tests (keeps the suite fast as models are added)."""
    if name not in _FITTED:
        _FITTED[name] = fitted(name)
    return _FITTED[name]


@pytest.fixture(scope="module", params=MODELS)
def model_name(request):
    return request.param


def test_registry_has_the_core_models():
    assert {"padim", "patchcore"} <= set(MODELS)
    for name in MODELS:
        cls = get_model_class(name)
        assert cls.name == name and cls.description and len(cls.description) < 120


def test_fit_returns_self_and_outputs_have_the_contract_shapes(model_name):
    model = shared_fit(model_name)
    with torch.no_grad():
        out = model(textures(3, seed=2))
    assert out.score.shape == (3,)
    assert out.anomaly_map.shape == (3, 1, SIZE, SIZE)
    assert torch.isfinite(out.score).all() and torch.isfinite(out.anomaly_map).all()


def test_higher_score_for_an_obvious_defect(model_name):
    if get_model_class(model_name).tags.get("trainable"):
        pytest.skip("a trained model needs real training to detect anything: see the slow quality floors")
    model = shared_fit(model_name)
    normal = textures(4, seed=3)
    broken = normal.clone()
    broken[:, :, 20:40, 20:40] = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)  # a magenta patch
    with torch.no_grad():
        s_normal, out = model(normal).score, model(broken)
    assert (out.score > s_normal).all()
    inside = out.anomaly_map[:, 0, 20:40, 20:40].mean()
    outside = out.anomaly_map[:, 0, :10, :10].mean()
    assert inside > outside


def test_seeded_fits_are_deterministic(model_name):
    images = textures(2, seed=4)
    with torch.no_grad():
        a, b = fitted(model_name, seed=5)(images), fitted(model_name, seed=5)(images)
    torch.testing.assert_close(a.score, b.score, rtol=0, atol=0)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=0, atol=0)


def test_checkpoint_round_trip_gives_identical_scores(model_name, tmp_path):
    from anomalens.config import config_from_dict

    model = shared_fit(model_name)
    images = textures(3, seed=6)
    with torch.no_grad():
        before = model(images)
    post = PostProcessor().fit(before.score.numpy(), [0, 0, 0], before.anomaly_map[:, 0].numpy(),
                               torch.zeros(3, SIZE, SIZE, dtype=torch.bool).numpy(), [False] * 3)
    config = config_from_dict({"model": {"name": model_name, **tiny_params(model_name)},
                               "dataset": {"image_size": SIZE}})
    save_checkpoint(tmp_path / "model.pt", config, model, post)
    _, loaded, loaded_post = load_checkpoint(tmp_path)
    with torch.no_grad():
        after = loaded(images)
    torch.testing.assert_close(after.score, before.score, rtol=0, atol=0)
    torch.testing.assert_close(after.anomaly_map, before.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(loaded_post(after).norm_score, post(before).norm_score, rtol=0, atol=0)


def _invalid_value(rule):
    for candidate in ("__invalid__", -(10**9), 10**9, 0, -1, 1.5, None, [], True):
        if not rule.check(candidate):
            return candidate
    raise AssertionError(f"no invalid value found for {rule}")


def test_every_invalid_parameter_raises_the_standard_error(model_name):
    cls = get_model_class(model_name)
    for param, rule in cls.constraints.items():
        bad = _invalid_value(rule)
        pattern = rf"^The '{param}' parameter of {cls.__name__} must be .+\. Got {re.escape(repr(bad))} instead\.$"
        with pytest.raises(ConfigError, match=pattern):
            create_model(model_name, **{param: bad})
    with pytest.raises(ConfigError, match=rf"Unknown parameter 'not_a_param' for {cls.__name__}\. Allowed: "):
        create_model(model_name, not_a_param=1)


def test_predicting_before_fit_is_a_clear_error(model_name):
    model = create_model(model_name, **tiny_params(model_name))
    with pytest.raises(AnomalensError, match=r"not fitted"):  # the library's error, not a bare RuntimeError
        model.eval()(textures(1, seed=7))
