"""PatchCore: features, bank, scores (eq. 7) against independent computations; behaviour on tiny images."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomalens import create_model
from anomalens.data.sample import Batch
from anomalens.errors import AnomalensError, ConfigError, DataError

SIZE = 64
SQUARE = (slice(20, 36), slice(30, 46))  # rows, cols of the pasted defect


def textures(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """Smooth noise textures (n, 3, size, size) in [0, 1]: the good parts."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, size // 8, size // 8, generator=g)
    return (0.45 + 0.08 * F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)).clamp(0, 1)


def batch(images: torch.Tensor) -> Batch:
    n = images.shape[0]
    return Batch(image=images, label=torch.zeros(n, dtype=torch.long), mask=torch.zeros(n, 1, SIZE, SIZE),
                 has_mask=torch.zeros(n, dtype=torch.bool))


def tiny(**params) -> torch.nn.Module:
    """A random-init backbone fitted on 8 textures: fast, for the mechanics."""
    return create_model("patchcore", weights="none", **params).fit([batch(textures(4, 0)), textures(4, 1)]).eval()


@pytest.fixture(scope="module")
def pretrained():
    """The default configuration (ImageNet lite0), fitted on 12 good textures."""
    return create_model("patchcore").fit([batch(textures(6, 0)), batch(textures(6, 1))]).eval()


# --------------------------------------------------------------------------- behaviour
def test_defects_score_higher_and_the_map_peaks_inside_the_square(pretrained):
    normal = textures(6, seed=2)
    broken = normal.clone()
    broken[:, :, SQUARE[0], SQUARE[1]] = 1.0  # a bright square
    with torch.no_grad():
        good, bad = pretrained(normal), pretrained(broken)
    assert bad.score.min() > 1.5 * good.score.max()
    peak = bad.anomaly_map.flatten(1).argmax(1)
    rows, cols = peak // SIZE, peak % SIZE
    assert ((rows >= 20) & (rows < 36) & (cols >= 30) & (cols < 46)).all()


def test_shapes_bank_size_and_finite_outputs(pretrained):
    # 12 images x (64 / 8)^2 patches = 768 patches; 10 % kept; 40 + 112 channels + 3 colour.
    assert pretrained.memory_bank.shape == (77, 155)
    with torch.no_grad():
        out = pretrained(textures(3, seed=3))
    assert out.score.shape == (3,) and out.anomaly_map.shape == (3, 1, SIZE, SIZE)
    assert torch.isfinite(out.score).all() and torch.isfinite(out.anomaly_map).all()
    with torch.no_grad():  # the bank is position-free: any input size works
        assert pretrained(textures(1, seed=3, size=96)).anomaly_map.shape == (1, 1, 96, 96)


# --------------------------------------------------------------------------- maths
def test_patch_features_are_3x3_means_with_the_deep_level_upsampled():
    model = create_model("patchcore", weights="none").eval()
    model.colour_scale.fill_(2.5)
    images = textures(1, seed=4)
    with torch.no_grad():
        shallow, deep = model.backbone(images)
        embedding = model._embed(images)

    def mean3x3(f):  # an explicit neighbourhood sum, zeros outside the grid, divided by 9
        padded = F.pad(f, (1, 1, 1, 1))
        h, w = f.shape[-2:]
        return sum(padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9

    deep = F.interpolate(mean3x3(deep), size=shallow.shape[-2:], mode="bilinear", align_corners=False)
    # Colour: each 8x8 cell's mean colour minus the image's, scaled, then the same 3x3 mean.
    cells = images.reshape(1, 3, 8, 8, 8, 8).mean(dim=(3, 5)) - images.mean(dim=(2, 3), keepdim=True)
    expected = torch.cat([mean3x3(shallow), deep, mean3x3(2.5 * cells)], dim=1)
    assert embedding.shape == (1, 155, 8, 8)
    torch.testing.assert_close(embedding, expected, rtol=1e-5, atol=1e-6)


def test_map_is_the_upsampled_nearest_neighbour_distance():
    model = tiny(blur_sigma=0.0)
    images = textures(2, seed=5)
    with torch.no_grad():
        out = model(images)
        patches = model._embed(images).permute(0, 2, 3, 1).reshape(-1, 155).double()
    nn_dist = torch.cdist(patches, model.memory_bank.double()).min(1).values.view(2, 1, 8, 8)
    nn_dist = nn_dist / model.position_scale.double()  # each position's distances in its typical size
    expected = F.interpolate(nn_dist, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.anomaly_map.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 9])
def test_image_score_is_eq_7(k):
    model = tiny(num_neighbors=k)
    images = textures(3, seed=6)
    with torch.no_grad():
        score = model(images).score.double()
        patches = model._embed(images).permute(0, 2, 3, 1).reshape(3, 64, 155).double()
    bank, scale = model.memory_bank.double(), model.position_scale.double().flatten()
    for b in range(3):
        dist = torch.cdist(patches[b], bank)  # (64, M)
        nn_dist, nn_idx = dist.min(1)
        s_star, worst = (nn_dist / scale).max(0)
        if k == 1:  # eq. 7 degenerates to 0; the model keeps s*
            expected = s_star
        else:
            m_star = nn_idx[worst]
            neighbours = torch.cdist(bank[m_star:m_star + 1], bank)[0].topk(k, largest=False).indices
            weight = 1 - torch.exp(nn_dist[worst]) / torch.exp(dist[worst, neighbours]).sum()
            expected = weight * s_star
        assert float(score[b]) == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_position_scale_is_each_positions_held_out_distance(strength):
    train = textures(8, seed=7)
    model = create_model("patchcore", weights="none", position_calibration=strength).fit([train[:5], train[5:]])
    with torch.no_grad():
        patches = model._embed(train).permute(0, 2, 3, 1).reshape(8, 64, 155).double()
    bank = model.memory_bank.double()
    owner = (bank[:, None, None] == patches[None]).all(3).any(2).float().argmax(1)  # the image each row came from
    held_out = torch.stack([torch.cdist(patches[i], bank[owner != i]).min(1).values for i in range(8)])
    typical = held_out.mean(0)
    expected = (typical / typical.mean()) ** strength
    torch.testing.assert_close(model.position_scale.double().flatten(), expected, rtol=1e-4, atol=1e-5)
    assert model.position_scale.shape == (8, 8)


def test_position_calibration_holds_out_an_images_mirror_images_too():
    train = textures(8, seed=7)
    train = (train + train.flip(-1)) / 2  # left-right symmetric: each image's h-mirror is itself
    model = create_model("patchcore", weights="none", flips=True).fit([train[:5], train[5:]])
    views = [train, train.flip(-1), train.flip(-2), train.flip((-2, -1))]
    with torch.no_grad():
        patches = torch.cat([model._embed(v).permute(0, 2, 3, 1).reshape(8, 64, 155) for v in views]).double()
    bank = model.memory_bank.double()
    found = (bank[:, None, None] == patches[None]).all(3).any(2).float().argmax(1)  # a view holding each row
    owner = found % 8  # the original image behind that view
    held_out = torch.stack([torch.cdist(patches[i], bank[owner != i]).min(1).values for i in range(8)])
    typical = held_out.mean(0)
    torch.testing.assert_close(model.position_scale.double().flatten(), (typical / typical.mean()) ** 0.5,
                               rtol=1e-4, atol=1e-5)


def test_no_position_calibration_is_the_plain_distance():
    train, images = textures(8, seed=7), textures(2, seed=5)
    plain = create_model("patchcore", weights="none", position_calibration=0.0).fit([train]).eval()
    assert not hasattr(plain, "position_scale")
    calibrated = create_model("patchcore", weights="none")
    calibrated.load_state_dict(plain.state_dict(), strict=False)  # same random backbone
    calibrated.fit([train]).eval()
    assert not torch.equal(calibrated.position_scale, torch.ones(8, 8))
    calibrated.position_scale.fill_(1.0)
    with torch.no_grad():
        a, b = plain(images), calibrated(images)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map)
    torch.testing.assert_close(a.score, b.score)


def test_position_scale_follows_another_input_size():
    model = tiny(blur_sigma=0.0)
    with torch.no_grad():
        out = model(textures(2, seed=5, size=96))  # fitted at 64 px: 8x8 grid, now 12x12
    assert out.anomaly_map.shape == (2, 1, 96, 96) and torch.isfinite(out.score).all()


def test_bank_rows_are_training_patches():
    train = textures(8, seed=7)
    model = create_model("patchcore", weights="none").fit([train]).eval()
    with torch.no_grad():
        patches = model._embed(train).permute(0, 2, 3, 1).reshape(-1, 155)
    assert model.memory_bank.shape == (round(0.1 * len(patches)), 155)
    assert (model.memory_bank[:, None] == patches[None]).all(2).any(1).all()  # each bank row is a patch, exactly
    full = create_model("patchcore", weights="none", coreset_ratio=1.0)
    full.load_state_dict(model.state_dict(), strict=False)  # same backbone weights
    full.fit([train])
    assert full.memory_bank.shape == patches.shape


def test_update_continues_the_coreset_from_the_bank():
    from anomalens.components.coreset import greedy_coreset, random_projection

    train, more = textures(8, seed=7), textures(4, seed=9)
    model = tiny_fit([train])
    bank = model.memory_bank.clone()
    with torch.no_grad():
        new_patches = torch.cat([model._embed(part).permute(0, 2, 3, 1).reshape(-1, 155)
                                 for part in (more[:1], more[1:])])  # as update's batches below
        before = torch.cdist(new_patches, bank).amin(1)
    model.update([batch(more[:1]), more[1:]])  # a Batch or a tensor, like fit
    assert model.memory_bank.shape == (len(bank) + round(0.1 * 4 * 64), 155)
    assert torch.equal(model.memory_bank[:len(bank)], bank)  # the bank stays, in order
    # The added rows: the greedy continuation from the bank over bank + new patches, independently.
    pool = torch.cat([bank, new_patches])
    chosen = greedy_coreset(random_projection(pool, 128, 0), len(model.memory_bank), given=len(bank), progress=False)
    torch.testing.assert_close(model.memory_bank[len(bank):], pool[chosen[len(bank):].sort().values])
    after = torch.cdist(new_patches, model.memory_bank).amin(1)
    assert after.mean() < 0.8 * before.mean()  # the new images are learned
    assert (model.memory_bank[len(bank):, None] == new_patches[None]).all(2).any(1).all()  # new rows: new patches
    # The unchanged scales: update keeps what fit measured.
    assert torch.equal(model.position_scale, tiny_fit([train]).position_scale)


def test_update_adds_mirrors_when_the_fit_did_and_needs_a_fit():
    train, more = textures(8, seed=7), textures(2, seed=9)
    mirrored = tiny_fit([train], flips=True)
    plain = tiny_fit([train], flips=False)
    mirrored.update([more])
    plain.update([more])
    added = round(0.1 * 2 * 64)  # the unmirrored patches set the growth
    assert len(mirrored.memory_bank) == len(plain.memory_bank) == round(0.1 * 8 * 64) + added
    with torch.no_grad():
        flipped = mirrored._embed(more.flip(-1)).permute(0, 2, 3, 1).reshape(-1, 155)
        unflipped = mirrored._embed(more).permute(0, 2, 3, 1).reshape(-1, 155)
    new_rows = mirrored.memory_bank[-added:]
    from_mirror = (new_rows[:, None] == flipped[None]).all(2).any(1)
    from_original = (new_rows[:, None] == unflipped[None]).all(2).any(1)
    assert from_mirror.any() and not from_original.all()
    with pytest.raises(AnomalensError, match="not fitted; call fit\\(\\) before update"):
        create_model("patchcore", weights="none").update([more])


def diagonal(n: int, seed: int) -> torch.Tensor:
    """Textures crossed by the same bright "/" band: mirrored left-right it runs the other way."""
    images = textures(n, seed)
    r = torch.arange(SIZE)
    images[:, :, (r[:, None] + r[None, :] - (SIZE - 1)).abs() < 5] = 0.9
    return images


def test_flips_true_widens_the_pool_not_the_bank():
    train = textures(8, seed=7)
    model = create_model("patchcore", weights="none", flips=True).fit([train[:3], train[3:]]).eval()
    views = [train, train.flip(-1), train.flip(-2), train.flip((-2, -1))]
    with torch.no_grad():
        patches = torch.stack([model._embed(v).permute(0, 2, 3, 1).reshape(-1, 155) for v in views])  # (4, 512, D)
    assert model.memory_bank.shape == (round(0.1 * 8 * 64), 155)  # the unmirrored patches set the size
    in_view = (model.memory_bank[:, None, None] == patches[None]).all(3).any(2)  # (bank, view)
    assert in_view.any(1).all() and in_view[:, 1:].any(1).sum() > in_view[:, 0].logical_not().sum() - 1
    assert not in_view[:, 0].all()  # some chosen patches exist only in mirror images
    assert model.fit_info == {"flips_used": True, "mirror_distance_ratio": None}


def test_flips_auto_mirrors_a_texture_but_not_an_aligned_part():
    # 40 images: every 5th (8) is scored against the bank without its own patches, as it is and mirrored.
    texture, part = textures(40, seed=8), diagonal(40, seed=8)
    auto_texture = create_model("patchcore").fit([texture[:16], texture[16:]])
    auto_part = create_model("patchcore").fit([part[:16], part[16:]])
    assert auto_texture.fit_info["flips_used"] and auto_texture.fit_info["mirror_distance_ratio"] <= 1.01
    assert not auto_part.fit_info["flips_used"] and auto_part.fit_info["mirror_distance_ratio"] > 1.2
    # The same banks as the fixed choices.
    mirrored = create_model("patchcore", flips=True).fit([texture[:16], texture[16:]])
    assert torch.equal(auto_texture.memory_bank, mirrored.memory_bank)
    assert torch.equal(auto_part.memory_bank, create_model("patchcore", flips=False).fit([part[:16], part[16:]]).memory_bank)


def test_flips_auto_takes_a_one_shot_iterator_and_skips_the_check_with_few_images():
    texture = textures(40, seed=8)
    for flips in ("auto", True):  # True: the generator must serve the mirrors' second pass too
        from_list = tiny_fit([texture[:16], texture[16:]], flips=flips)
        from_generator = tiny_fit((t for t in (texture[:16], texture[16:])), flips=flips)
        assert torch.equal(from_list.memory_bank, from_generator.memory_bank)
        assert from_generator.fit_info == from_list.fit_info
    few = tiny_fit([texture[:19]])  # 3 check images: too few to judge
    assert few.fit_info == {"flips_used": False, "mirror_distance_ratio": None}
    assert few.memory_bank.shape == (round(0.1 * 19 * 64), 155)


def tiny_fit(batches, **params) -> torch.nn.Module:
    """A random-init backbone (seeded) fitted on `batches`: the same backbone every call."""
    torch.manual_seed(0)
    return create_model("patchcore", weights="none", **params).fit(batches)


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_colour_columns_get_their_weight_of_an_average_layers_spread(weight):
    train = textures(8, seed=10)
    model = create_model("patchcore", weights="none", coreset_ratio=1.0, colour_weight=weight).fit([train]).eval()
    bank = model.memory_bank.double()  # every training patch, as embedded with the fitted scale
    with torch.no_grad():
        torch.testing.assert_close(model._embed(train).permute(0, 2, 3, 1).reshape(-1, 155).double(), bank)

    def spread(columns):  # mean squared distance of the patches to their mean
        return float((columns - columns.mean(0)).pow(2).sum(1).mean())

    layers = (spread(bank[:, :40]) + spread(bank[:, 40:152])) / 2
    assert spread(bank[:, 152:]) == pytest.approx(weight**2 * layers, rel=1e-6)


def fine_textures(n: int, seed: int) -> torch.Tensor:
    """Fine grain (2-px noise) under one fixed tint: each 8-px cell's mean colour is nearly constant."""
    g = torch.Generator().manual_seed(seed)
    noise = F.interpolate(torch.randn(n, 1, SIZE // 2, SIZE // 2, generator=g), size=(SIZE, SIZE), mode="bilinear")
    return ((0.45 + 0.12 * noise) * torch.tensor([0.8, 1.0, 0.7]).view(1, 3, 1, 1)).clamp(0, 1)


@pytest.mark.parametrize("shift", [0.08, -0.08])
def test_colour_sees_a_stain_that_keeps_the_texture_and_ignores_overall_brightness(shift):
    train = [batch(fine_textures(6, 0)), batch(fine_textures(6, 1))]
    with_colour = create_model("patchcore", colour_weight=0.5).fit(train).eval()
    plain = create_model("patchcore", colour_weight=0.0).fit(train).eval()
    normal = fine_textures(8, seed=11)
    stained = normal.clone()
    stained[:, :, SQUARE[0], SQUARE[1]] += shift  # paler or darker; the grain unchanged
    with torch.no_grad():
        # Relative colour: a uniformly brighter photo has the same colour columns.
        torch.testing.assert_close(with_colour._embed(normal + 0.05)[:, 152:], with_colour._embed(normal)[:, 152:],
                                   rtol=0, atol=1e-4)
        gain = (with_colour(stained).score / with_colour(normal).score).mean()
        plain_gain = (plain(stained).score / plain(normal).score).mean()
    # Measured: the stain raises the plain features' scores by ~5 %, with colour (weight 0.5) by 17-26 %.
    assert plain_gain < 1.1 and gain > plain_gain + 0.08


# --------------------------------------------------------------------------- determinism and checkpoints
def test_same_seed_same_bank_other_seed_other_bank():
    a, b = tiny(seed=3), tiny(seed=3)
    b.backbone.load_state_dict(a.backbone.state_dict())  # random inits differ; compare the selection only
    b.fit([batch(textures(4, 0)), textures(4, 1)])
    assert torch.equal(a.memory_bank, b.memory_bank)
    b.hparams["seed"] = 4
    b.fit([batch(textures(4, 0)), textures(4, 1)])
    assert not torch.equal(a.memory_bank, b.memory_bank)


def test_state_dict_round_trip_into_a_fresh_model():
    model = tiny()
    images = textures(2, seed=8)
    fresh = create_model("patchcore", weights="none")  # another random backbone, an empty bank
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        before, after = model(images), fresh(images)
    assert fresh.memory_bank.shape == model.memory_bank.shape
    assert torch.equal(before.score, after.score) and torch.equal(before.anomaly_map, after.anomaly_map)


# --------------------------------------------------------------------------- errors
def test_predicting_before_fit_is_a_clear_error():
    with pytest.raises(AnomalensError, match=r"^PatchCore is not fitted; call fit\(\) first\.$"):
        create_model("patchcore", weights="none")(textures(1, seed=9))


def test_fitting_on_nothing_is_a_data_error():
    with pytest.raises(DataError, match="PatchCore.fit got no training images"):
        create_model("patchcore", weights="none").fit([])


@pytest.mark.parametrize("param, value, expected", [
    ("coreset_ratio", 0, "a float in (0, 1]"),
    ("coreset_ratio", 1.5, "a float in (0, 1]"),
    ("projection_dim", 0, "an int in [1, inf)"),
    ("num_neighbors", 0, "an int in [1, inf)"),
    ("neighbourhood", 2, "one of 1, 3, 5, 7, 9"),
    ("blur_sigma", -1.0, "a float in [0, inf)"),
    ("colour_weight", -0.5, "a float in [0, inf)"),
])
def test_invalid_parameters_raise_the_standard_message(param, value, expected):
    message = f"The '{param}' parameter of PatchCore must be {expected}. Got {value!r} instead."
    with pytest.raises(ConfigError) as info:
        create_model("patchcore", weights="none", **{param: value})
    assert str(info.value) == message
