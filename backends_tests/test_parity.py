"""Same weights in, same numbers out as vit-pytorch 1.26.11, on every backend."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

import vitkit
from backends_tests.helpers import (
    BACKEND,
    as_numpy,
    compiled_forward,
    image_size,
    randomize_torch,
    reference_class,
    rel_err,
)
from backends_tests.reference import reference_forward, reference_kwargs
from vitkit.convert import from_vit_pytorch, vit_pytorch_keys

CASES = [
    (name, i) for name in vitkit.list_models() for i in range(len(vitkit.get_spec(name).parity))
]
TOLERANCE = 1e-4


def inference(model, x):
    """The model's inference outputs, as a list. On JAX through `jax.jit`, as `predict` and
    `fit` run it: eager JAX compiles every op for every new shape (~25 ms each on this CPU),
    which made the parity tests the slowest in the suite. Eager and jit agreeing is tested
    elsewhere."""
    outputs = compiled_forward(model, x) if BACKEND == "jax" else model(x, training=False)
    return [as_numpy(y) for y in keras.tree.flatten(outputs)]


def reference_pair(name, index, seed=0):
    spec = vitkit.get_spec(name)
    config = spec.parity[index]
    torch.manual_seed(seed)
    ref = randomize_torch(reference_class(spec)(**reference_kwargs(config)), seed=seed).eval()
    return spec, config, ref


@pytest.mark.parametrize("name, index", CASES)
def test_matches_vit_pytorch(name, index):
    spec, config, ref = reference_pair(name, index)
    ours = from_vit_pytorch(spec.cls(**config), ref.state_dict())
    h, w = image_size(ours)
    x = np.random.default_rng(index).normal(size=(3, ours.input_channels, h, w))
    x = x.astype("float32")
    # A model may return several outputs (LeViT's distillation head): compare each.
    expected = keras.tree.flatten(reference_forward(name, ref, ours, x))
    got = inference(ours, x.transpose(0, 2, 3, 1))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert rel_err(a, b) < TOLERANCE

    # channels_first takes the reference's layout directly.
    first = from_vit_pytorch(spec.cls(**config, data_format="channels_first"), ref.state_dict())
    for a, b in zip(inference(first, x), expected, strict=True):
        assert rel_err(a, b) < TOLERANCE


@pytest.mark.parametrize("name", vitkit.list_models())
def test_state_dict_keys_and_shapes_match_the_reference(name):
    spec, config, ref = reference_pair(name, 0)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert vit_pytorch_keys(spec.cls(**config)) == expected


@pytest.mark.parametrize("name", vitkit.list_models())
def test_bad_state_dicts_list_every_problem(name):
    spec, config, ref = reference_pair(name, 0)
    state = dict(ref.state_dict())
    dropped = sorted(state)[0]
    reshaped = sorted(state)[-1]
    del state[dropped]
    state[reshaped] = torch.zeros(7, 1, 3)
    state["not.a.weight"] = torch.zeros(2)
    model = spec.cls(**config)
    with pytest.raises(ValueError) as err:
        from_vit_pytorch(model, state)
    message = str(err.value)
    assert f"missing (1): {dropped}" in message
    assert "unexpected (1): not.a.weight" in message
    assert f"mis-shaped (1): {reshaped}: checkpoint (7, 1, 3)" in message


@pytest.mark.parametrize("name", vitkit.list_models())
def test_numpy_state_dicts_load_too(name):
    spec, config, ref = reference_pair(name, 0)
    numpy_state = {k: v.numpy() for k, v in ref.state_dict().items()}
    a = from_vit_pytorch(spec.cls(**config), numpy_state)
    b = from_vit_pytorch(spec.cls(**config), ref)  # the module itself works as well
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
