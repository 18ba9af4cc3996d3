"""Files from strangers and inputs from anywhere: refused clearly, never run, never a crash
from deep inside."""

from __future__ import annotations

import ast
import io
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

import vitkit
from backends_tests.helpers import as_numpy, jit_forward, random_images
from vitkit import CheckpointError, cli
from vitkit.convert import from_vit_pytorch

MODELS = vitkit.list_models()
PACKAGE = Path(vitkit.__file__).parent


def build(name, **overrides):
    spec = vitkit.get_spec(name)
    return spec.cls(**{**spec.tiny, **overrides})


# No code in our own models ---------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_no_layer_of_a_model_is_a_lambda(name):
    model = build(name)  # the layers exist once constructed
    layers = list(model._flatten_layers(include_self=False))
    assert len(layers) >= 3
    lambdas = [layer.path for layer in layers if isinstance(layer, keras.layers.Lambda)]
    assert not lambdas, f"{name} uses Lambda layers: {lambdas}"


def test_no_vitkit_source_names_a_lambda_layer():
    """Trainers and layers too: no `Lambda` name anywhere in the package's code."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Name, ast.Attribute)):
                name = node.id if isinstance(node, ast.Name) else node.attr
                if name == "Lambda":
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found


def test_keras_is_recent_enough_for_safe_mode():
    major, minor = (int(part) for part in keras.__version__.split(".")[:2])
    assert (major, minor) >= (3, 14)  # earlier releases carry published safe_mode bypasses


# Hostile and broken .keras files -------------------------------------------------------------


def lambda_model_file(path, marker):
    """A `.keras` file whose Lambda layer creates `marker` whenever its code runs."""

    def touch(x, marker):
        __import__("pathlib").Path(marker).touch()
        return x

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(touch, arguments={"marker": str(marker)})(inputs)
    keras.Model(inputs, outputs).save(path)
    Path(marker).unlink(missing_ok=True)  # the layer ran while the model was built
    return path


def test_a_keras_file_with_a_lambda_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "the-lambda-ran"
    path = lambda_model_file(tmp_path / "hostile.keras", marker)
    with pytest.raises(CheckpointError, match="code that would run on loading") as err:
        vitkit.load_model(path)
    assert str(path) in str(err.value)
    assert cli.main(["evaluate", str(path)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "hostile.keras" in lines[0] and "safe mode" in lines[0]
    assert not marker.exists()


@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory):
    model = build("vit").build_default()
    path = tmp_path_factory.mktemp("saved") / "vit.keras"
    model.save(path)
    return path


def test_the_safe_loader_loads_a_vitkit_file(saved_vit):
    model = vitkit.load_model(saved_vit)
    x = random_images(model, 2)
    original = keras.saving.load_model(saved_vit)
    np.testing.assert_allclose(as_numpy(model(x)), as_numpy(original(x)), rtol=1e-6, atol=1e-6)


def corrupt(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "flipped bytes":  # the zip's directory intact, a member's bytes changed
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            info = archive.getinfo("model.weights.h5")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 100
        return data[:start] + bytes(b ^ 0xFF for b in data[start : start + 64]) + data[start + 64 :]
    if how == "no config":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("metadata.json", "{}")
        return buffer.getvalue()
    return b"\x00" * 10 + data[10:]  # "bad header"


@pytest.mark.parametrize("how", ["truncated", "flipped bytes", "no config", "bad header"])
def test_a_broken_keras_file_gives_one_clear_error(saved_vit, tmp_path, how, capsys):
    path = tmp_path / "broken.keras"
    path.write_bytes(corrupt(saved_vit.read_bytes(), how))
    with pytest.raises(CheckpointError) as err:
        vitkit.load_model(path)
    assert str(path) in str(err.value)
    assert cli.main(["predict", str(path), str(path)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "broken.keras" in lines[0], lines
    assert "Traceback" not in lines[0]


# vit-pytorch checkpoints: tensors only ---------------------------------------------------------


@pytest.fixture(scope="module")
def reference_vit():
    import torch
    from vit_pytorch.vit import ViT

    spec = vitkit.get_spec("vit")
    config = {k: v for k, v in spec.tiny.items() if k != "data_format"}
    torch.manual_seed(0)
    return config, ViT(**config).eval()


def test_a_vit_pytorch_checkpoint_file_loads(reference_vit, tmp_path):
    import torch

    config, reference = reference_vit
    path = tmp_path / "vit.pt"
    torch.save({"state_dict": reference.state_dict()}, path)
    model = from_vit_pytorch(build("vit"), path)
    from_module = from_vit_pytorch(build("vit"), reference)
    for a, b in zip(model.weights, from_module.weights):
        np.testing.assert_array_equal(as_numpy(a), as_numpy(b))


def test_a_safetensors_checkpoint_loads(reference_vit, tmp_path):
    from safetensors.torch import save_file

    config, reference = reference_vit
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = from_vit_pytorch(build("vit"), path)
    x = random_images(model, 2)
    import torch

    with torch.no_grad():
        expected = reference(torch.as_tensor(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(as_numpy(model(x)), expected, rtol=1e-4, atol=1e-4)


class Payload:
    """Unpickling this runs `open(marker, "w")`: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_runs_code_is_refused(reference_vit, tmp_path):
    import torch

    _, reference = reference_vit
    marker = tmp_path / "the-payload-ran"
    path = tmp_path / "hostile.pt"
    torch.save({**reference.state_dict(), "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True") as err:
        from_vit_pytorch(build("vit"), path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_no_torch_load_without_weights_only():
    calls = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load":
                owner = getattr(node.func.value, "id", None)
                keywords = {k.arg: k.value for k in node.keywords}
                safe = isinstance(keywords.get("weights_only"), ast.Constant) and (
                    keywords["weights_only"].value is True
                )
                if owner == "torch" and not safe:
                    calls.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not calls


# Inputs of the wrong dtype, eager and compiled ------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_integer_images_are_cast_and_other_dtypes_refused(name):
    model = build(name)
    x = random_images(model, 2)
    pixels = np.clip(np.round(x * 40 + 128), 0, 255).astype("uint8")
    expected = as_numpy(keras.tree.flatten(model(pixels.astype("float32")))[0])
    got = as_numpy(keras.tree.flatten(model(pixels))[0])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for bad, named in (
        (x > 0, "bool"),
        (x.astype("complex64"), "complex64"),
        (x.astype(str), "<U"),
    ):
        with pytest.raises(ValueError, match=rf"float or integer dtype; got .*{named}"):
            model(bad)


@pytest.mark.parametrize("name", MODELS)
def test_wrong_inputs_give_clear_errors_when_compiled(name):
    """The checks of `test_wrong_inputs_give_clear_errors` hold inside jax.jit, tf.function
    with XLA and torch.compile: the shapes are static there, and checked while tracing."""
    spec = vitkit.get_spec(name)
    model = build(name).build_default()
    forward = jit_forward(model)
    x = random_images(model, 2)
    channels = x.shape[-1]
    cases = [
        (x[0], r"rank 4.*rank 3"),
        (np.concatenate([x, x[..., :1]], axis=-1), rf"{channels + 1} channels"),
        (x > 0, r"float or integer dtype; got .*bool"),
    ]
    if not spec.any_size:
        bad_h, bad_w = spec.invalid_size or (x.shape[1] + 1, x.shape[2])
        cases.append((random_images(model, 2, size=(bad_h, bad_w)), rf"{bad_h}x{bad_w}"))
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            forward(bad)


def test_integer_images_compiled():
    model = build("vit").build_default()
    x = random_images(model, 2)
    pixels = np.clip(np.round(x * 40 + 128), 0, 255).astype("uint8")
    got = as_numpy(jit_forward(model)(pixels))
    np.testing.assert_allclose(got, as_numpy(model(pixels)), rtol=1e-5, atol=1e-5)
    got = as_numpy(jit_forward(model)(pixels.astype("int32")))
    np.testing.assert_allclose(got, as_numpy(model(pixels)), rtol=1e-5, atol=1e-5)
