"""Quality floors of the model zoo on one demo category at 256 px (slow: real training on CPU).

Each model trains with its documented CPU defaults (configs/<name>.yaml when it exists, else the
model's own defaults) and must reach an image AUROC of at least its floor.  A floor is what was
measured minus a margin, so it can fail: a model no better than chance is a defect.  One entry
per model in MODEL_FLOORS (name -> floor); the measured values are in each comment.
"""
from pathlib import Path

import pytest

from anomalens.config import config_from_dict, load_yaml
from anomalens.engine import Engine

CATEGORY = "brick"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MODEL_FLOORS = {
    "reverse_distillation": 0.90,  # measured 0.957 image / 0.904 pixel AUROC
}


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODEL_FLOORS))
def test_zoo_quality_floor(model, tmp_path):
    yaml_path = CONFIGS / f"{model}.yaml"
    data = load_yaml(yaml_path) if yaml_path.is_file() else {"model": {"name": model}}
    data["dataset"] = {**data.get("dataset", {}), "format": "demo", "root": None, "category": CATEGORY,
                       "image_size": 256}
    data["visualization"] = {**data.get("visualization", {}), "save_images": False, "show_images": False}
    data["logging"] = {"logger": "none"}
    data["trainer"] = {**data.get("trainer", {}), "progress": False}
    data["project"] = {"root": str(tmp_path)}
    engine = Engine(config_from_dict(data))
    engine.run()
    m = engine.metrics
    print(f"{model}/{CATEGORY}: image AUROC {m['image_AUROC']:.4f}, pixel AUROC {m['pixel_AUROC']:.4f}, "
          f"fit {engine.timings['fit_seconds']:.1f}s")
    assert m["image_AUROC"] >= MODEL_FLOORS[model]
