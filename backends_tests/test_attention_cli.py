"""`vitkit attention MODEL_FILE IMAGE --out attn.png`: the class-token attention rollout of a
saved ViT drawn over an image, and one-line errors for what cannot be drawn."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import vitkit
from vitkit import cli
from vitkit.models.vit import VIT_TINY, ViT


@pytest.fixture
def picture(tmp_path):
    """A 40x30 RGB picture: a bright square on a dark gradient."""
    pixels = np.zeros((30, 40, 3), "uint8")
    pixels[..., 0] = np.linspace(0, 90, 40, dtype="uint8")
    pixels[8:20, 10:24] = 230
    path = tmp_path / "picture.png"
    Image.fromarray(pixels).save(path)
    return path


def saved(tmp_path, model, name="model.keras"):
    model.build_default()
    path = tmp_path / name
    model.save(path)
    return path


def test_attention_picture_of_a_vit(tmp_path, picture, capsys):
    model_file = saved(tmp_path, ViT(**VIT_TINY))
    out = tmp_path / "attn.png"
    assert cli.main(["attention", str(model_file), str(picture), "--out", str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    with Image.open(out) as png:
        width, height = png.size
        pixels = np.asarray(png.convert("RGB"), "float32")
    assert 500 < width < 1000 and 200 < height < 600
    assert pixels.std() > 20  # not blank: the picture and a coloured heat map
    colourful = np.abs(pixels[..., 0] - pixels[..., 2]) > 60  # jet's reds and blues
    assert colourful.mean() > 0.02


def test_attention_picture_of_a_mean_pooled_grayscale_vit(tmp_path, picture):
    """No class token: the mean of the rows; a one-channel model reads the picture as gray."""
    config = dict(VIT_TINY, pool="mean", channels=1)
    model_file = saved(tmp_path, ViT(**config))
    out = tmp_path / "mean.png"
    assert cli.main(["attention", str(model_file), str(picture), "--out", str(out)]) == 0
    assert out.stat().st_size > 5_000


@pytest.mark.parametrize(
    "case, message",
    [
        ("no model", "does not exist"),
        ("no image", "image"),
        ("pit", "cannot picture the attention of"),
    ],
)
def test_attention_errors_are_one_line(tmp_path, picture, capsys, case, message):
    if case == "pit":  # pooling stages change the token count: no single rollout
        spec = vitkit.get_spec("pit")
        model_file = saved(tmp_path, spec.cls(**spec.tiny))
        message = f"{message} {model_file}: PiT's attention maps change shape"
    else:
        model_file = tmp_path / "missing.keras"
        if case == "no image":
            model_file = saved(tmp_path, ViT(**VIT_TINY))
            picture = tmp_path / "missing.png"
            message = f"image {picture} does not exist"
    out = tmp_path / "attn.png"
    assert cli.main(["attention", str(model_file), str(picture), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert "Traceback" not in err[0] and not out.exists()
