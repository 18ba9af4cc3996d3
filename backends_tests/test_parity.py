"""Same weights in, same numbers out as vit-pytorch 1.26.11, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitkit
from backends_tests.helpers import (
    BACKEND,
    as_numpy,
    compiled_forward,
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
    """The model's inference outputs. On JAX through `jax.jit`, as `predict` and `fit` run
    it: eager JAX compiles every op for every new shape (~25 ms each on this CPU), which made
    the parity tests the slowest in the suite. Eager and jit agreeing is tested elsewhere."""
    if BACKEND == "jax":
        return as_numpy(compiled_forward(model, x))
    return as_numpy(model(x, training=False))


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
    h, w = (
        config["image_size"]
        if isinstance(config["image_size"], tuple)
        else (config["image_size"],) * 2
    )
    x = np.random.default_rng(index).normal(size=(3, config.get("channels", 3), h, w))
    x = x.astype("float32")
    expected = reference_forward(name, ref, ours, x)
    got = inference(ours, x.transpose(0, 2, 3, 1))
    assert got.shape == expected.shape
    assert rel_err(got, expected) < TOLERANCE

    # channels_first takes the reference's layout directly.
    first = from_vit_pytorch(spec.cls(**config, data_format="channels_first"), ref.state_dict())
    assert rel_err(inference(first, x), expected) < TOLERANCE


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
