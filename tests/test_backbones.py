"""Backbone wrapper: the offline ImageNet weights really classify, reach the features, and errors read well."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from skimage import data

from anomalens import backbones
from anomalens.backbones import Backbone, classifier
from anomalens.errors import ConfigError, WeightsError

LITE0_LEVELS = ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]


def _photo(name: str, size: int = 224) -> torch.Tensor:
    """A scikit-image photo as a (1, 3, size, size) tensor in [0, 1]."""
    image = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float()[None] / 255.0
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return Backbone(layers=LITE0_LEVELS)


@pytest.fixture(scope="module")
def full_lite0() -> torch.nn.Module:
    return classifier()


def test_lite0_normalisation_is_tf_style(lite0):
    # The TF-ported lite0 weights expect (x - 0.5) / 0.5; the constants live in the state dict.
    assert torch.equal(lite0.mean.flatten(), torch.full((3,), 0.5))
    assert torch.equal(lite0.std.flatten(), torch.full((3,), 0.5))
    assert {"mean", "std"} <= set(lite0.state_dict())


@pytest.mark.parametrize(("photo", "classes"), [("chelsea", range(281, 286)), ("coffee", [967])])
def test_imagenet_weights_classify_natural_photos(full_lite0, lite0, photo, classes):
    x = (_photo(photo) - lite0.mean) / lite0.std
    with torch.no_grad():
        top5 = full_lite0(x).topk(5).indices[0].tolist()
    # chelsea is a cat (ImageNet 281-285), coffee an espresso (967).
    assert set(top5) & set(classes), top5


def test_features_equal_the_full_models_blocks(full_lite0, lite0):
    image = _photo("chelsea", 128)
    x = (image - lite0.mean) / lite0.std
    expected = {}
    with torch.no_grad():
        h = full_lite0.bn1(full_lite0.conv_stem(x))
        for i, stage in enumerate(full_lite0.blocks):
            h = stage(h)
            expected[f"blocks.{i}"] = h
        got = lite0(image)
    # The frozen backbone's BatchNorms are folded into its convolutions: equal up to float32
    # rounding, which scales with the feature map's largest values.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.modules())
    for layer, feature in zip(LITE0_LEVELS, got, strict=True):
        scale = float(expected[layer].abs().max())
        torch.testing.assert_close(feature, expected[layer], rtol=1e-4, atol=2e-6 * scale)


def test_batchnorm_folding_keeps_a_resnets_outputs():
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("resnet18", features_only=True, out_indices=(1, 2), pretrained=False).eval()
    for m in reference.modules():  # non-trivial statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    folded = timm.create_model("resnet18", features_only=True, out_indices=(1, 2), pretrained=False).eval()
    folded.load_state_dict(reference.state_dict())
    assert backbones.fold_batchnorm(folded) == 10  # stem + 2 x 4 in layer1-2 + one downsample
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(reference(x), folded(x), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_documented_layer_table_matches_timm(lite0):
    rows = re.findall(r"^\s+(blocks\.\d)\s+(\d+)\s+(\d+)\s*$", backbones.__doc__, flags=re.M)
    assert [r[0] for r in rows] == LITE0_LEVELS
    assert lite0.strides == [int(r[1]) for r in rows] == [2, 4, 8, 16, 32]
    assert lite0.channels == [int(r[2]) for r in rows] == [16, 24, 40, 112, 320]


def test_layer_order_follows_the_request(lite0):
    image = torch.rand(1, 3, 64, 64)
    swapped = Backbone(layers=("blocks.4", "blocks.1"))
    assert swapped.channels == [112, 24] and swapped.strides == [16, 4]
    with torch.no_grad():
        a, b = swapped(image)
        ref = lite0(image)
    assert torch.equal(a, ref[3]) and torch.equal(b, ref[1])
    # Blocks past the deepest requested level are cut (they cost time and checkpoint size, never output).
    assert not any(k.startswith(("features.blocks.5", "features.blocks.6")) for k in swapped.state_dict())


def test_cpu_steps_give_the_whole_batchs_features(lite0, monkeypatch):
    images = torch.rand(5, 3, 64, 64)
    monkeypatch.setattr(backbones, "CPU_STEP_PIXELS", 64 * 64)  # a 64 px image per thread
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # steps of 2, 2 and 1 images
    assert lite0._cpu_step(images) == 2
    calls = []
    hook = lite0.features.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    try:
        with torch.no_grad():
            stepped = lite0(images)
            monkeypatch.setattr(backbones, "CPU_STEP_PIXELS", 10**9)
            whole = lite0(images)
    finally:
        hook.remove()
    assert calls == [2, 2, 1, 5]
    for a, b in zip(stepped, whole, strict=True):  # oneDNN's kernels differ with the batch size, in rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # Training runs the batch whole: BatchNorm needs its statistics.
    assert Backbone(layers=["blocks.1"], trainable=True)._cpu_step(images) is None


def test_frozen_and_stays_in_eval_mode():
    backbone = Backbone(layers=["blocks.1"])
    parent = torch.nn.Sequential(backbone).train()
    assert not backbone.training and not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    parent(torch.rand(2, 3, 64, 64))  # BatchNorm in train mode would update running stats
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    trainable = Backbone(layers=["blocks.1"], trainable=True).train()
    assert trainable.features.training and all(p.requires_grad for p in trainable.parameters())


def test_unknown_layer_message():
    with pytest.raises(ConfigError) as err:
        Backbone(layers=["blocks.9"])
    assert str(err.value) == ("Unknown layer 'blocks.9' for backbone 'tf_efficientnet_lite0'. "
                              "Available: blocks.0, blocks.1, blocks.2, blocks.4, blocks.6.")


def test_unknown_backbone_lists_close_matches():
    with pytest.raises(ConfigError, match=r"^Unknown backbone 'tf_efficientnet_lite9'\. Close matches: ") as err:
        Backbone("tf_efficientnet_lite9")
    assert "tf_efficientnet_lite0" in str(err.value)


def test_random_weights_differ_from_imagenet(lite0):
    image = torch.rand(1, 3, 64, 64)
    random = Backbone(layers=LITE0_LEVELS, weights="none")
    with torch.no_grad():
        assert not torch.allclose(random(image)[2], lite0(image)[2])


def test_state_dict_file_round_trip(tmp_path, full_lite0, lite0):
    image = torch.rand(1, 3, 64, 64)
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.ckpt"
    torch.save(full_lite0.state_dict(), plain)
    torch.save({"state_dict": full_lite0.state_dict(), "epoch": 3}, wrapped)
    with torch.no_grad():
        expected = lite0(image)
        for path in (plain, wrapped):
            loaded = Backbone(layers=LITE0_LEVELS, weights=str(path))
            assert all(torch.equal(a, b) for a, b in zip(loaded(image), expected, strict=True))


def test_other_timm_backbones_get_the_file_weights(tmp_path):
    # resnet18 goes through timm's generic FeatureListNet wrapper: check the weights reach it too.
    import timm

    full = timm.create_model("resnet18").eval()
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    backbone = Backbone("resnet18", ["layer3", "layer1"], weights=str(path))
    assert backbone.channels == [256, 64] and backbone.strides == [16, 4]
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        x = (image - backbone.mean) / backbone.std
        layer1 = full.layer1(full.maxpool(full.act1(full.bn1(full.conv1(x)))))
        expected = [full.layer3(full.layer2(layer1)), layer1]
        for got, ref in zip(backbone(image), expected, strict=True):  # BatchNorm folded: rounding only
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-6 * float(ref.abs().max()))


def test_wrong_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(Backbone("resnet18", ["layer1"], weights="none").features.state_dict(), path)
    with pytest.raises(WeightsError, match=rf"^Weights file '{re.escape(str(path))}' does not match backbone "
                                           r"'tf_efficientnet_lite0': \d+ missing keys \(e\.g\. 'conv_stem\.weight'\), "
                                           r"\d+ unexpected keys .*; set model\.weights to a checkpoint"):
        Backbone(weights=str(path))
    with pytest.raises(WeightsError, match=r"^Weights file '.*nothing\.pth' does not exist; set model\.weights"):
        Backbone(weights=str(tmp_path / "nothing.pth"))


def test_missing_hub_weights_name_the_setting(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    # Simulate a machine without network or cache; the hub library reads these at call time.
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        Backbone("resnet18", ["layer1"])
    assert str(err.value) == ("Cannot get ImageNet weights for backbone 'resnet18' offline; "
                              "set model.weights to a local checkpoint file or to 'none'.")
