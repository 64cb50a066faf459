"""Config loading, validation messages and dotted overrides."""
import pytest

from anomalens.cli import parse_overrides
from anomalens.config import apply_overrides, config_from_dict, dump_yaml, load_config
from anomalens.errors import ConfigError


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    config = config_from_dict({})
    assert config.model_name == "padim" and config.dataset.image_size == 256 and config.seed == 42
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(config))
    assert load_config(path) == config


@pytest.mark.parametrize("data, message", [
    ({"datset": {}}, r"Unknown config key 'datset'\. Did you mean 'dataset'\? Allowed keys in the config: "),
    ({"dataset": {"imgsize": 3}}, r"Unknown config key 'dataset\.imgsize'\. .*Allowed keys in 'dataset': abnormal_dir, batch_size, "),
    ({"dataset": {"image_size": 0}},
     r"^The 'dataset\.image_size' parameter of the config must be an int in \[32, 4096\]\. Got 0 instead\.$"),
    ({"dataset": {"image_size": "big"}}, r"The 'dataset\.image_size' parameter of the config must be an int"),
    ({"dataset": {"format": "coco"}},
     r"The 'dataset\.format' parameter of the config must be one of 'demo', 'mvtec', .* Got 'coco' instead\."),
    ({"dataset": {"val_ratio": 1.0}}, r"'dataset\.val_ratio' parameter of the config must be a float in \(0, 1\)"),
    ({"postprocess": {"threshold": "otsu"}}, r"'postprocess\.threshold' parameter .* Got 'otsu' instead"),
    ({"visualization": {"save_images": "yes"}}, r"'visualization\.save_images' parameter .* must be a bool"),
    ({"seed": -1}, r"The 'seed' parameter of the config must be an int in \[0, "),
    ({"model": {"name": "patchcor"}}, r"Unknown model 'patchcor'\. Available models: .*patchcore"),
    ({"model": {"name": "padim", "k": 3}}, r"Unknown parameter 'k' for PaDiM\. Allowed: "),
    ({"model": "padim"}, r"The config section 'model' must be a mapping with a 'name'"),
    ({"dataset": [1, 2]}, r"The config section 'dataset' must be a mapping"),
])
def test_every_mistake_has_one_clear_message(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_ints_are_accepted_for_float_fields_and_stored_as_float():
    config = config_from_dict({"postprocess": {"manual_threshold": 3}})
    assert config.postprocess.manual_threshold == 3.0 and isinstance(config.postprocess.manual_threshold, float)


def test_cli_overrides_parse_like_yaml_and_apply_to_nested_keys():
    overrides = parse_overrides(["--dataset.root", "/data/mvtec", "--dataset.category=bottle", "--seed", "7",
                                 "--model.layers", "[blocks.2, blocks.4]", "--postprocess.manual_threshold", "null"])
    assert overrides == {"dataset.root": "/data/mvtec", "dataset.category": "bottle", "seed": 7,
                         "model.layers": ["blocks.2", "blocks.4"], "postprocess.manual_threshold": None}
    data = apply_overrides({"model": {"name": "padim"}}, overrides)
    assert data["dataset"]["category"] == "bottle" and data["model"]["layers"] == ["blocks.2", "blocks.4"]


@pytest.mark.parametrize("argv, message", [
    (["--dataset.root"], r"The override --dataset\.root needs a value"),
    (["stray"], r"Unexpected argument 'stray'"),
])
def test_bad_overrides(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides(argv)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match=r"Config file not found: '.*nope\.yaml'\."):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_config(bad)


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    from anomalens.registry import list_models

    # One ready-to-train YAML per registered model.
    assert {p.stem for p in configs} == set(list_models())
    for path in configs:
        config = load_config(path)
        assert config.model_name == path.stem
