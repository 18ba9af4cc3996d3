"""The `vitkit` command, run as a user runs it, on the session's backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import vitkit
from vitkit import cli
from vitkit.data import load_digits


def run(*args, cwd=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "vitkit", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=900,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`vitkit train simple_vit --dataset digits`, shortened from 30 to 12 epochs."""
    out = tmp_path_factory.mktemp("run")
    result = run("train", "simple_vit", "--dataset", "digits", "--epochs", 12, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_train_reaches_the_accuracy_bar_and_writes_its_files(trained):
    out, result = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.90, metrics
    assert f"test accuracy: {metrics['test_accuracy']:.4f}" in result.stdout
    assert "Epoch 12/12" in result.stdout  # Keras' progress output
    assert (out / "model.keras").is_file()
    with Image.open(out / "training_curves.png") as png:
        assert png.size[0] > 400 and png.size[1] > 200
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == 12 and history["loss"][-1] < history["loss"][0]
    assert json.loads((out / "classes.json").read_text()) == [str(i) for i in range(10)]


def test_evaluate_predict_and_export_use_the_saved_model(trained, tmp_path):
    out, _ = trained
    metrics = json.loads((out / "metrics.json").read_text())
    result = run("evaluate", out / "model.keras", "--dataset", "digits")
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = float(result.stdout.split("test accuracy:")[1].split()[0])
    assert abs(accuracy - metrics["test_accuracy"]) < 1e-3

    # a real digit from the held-out split, as an 8-bit PNG
    data = load_digits()
    image = tmp_path / "digit.png"
    Image.fromarray((data.x_test[0, ..., 0] * 255).astype("uint8")).save(image)
    result = run("predict", out / "model.keras", image)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"{image}: ")

    result = run("export", out / "model.keras", "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "m.onnx").stat().st_size > 10_000


def test_list_names_every_architecture():
    result = run("list")
    assert result.returncode == 0
    for name in vitkit.list_models():
        assert name in result.stdout


def make_folder(root, classes=("cat", "dog"), per_class=6, size=(12, 10)):
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(*size, 3)) + 150 * k
            Image.fromarray(pixels.astype("uint8")).save(root / name / f"{i}.png")
    return root


def test_train_on_a_folder_of_images(tmp_path):
    folder = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    result = run(
        "train",
        "vit",
        "--dataset",
        folder,
        "--epochs",
        2,
        "--image-size",
        16,
        "--out",
        out,
        "--verbose",
        0,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["image_size"] == 16 and metrics["config"]["channels"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "vitt"], "unknown model or preset 'vitt'"),
        (["train", "vit", "--dataset", "/no/such/folder"], "does not exist"),
        (["train", "vit", "--set", "heads=0"], "`heads`"),
        (["evaluate", "/no/such/model.keras"], "does not exist"),
    ],
)
def test_bad_arguments_give_one_line(args, message):
    result = run(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_folder_with_one_class_or_a_broken_image_is_refused(tmp_path):
    one = make_folder(tmp_path / "one", classes=("only",))
    result = run("train", "vit", "--dataset", one)
    assert result.returncode != 0 and "at least 2" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1

    broken = make_folder(tmp_path / "broken")
    (broken / "dog" / "bad.png").write_bytes(b"not an image")
    result = run("train", "vit", "--dataset", broken)
    assert result.returncode != 0 and "cannot read image" in result.stderr
    assert "bad.png" in result.stderr and "Traceback" not in result.stderr

    text = tmp_path / "model.keras"
    text.write_text("not a zip")
    result = run("predict", text, broken / "cat" / "0.png")
    assert result.returncode != 0 and "not a .keras file" in result.stderr


@pytest.mark.parametrize("name", vitkit.list_models())
def test_every_model_trains_on_digits(name, tmp_path):
    """One short epoch of `vitkit train NAME` for every registered architecture."""
    code = cli.main(
        [
            "train",
            name,
            "--epochs",
            "1",
            "--limit",
            "90",  # 81 to fit, 9 to validate, 90 to test: one batch shape, one compile each
            "--batch-size",
            "9",
            "--verbose",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert (tmp_path / "model.keras").is_file()
