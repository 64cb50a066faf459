"""Quality floors on the built-in demo data (slow: full 256 px categories, ImageNet backbone).

A model no better than chance is a defect, not a pass; these floors are the issue's targets.
"""
import pytest

from anomalens.config import config_from_dict
from anomalens.data.demo import DEMO_CATEGORIES
from anomalens.engine import Engine

FLOORS = {"patchcore": 0.95, "padim": 0.90}


@pytest.mark.slow
@pytest.mark.parametrize("category", DEMO_CATEGORIES)
@pytest.mark.parametrize("model", sorted(FLOORS))
def test_demo_quality_floor(model, category, tmp_path):
    config = config_from_dict({
        "model": {"name": model},
        "dataset": {"format": "demo", "category": category},
        "visualization": {"save_images": False},
        "trainer": {"progress": False},
        "project": {"root": str(tmp_path)},
    })
    engine = Engine(config)
    engine.run()
    m = engine.metrics
    print(f"{model}/{category}: image AUROC {m['image_AUROC']:.4f}, pixel AUROC {m['pixel_AUROC']:.4f}, "
          f"AUPRO {m['pixel_AUPRO']:.4f}, fit {engine.timings['fit_seconds']:.1f}s")
    assert m["image_AUROC"] >= FLOORS[model]
    assert m["pixel_AUROC"] >= FLOORS[model]
