"""`vitkit pretrain mae|simmim|dino ENCODER --dataset digits`, then `vitkit train --init FILE`."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from backends_tests.helpers import as_numpy
from vitkit import cli
from vitkit.registry import get_spec


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One short MAE pre-training of the digits ViT, shared by the fine-tuning tests."""
    out = tmp_path_factory.mktemp("mae")
    args = ["pretrain", "mae", "vit", "--epochs", 3, "--limit", 192, "--out", out, "--verbose", 0]
    assert cli.main([str(a) for a in args]) == 0
    return out


def check_pretraining(out, method):
    report = json.loads((out / "pretrain.json").read_text())
    assert report["method"] == method and len(report["loss"]) == 3
    assert report["loss"][-1] < report["loss"][0], report["loss"]
    encoder = keras.saving.load_model(out / "encoder.keras")
    assert type(encoder).__name__ == "ViT"
    logits = as_numpy(encoder(np.zeros((2, 16, 16, 1), "float32")))
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


def test_mae_pretraining_saves_an_encoder(pretrained):
    check_pretraining(pretrained, "mae")


@pytest.mark.parametrize("method", ["simmim", "dino"])
def test_simmim_and_dino_pretraining_save_an_encoder(method, tmp_path):
    args = ["pretrain", method, "vit", "--epochs", 3, "--limit", 192, "--out", tmp_path]
    assert cli.main([str(a) for a in [*args, "--verbose", 0]]) == 0
    check_pretraining(tmp_path, method)


def test_init_copies_every_weight_that_fits(pretrained):
    saved = keras.saving.load_model(pretrained / "encoder.keras")
    spec, config = cli.model_config("vit", num_classes=4, channels=1)  # another head
    model = spec.cls(**config).build_default()
    report = cli.initialize_from(model, pretrained / "encoder.keras")
    assert "kept as initialized: head/kernel, head/bias" in report, report
    source = {w.path.split("/", 1)[1]: as_numpy(w) for w in saved.weights}
    for w in model.weights:
        place = w.path.split("/", 1)[1]
        if not place.startswith("head/"):
            np.testing.assert_array_equal(as_numpy(w), source[place], err_msg=place)


def test_train_fine_tunes_from_the_pretrained_encoder(pretrained, tmp_path, capsys):
    args = ["train", "vit", "--init", pretrained / "encoder.keras", "--epochs", 1]
    assert (
        cli.main([str(a) for a in [*args, "--limit", 64, "--out", tmp_path, "--verbose", 0]]) == 0
    )
    assert "initialized 56 of 56 weights from" in capsys.readouterr().out
    assert (tmp_path / "model.keras").is_file()


def test_init_from_another_architecture_is_one_line(pretrained, tmp_path, capsys):
    args = ["train", "simple_vit", "--init", pretrained / "encoder.keras", "--epochs", 1]
    assert cli.main([str(a) for a in [*args, "--out", tmp_path]]) == 1
    err = capsys.readouterr().err
    assert "holds a ViT, not a SimpleViT" in err and len(err.strip().splitlines()) == 1


def test_pretrain_names_what_it_cannot_build(capsys):
    assert cli.main(["pretrain", "mae", "cvt", "--epochs", "1"]) == 1
    assert "cannot build MAE around CvT" in capsys.readouterr().err
    assert get_spec("cvt")  # the architecture exists; it lacks the ViT interface
