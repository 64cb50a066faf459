"""The command line, driven as a user would: train, test, predict, models, data demo."""
import csv
import json

import pytest

from anomalens.cli import main


@pytest.fixture(scope="module")
def trained_run(tiny_demo_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("cli") / "runs"
    code = main(["train", "--config", "configs/patchcore.yaml", "--dataset.format", "mvtec",
                 "--dataset.root", str(tiny_demo_root), "--dataset.category", "brick", "--dataset.image_size", "64",
                 "--model.weights", "none", "--trainer.progress", "false", "--project.root", str(runs),
                 "--visualization.max_images", "2"])
    assert code == 0
    (run_dir,) = list(runs.glob("patchcore/mvtec/brick/*"))
    return run_dir


def test_train_prints_the_metric_table(trained_run, capsys):
    assert json.loads((trained_run / "metrics.json").read_text())["model"] == "patchcore"


def test_metric_table_shows_what_the_model_chose_from_the_data(capsys):
    from anomalens.cli import print_metrics

    print_metrics({"image_AUROC": 0.5}, "t", {"fit_seconds": 1.5},
                  {"flips_used": True, "mirror_distance_ratio": 1.00431, "note": None})
    rows = [" ".join(line.strip("│ ").split()) for line in capsys.readouterr().out.splitlines()]
    assert {"fit seconds │ 1.50", "flips used │ yes", "mirror distance ratio │ 1.004", "note │ n/a"} <= set(rows)


def test_test_command_re_evaluates_to_the_same_metrics(trained_run):
    assert main(["test", "--run", str(trained_run)]) == 0
    first = json.loads((trained_run / "metrics.json").read_text())["metrics"]
    again = json.loads((trained_run / "metrics_retest.json").read_text())["metrics"]
    assert again == pytest.approx(first, nan_ok=True)


def test_predict_writes_scores_labels_and_heat_maps(trained_run, tiny_demo_root, tmp_path):
    source = tiny_demo_root / "brick" / "test"
    assert main(["predict", "--run", str(trained_run), "--input", str(source), "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    n_images = len([p for p in source.rglob("*.png")])
    assert len(rows) == n_images
    assert {r["label"] for r in rows} <= {"good", "defect"}
    assert len(list((tmp_path / "images").rglob("*.png"))) == n_images
    # the CLI's decisions equal the run's test decisions for the same files
    scores = {r["path"]: float(r["score"]) for r in csv.DictReader(open(trained_run / "scores.csv"))}
    for row in rows:
        assert float(row["score"]) == pytest.approx(scores[row["path"]], rel=1e-4)


def test_predict_single_image(trained_run, tiny_demo_root, tmp_path):
    image = next((tiny_demo_root / "brick" / "test" / "good").glob("*.png"))
    assert main(["predict", "--run", str(trained_run), "--input", str(image), "--out", str(tmp_path),
                 "--no-images"]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "predictions.csv")))) == 1


def test_models_lists_descriptions(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "padim" in out and "patchcore" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--dataset.imgsize", "3"], "error: Unknown config key 'dataset.imgsize'. Did you mean 'image_size'?"),
    (["train", "--model.name", "nope"], "error: Unknown model 'nope'."),
    (["predict", "--run", "/nonexistent", "--input", "x"], "error: No model found at '/nonexistent': pass a run folder, its model.pt, or an exported model (.pt, .onnx, .xml)."),
])
def test_user_mistakes_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_data_demo_writes_mvtec_layout(tmp_path):
    assert main(["data", "demo", "--out", str(tmp_path), "--image-size", "64"]) == 0
    assert (tmp_path / "brick" / "train" / "good").is_dir()
    assert any((tmp_path / "brick" / "ground_truth").rglob("*_mask.png"))
