"""Quality floors on the built-in demo data (slow: full 256 px categories, ImageNet backbone).

A model no better than chance is a defect, not a pass.  TARGET holds issue 2's floors, which both
models meet on every category.  Measured image / pixel AUROC (demo v2, refit on):
    padim      brick 1.000 / 0.997, grass 0.959 / 0.980, gravel 0.915 / 0.938, flange 1.000 / 0.993
               (grass and gravel were 0.846 / 0.931 and 0.877 / 0.904 before mirrored training images)
    patchcore  brick 1.000 / 0.983, grass 0.986 / 0.982, gravel 0.998 / 0.968, flange 0.987 / 0.983
               (refit by update; a fresh refit gave 1.000 / 0.983, 0.994 / 0.979, 0.987 / 0.966,
               0.993 / 0.982; brick, grass and gravel unmirrored 1.000 / 0.981, 0.956 / 0.969, 0.958 / 0.958)
"""
import pytest

from anomalens.config import config_from_dict
from anomalens.data.demo import DEMO_CATEGORIES
from anomalens.engine import Engine

TARGET = {"patchcore": 0.95, "padim": 0.90}


def _demo_metrics(model: dict, category: str, root) -> tuple[dict, dict]:
    engine = Engine(config_from_dict({
        "model": model,
        "dataset": {"format": "demo", "category": category},
        "visualization": {"save_images": False},
        "trainer": {"progress": False},
        "project": {"root": str(root)},
    }))
    engine.run()
    m = engine.metrics
    print(f"{model}/{category}: image AUROC {m['image_AUROC']:.4f}, pixel AUROC {m['pixel_AUROC']:.4f}, "
          f"AUPRO {m['pixel_AUPRO']:.4f}, fit {engine.timings['fit_seconds']:.1f}s, {engine.model.fit_info}")
    return m, engine.model.fit_info


@pytest.mark.slow
@pytest.mark.parametrize("category", DEMO_CATEGORIES)
@pytest.mark.parametrize("model", sorted(TARGET))
def test_demo_quality_floor(model, category, tmp_path):
    m, fit_info = _demo_metrics({"name": model}, category, tmp_path)
    assert m["image_AUROC"] >= TARGET[model]
    assert m["pixel_AUROC"] >= TARGET[model]
    # The textures look normal mirrored (PaDiM's ratio 1.00-1.02, PatchCore's 0.98-0.99); the aligned
    # flange does not (1.36, 1.09).
    assert fit_info["flips_used"] == (category != "flange"), fit_info
