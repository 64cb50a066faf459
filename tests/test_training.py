"""The shared training loop: settings from the config, steps, schedules, clipping, early stopping."""
from __future__ import annotations

import pytest
import torch

from anomalens.config import config_from_dict
from anomalens.engine import Engine
from anomalens.registry import get_model_class
from anomalens.training import Trainer, TrainSettings


class Line(torch.nn.Module):
    """One weight; each batch is a number b and the loss is scale * (w - b)^2."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.scale, self.steps = scale, 0

    def training_units(self, batch):
        yield batch

    def on_train_start(self, batches):
        pass

    def prepare_inference(self, batches):
        pass

    def training_step(self, batch):
        self.steps += 1
        return {"loss": self.scale * (self.w - batch).pow(2).sum()}


def settings(**kw) -> TrainSettings:
    return TrainSettings.resolve({"optimizer": {"name": "sgd", "lr": 0.1}}, kw)


def test_multistep_schedule_lowers_the_lr_at_its_milestone():
    trainer = Trainer(Line(), settings(max_epochs=3, scheduler={"name": "multistep", "milestones": [2], "gamma": 0.1}))
    history = trainer.fit([torch.tensor(1.0)] * 2)
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.01, 0.01])
    assert [h["epoch"] for h in history] == [1, 2, 3] and all("train_loss" in h for h in history)


def test_max_steps_stops_inside_an_epoch():
    model = Line()
    history = Trainer(model, settings(max_epochs=10, max_steps=7)).fit([torch.tensor(1.0)] * 5)
    assert model.steps == 7 and len(history) == 2


def test_gradient_clipping_bounds_each_update():
    model = Line(scale=1e6)  # gradient 2e6 at w = 0
    Trainer(model, settings(max_epochs=1, gradient_clip=0.5, optimizer={"name": "sgd", "lr": 1.0})).fit(
        [torch.tensor(1.0)])
    assert float(model.w) == pytest.approx(0.5)  # plain SGD: the step is lr x the clipped gradient
    unclipped = Line(scale=1e6)
    Trainer(unclipped, settings(max_epochs=1, optimizer={"name": "sgd", "lr": 1.0})).fit([torch.tensor(1.0)])
    assert float(unclipped.w) == pytest.approx(2e6)


def test_early_stopping_keeps_the_best_epochs_weights():
    losses = iter([3.0, 1.0, 2.0, 2.5, 0.5])  # the best is epoch 2; patience 2 stops after epoch 4
    seen = {}
    model = Line()
    trainer = Trainer(model, settings(max_epochs=5, early_stopping={"monitor": "val_loss", "patience": 2}),
                      validate=lambda: {"val_loss": next(losses)},
                      on_epoch_end=lambda epoch, logs: seen.setdefault(epoch, float(model.w)))
    history = trainer.fit([torch.tensor(1.0)])
    assert len(history) == 4 and trainer.best_epoch == 2
    assert float(model.w) == pytest.approx(seen[2]) and seen[2] != pytest.approx(seen[4])


def test_early_stopping_on_a_maximised_metric():
    aurocs = iter([0.6, 0.7, 0.65, 0.66])
    trainer = Trainer(Line(), settings(max_epochs=4, early_stopping={"monitor": "val_image_AUROC", "patience": 2}),
                      validate=lambda: {"val_image_AUROC": next(aurocs)})
    assert len(trainer.fit([torch.tensor(1.0)])) == 4 and trainer.best_epoch == 2


def test_trainer_batch_size_sets_the_training_batches_only(tiny_demo_root, tmp_path, monkeypatch):
    cls = get_model_class("autoencoder")
    sizes = []
    original = cls.training_step
    monkeypatch.setattr(cls, "training_step", lambda self, batch: sizes.append(len(batch.image)) or original(self, batch))
    config = config_from_dict({
        "model": {"name": "autoencoder"},
        "dataset": {"format": "mvtec", "root": str(tiny_demo_root), "category": "brick", "image_size": 64,
                    "batch_size": 8},
        "visualization": {"save_images": False}, "logging": {"logger": "none"},
        "trainer": {"progress": False, "max_epochs": 1, "batch_size": 3},
        "project": {"root": str(tmp_path)},
    })
    engine = Engine(config)
    engine.run()
    n = len(engine.splits.train)  # 8 training images: batches of 3, 3, 2; then val_loss at the dataset's size
    assert sizes[:3] == [3, 3, n - 6] and sizes[3:] == [len(engine.splits.val)]
    with pytest.raises(Exception, match="batch_size"):
        config_from_dict({"model": {"name": "autoencoder"}, "trainer": {"batch_size": 0}})
