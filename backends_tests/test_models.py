"""The harness every registered model joins by registering itself: run on each backend."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import vitkit
from backends_tests.helpers import (
    BACKEND,
    as_numpy,
    batch_norm_statistics,
    compiled_forward_batches,
    gradients,
    random_images,
    template_task,
)
from vitkit.layers.utils import KERAS_BASE_KWARGS, constructor_args

MODELS = vitkit.list_models()


def build(name, **overrides):
    spec = vitkit.get_spec(name)
    return spec.cls(**{**spec.tiny, **overrides})


def outputs(model, x, **kwargs):
    """Every output of a forward pass, as numpy (models may return a tuple)."""
    return [as_numpy(y) for y in keras.tree.flatten(model(x, **kwargs))]


@pytest.mark.parametrize("name", MODELS)
def test_forward_shapes_and_data_formats(name):
    spec = vitkit.get_spec(name)
    model = build(name)
    x = random_images(model, 3)
    y3 = outputs(model, x)
    y1 = outputs(model, x[:1])
    assert y3[0].shape == (3, spec.tiny["num_classes"])
    for a, b in zip(y1, y3):
        assert a.shape == (1, *b.shape[1:])
        # Each sample is processed on its own: batch 1 gives the first row of batch 3.
        np.testing.assert_allclose(a, b[:1], rtol=1e-5, atol=1e-5)
        assert np.all(np.isfinite(b))

    first = build(name, data_format="channels_first")
    first.build_default()
    first.set_weights(model.get_weights())
    for a, b in zip(outputs(first, x.transpose(0, 3, 1, 2)), y3):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_initial_weights_follow_the_global_seed(name):
    """`keras.utils.set_random_seed` decides every random initial weight: the same seed gives the
    same model, another seed changes every weight that is not a constant, and no two random
    weights of a model start equal (an initializer shared with a fixed seed breaks all three)."""

    def initial(seed):
        keras.utils.set_random_seed(seed)
        model = build(name)
        model.build_default()
        return [(w.path, as_numpy(w)) for w in model.trainable_weights]

    first, again, other = initial(0), initial(0), initial(1)
    assert len(again) == len(other) == len(first)
    for (path, a), (_, b) in zip(first, again):
        np.testing.assert_array_equal(b, a, err_msg=path)
    random = [i for i, (_, w) in enumerate(first) if w.size > 1 and np.ptp(w) > 0]
    assert random, "no randomly initialized weight"
    unchanged = [first[i][0] for i in random if np.array_equal(other[i][1], first[i][1])]
    assert not unchanged, f"the same under another seed: {unchanged}"
    seen = {}
    for i in random:
        path, w = first[i]
        key = (w.shape, w.tobytes())
        assert key not in seen, f"{path} starts equal to {seen[key]}"
        seen[key] = path


@pytest.mark.parametrize("name", MODELS)
def test_every_weight_gets_a_gradient(name):
    model = build(name)
    x = random_images(model, 2)
    weights = model.build_default().trainable_weights
    assert weights, "a model with no trainable weights"
    grads = gradients(model, x, weights)
    for weight, grad in zip(weights, grads):
        assert grad is not None, f"{weight.path}: no gradient"
        grad = as_numpy(grad)
        assert np.all(np.isfinite(grad)), f"{weight.path}: non-finite gradient"
        assert np.any(grad != 0), f"{weight.path}: gradient is zero everywhere"


@pytest.mark.parametrize("name", MODELS)
def test_fit_lowers_the_loss(name):
    spec = vitkit.get_spec(name)
    model = build(name)
    x, y = template_task(model, spec.tiny["num_classes"])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    heads = len(keras.tree.flatten(model(x[:1])))
    if heads == 1:
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss, metrics=["accuracy"])
    else:  # the first output is the classifier; the others (a distillation head) get no loss
        extra = [None] * (heads - 1)
        model.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            loss=[loss, *extra],
            metrics=[["accuracy"], *extra],
        )
        y = (y,) * heads
    initial = batch_norm_statistics(model)
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    history = model.fit(x, y, batch_size=16, epochs=6, verbose=0)
    trained = batch_norm_statistics(model)
    after = model.evaluate(x, y, verbose=0, return_dict=True)
    assert np.all(np.isfinite(history.history["loss"]))
    # BatchNorm: the moving statistics follow the batches in training and stay in inference.
    for path, value in batch_norm_statistics(model).items():
        assert not np.allclose(initial[path], trained[path]), f"{path} did not move in fit"
        np.testing.assert_array_equal(value, trained[path], err_msg=f"{path} moved in evaluate")
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert after["accuracy"] > 0.8, (before, after)


@pytest.mark.parametrize("name", MODELS)
def test_config_is_exactly_the_constructor_arguments(name):
    model = build(name)
    config = model.get_config()
    assert set(config) == set(constructor_args(type(model))) | KERAS_BASE_KWARGS
    clone = type(model).from_config(config)
    assert clone.get_config() == config


@pytest.mark.parametrize("name", MODELS)
def test_keras_file_round_trip(name, tmp_path):
    model = build(name)
    x = random_images(model, 2)
    expected = outputs(model, x)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is type(model)
    assert loaded.get_config() == model.get_config()
    for a, b in zip(outputs(loaded, x), expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", MODELS)
def test_compiled_forward_matches_eager(name):
    """One compiled function serves batches of 2 and then 3, traced once with the batch
    dimension unknown (so no retracing per batch size), and gives the eager numbers for each
    sample."""
    model = build(name)
    x = random_images(model, 3)
    eager = outputs(model, x, training=False)
    results, traces = compiled_forward_batches(model, [x[:2], x])
    for batch, result in zip((2, 3), results):
        compiled = [as_numpy(y) for y in keras.tree.flatten(result)]
        for a, b in zip(compiled, eager, strict=True):
            np.testing.assert_allclose(a, b[:batch], rtol=1e-5, atol=1e-5)
    assert traces == 1, f"traced {traces} times for two batch sizes"


@pytest.mark.parametrize("name", MODELS)
def test_mixed_bfloat16(name):
    model = build(name, dtype="mixed_bfloat16")
    for y in keras.tree.flatten(model(random_images(model, 2))):
        assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
        assert np.all(np.isfinite(as_numpy(y)))
    assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in model.weights)


@pytest.mark.parametrize("name", MODELS)
def test_unknown_keyword_is_a_type_error(name):
    with pytest.raises(TypeError, match="patch_sise"):
        build(name, patch_sise=4)


@pytest.mark.parametrize(
    "name, overrides, parameter",
    [(name, o, p) for name in MODELS for o, p in vitkit.get_spec(name).invalid],
)
def test_invalid_configuration_names_the_parameter(name, overrides, parameter):
    with pytest.raises(ValueError, match=f"`{parameter}`"):
        build(name, **overrides)


@pytest.mark.parametrize("name", MODELS)
def test_wrong_inputs_give_clear_errors(name):
    model = build(name)
    x = random_images(model, 2)
    channels = x.shape[-1]
    with pytest.raises(ValueError, match=r"rank 4.*rank 3"):
        model(x[0])
    with pytest.raises(ValueError, match=rf"{channels} channels.*{channels + 1} channels"):
        model(np.concatenate([x, x[..., :1]], axis=-1))
    h, w = x.shape[1:3]
    spec = vitkit.get_spec(name)
    if spec.any_size:  # nothing to refuse: one more row must work
        (y, *_) = outputs(model, random_images(model, 2, size=(h + 1, w)))
        assert y.shape == (2, spec.tiny["num_classes"])
    else:
        bad_h, bad_w = spec.invalid_size or (h + 1, w)
        with pytest.raises(ValueError, match=rf"{bad_h}x{bad_w}"):
            model(random_images(model, 2, size=(bad_h, bad_w)))
    first = build(name, data_format="channels_first")
    with pytest.raises(ValueError, match="channels_first"):
        first(x)  # channels_last images given to a channels_first model


def test_backend_is_the_sessions():
    assert keras.config.backend() == BACKEND


if BACKEND == "torch":

    @pytest.mark.parametrize("name", MODELS)
    def test_torch_builds_on_the_meta_device(name):
        """Keras on torch infers shapes on the "meta" device (no arithmetic) and, when an op
        fails there, silently reruns the model on real tensors with a batch of 83: building
        T2T-ViT-14 took 42 s instead of 0.4 s that way. Every model must pass on meta."""
        import torch
        from keras.src.backend.torch.core import device_scope

        model = build(name)
        with device_scope("meta"):
            y = keras.tree.flatten(model(torch.ones(model.default_input_shape(2))))
        assert all(t.device.type == "meta" and t.shape[0] == 2 for t in y)
