"""Shared fixtures. Keep them small: the whole suite runs on CPU in minutes."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo dataset (MVTec layout, marker included): brick at 64 px, 10 train, 4 good + 6 defect test."""
    from anomalens.data.demo import ensure_demo

    root = tmp_path_factory.mktemp("tiny_demo") / "demo"
    return ensure_demo(root, image_size=64, categories=["brick"], n_train=10, n_test_good=4, n_test_defect=6)


def tiny_run_config(root: Path, tmp: Path, logging: dict):
    """A quick PaDiM run (random backbone, 64 px) on the tiny demo data, with the given `logging` section."""
    from anomalens.config import config_from_dict

    return config_from_dict({
        "model": {"name": "padim", "weights": "none"},
        "dataset": {"format": "mvtec", "root": str(root), "category": "brick", "image_size": 64, "batch_size": 8},
        "visualization": {"max_images": 3},
        "trainer": {"progress": False},
        "project": {"root": str(tmp / "runs")},
        "logging": logging,
    })
