"""Exports from the session's backend, for every registered model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import vitkit
from backends_tests.helpers import BACKEND, as_numpy, random_images
from vitkit.exporting import FORMATS

MODELS = vitkit.list_models()
CASES = [(name, fmt) for name in MODELS for fmt in FORMATS]


def tiny(name):
    spec = vitkit.get_spec(name)
    return spec.cls(**spec.tiny)


def run_export(path, fmt, images):
    """Outputs of an exported artifact, loaded with its own runtime (no Keras)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path))
        (name,) = [i.name for i in session.get_inputs()]
        return [np.asarray(y) for y in session.run(None, {name: images})]
    import tensorflow as tf

    artifact = tf.saved_model.load(str(path))
    return [y.numpy() for y in tf.nest.flatten(artifact.serve(tf.constant(images)))]


@pytest.mark.parametrize("name, fmt", CASES)
def test_export_reproduces_the_model_at_any_batch_size(name, fmt, tmp_path):
    model = tiny(name)
    spec = vitkit.get_spec(name)
    path = tmp_path / ("model.onnx" if fmt == "onnx" else "saved_model")
    if fmt in spec.export_gaps:
        with pytest.raises(vitkit.ExportError, match=rf"{type(model).__name__}.*{fmt}"):
            vitkit.export(model, path, format=fmt)
        return
    # The export's image size is the one the tests feed (a model without a configured size,
    # CvT, is fed its registry entry's `input_size`).
    vitkit.export(model, path, format=fmt, input_shape=random_images(model, 1).shape[1:])
    for batch in (3, 1):  # the export has a dynamic batch dimension
        images = random_images(model, batch, seed=batch)
        expected = [as_numpy(y) for y in keras.tree.flatten(model(images, training=False))]
        got = run_export(path, fmt, images)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_format_and_mixed_precision_are_refused(tmp_path):
    model = tiny("vit")
    with pytest.raises(ValueError, match="`format` must be one of"):
        vitkit.export(model, tmp_path / "x", format="tflite")
    spec = vitkit.get_spec("vit")
    mixed = spec.cls(**spec.tiny, dtype="mixed_bfloat16")
    with pytest.raises(vitkit.ExportError, match="float32"):
        vitkit.export(mixed, tmp_path / "x", format="onnx")


if BACKEND == "torch":
    # On the torch backend a vitkit model *is* a torch.nn.Module.
    import torch

    @pytest.mark.parametrize("name", MODELS)
    def test_torch_export_export_works_on_the_model(name):
        model = tiny(name)
        images = torch.from_numpy(random_images(model, 2))
        model.eval()
        expected = [as_numpy(y) for y in keras.tree.flatten(model(images))]
        program = torch.export.export(model, (images,))
        got = [as_numpy(y) for y in keras.tree.flatten(program.module()(images))]
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("name", MODELS)
    def test_plain_torch_training_loop(name):
        model = tiny(name)
        assert isinstance(model, torch.nn.Module)
        model.build_default()
        images = torch.from_numpy(random_images(model, 8))
        labels = torch.arange(8)
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == len(model.trainable_weights)
        before = [p.detach().clone() for p in params]
        optimizer = torch.optim.AdamW(params, lr=3e-3)
        losses = []
        for _ in range(15):
            optimizer.zero_grad()
            # Every head learns (LeViT's distillation head too), each with its own classes.
            loss = sum(
                torch.nn.functional.cross_entropy(logits, labels % logits.shape[-1])
                for logits in keras.tree.flatten(model(images, training=True))
            )
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], losses
        assert all(not torch.equal(a, b) for a, b in zip(before, params))
