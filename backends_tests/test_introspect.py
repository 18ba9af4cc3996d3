"""`vitkit.Recorder` and `vitkit.Extractor`: what they return on every registered model, that
the model comes back untouched, compiled runs, and parity with vit-pytorch's Recorder and
Extractor. Attention rollout (`vitkit.attention_map`) on known matrices."""

from __future__ import annotations

import contextlib
import functools

import keras
import numpy as np
import pytest
import torch
from keras import ops

import vitkit
from backends_tests.helpers import (
    BACKEND,
    as_numpy,
    compiled_forward,
    random_images,
    randomize_torch,
    rel_err,
)
from vitkit import Extractor, Recorder
from vitkit.attention_map import attention_heatmap, attention_rollout, class_token_map
from vitkit.introspect import attention_layers
from vitkit.models.vit import VIT_PARITY, VIT_TINY, ViT
from vitkit.taps import wrapped_method

TOLERANCE = 1e-4


def tiny(name):
    spec = vitkit.get_spec(name)
    model = spec.cls(**spec.tiny)
    return model, random_images(model, 2, seed=1)


# What Keras' `Layer.__call__` notes the first time a layer is called. The recorder calls the
# attention-dropout layers, which the fused path never calls: these two may change, and only
# these.
FIRST_CALL_NOTES = {"_called", "_parent_path"}


def state(model) -> dict:
    """What must not change: the names of each layer's own attributes and the objects behind
    them (but Keras' first-call notes), the class and the config."""
    layers = {
        id(layer): (
            sorted(vars(layer)),
            {k: id(v) for k, v in vars(layer).items() if k not in FIRST_CALL_NOTES},
        )
        for layer in model._flatten_layers()
    }
    return {"layers": layers, "class": type(model), "config": model.get_config()}


def outputs(y) -> list:
    return [as_numpy(t) for t in keras.tree.flatten(y)]


def maps_of(attns) -> list:
    """The recorded maps, one per attention call, stacked or not."""
    if isinstance(attns, list):
        return attns
    return [attns[:, i] for i in range(attns.shape[1])]


@pytest.mark.parametrize("name", vitkit.list_models())
def test_recorder_on_every_model(name):
    """The model's predictions, one softmax map per attention call, and the model as it was
    after `eject` (the same attributes: the fused path again)."""
    model, x = tiny(name)
    plain = outputs(model(x))
    before = state(model)
    layers = attention_layers(model)
    assert layers, f"{name} has no shared Attention layer"
    calls = []  # the attention layers in the order they run, logged beside the recorder

    def log(layer, original, *args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(layer)
        return out

    recorder = Recorder(model)
    with contextlib.ExitStack() as taps:
        for layer in layers:
            taps.enter_context(wrapped_method(layer, "call", functools.partial(log, layer)))
        preds, attns = recorder(x)

    for got, want in zip(outputs(preds), plain, strict=True):
        assert rel_err(got, want) < 1e-5
    maps = maps_of(attns)
    assert len(maps) == len(calls) and len(recorder.recordings) == len(calls)
    shapes = [tuple(m.shape) for m in maps]
    assert isinstance(attns, list) == (len(set(shapes)) > 1)
    for attn, layer in zip(maps, calls):
        attn = as_numpy(attn)
        assert attn.ndim == 4 and attn.shape[1] == layer.heads
        assert attn.min() >= 0.0
        np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)

    assert recorder.eject() is model
    assert state(model) == before
    with pytest.raises(RuntimeError, match="ejected"):
        recorder(x)


# `predict` compiled with jit_compile=True: jax.jit over `stateless_call`, an XLA tf.function;
# and `compiled_forward`'s traces with a symbolic batch. torch.compile runs the wrappers too,
# with graph breaks at the taps (they write layers' __dict__, so not `fullgraph=True`), but
# compiling a tiny ViT that way takes 15-30 s here: torch checks eager predict.
JIT_COMPILE = BACKEND != "torch"


def test_recorder_stacks_vit_maps_and_runs_compiled():
    """(b, layers, heads, n, n) for ViT; the same maps from a compiled `predict`."""
    model = ViT(**VIT_TINY)
    x = random_images(model, 3)
    plain = as_numpy(model(x))
    recorder = Recorder(model)
    preds, attns = recorder(x)
    rows, cols = 24 // 4, 20 // 5
    assert tuple(attns.shape) == (3, VIT_TINY["depth"], VIT_TINY["heads"], rows * cols + 1) + (
        rows * cols + 1,
    )
    recorder.compile(jit_compile=JIT_COMPILE)
    compiled_preds, compiled_attns = recorder.predict(x, batch_size=3, verbose=0)
    assert rel_err(compiled_preds, as_numpy(preds)) < 1e-5
    assert rel_err(compiled_attns, as_numpy(attns)) < 1e-5
    if JIT_COMPILE:  # traced with the batch size unknown: the maps still stack
        traced_preds, traced_attns = compiled_forward(recorder, x)
        assert rel_err(as_numpy(traced_attns), as_numpy(attns)) < 1e-5
        assert rel_err(as_numpy(traced_preds), as_numpy(preds)) < 1e-5
    for layer in attention_layers(model):  # no tap left behind by the traced calls
        assert "fusable" not in vars(layer) and "call" not in vars(layer.attn_dropout)
    # ejected, the model computes exactly what it computed before it was wrapped
    recorder.eject()
    np.testing.assert_array_equal(as_numpy(model(x)), plain)
    with pytest.raises(RuntimeError, match="ejected"):
        recorder.predict(x, verbose=0)


def test_recorder_refuses_a_model_without_attention():
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="plain_mlp")
    with pytest.raises(ValueError, match="Functional contains no vitkit.layers.Attention"):
        Recorder(plain)
    with pytest.raises(TypeError, match="Keras model"):
        Recorder(lambda x: x)


def test_recorder_records_before_dropout_and_stops_gradients():
    """In training the maps are still softmaxes (recorded before attention dropout)."""
    model = ViT(**{**VIT_TINY, "dropout": 0.5})
    x = random_images(model, 2)
    _, attns = Recorder(model)(x, training=True)
    np.testing.assert_allclose(as_numpy(attns).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["vit", "deepvit", "cait", "cvt", "t2t"])
def test_extractor(name):
    model, x = tiny(name)
    plain = as_numpy(model(x))
    if hasattr(model, "transformer"):
        before = state(model)
        extractor = Extractor(model)
        preds, tokens = extractor(x)
        assert rel_err(as_numpy(preds), plain) < 1e-6
        assert tokens.shape[0] == 2 and tokens.shape[-1] == model.transformer.dim
        assert extractor.latents is tokens
        only = Extractor(model, return_embeddings_only=True)(x)
        np.testing.assert_array_equal(as_numpy(only), as_numpy(tokens))
        inputs = Extractor(model, layer_save_input=True)(x, return_embeddings_only=True)
        assert inputs.shape == tokens.shape
        assert extractor.eject() is model and state(model) == before
        with pytest.raises(RuntimeError, match="ejected"):
            extractor(x)
    else:  # a named layer or a layer object works; no `transformer` is a clear error
        with pytest.raises(ValueError, match=f"{type(model).__name__} has no layer 'transformer'"):
            Extractor(model)
        head = model.layers[-1]
        _, features = Extractor(model, layer=head, layer_save_input=True)(x)
        assert features.shape[0] == 2


def test_extractor_reads_vit_tokens():
    """The transformer's output is `encode(embed(x))`; its input `embed(x)`; a dotted path
    and a layer both work."""
    model = ViT(**VIT_TINY)
    x = random_images(model, 2)
    rows, cols = 24 // 4, 20 // 5
    tokens = Extractor(model, return_embeddings_only=True)(x)
    assert tuple(tokens.shape) == (2, rows * cols + 1, VIT_TINY["dim"])
    np.testing.assert_allclose(as_numpy(tokens), as_numpy(model.encode(model.embed(x))), atol=1e-6)
    embedded = Extractor(model, layer_save_input=True)(x, return_embeddings_only=True)
    np.testing.assert_allclose(as_numpy(embedded), as_numpy(model.embed(x)), atol=1e-6)
    normed = Extractor(model, layer="transformer.norm")(x, return_embeddings_only=True)
    np.testing.assert_allclose(as_numpy(normed), as_numpy(tokens), atol=1e-6)
    with pytest.raises(ValueError, match="ViT has no layer 'to_latent'"):
        Extractor(model, layer_name="to_latent")
    detached = Extractor(model, detach=False)
    assert detached(x, return_embeddings_only=True).shape == tokens.shape
    outside = keras.layers.Dense(3)
    with pytest.raises(ValueError, match="did not run"):
        Extractor(model, layer=outside)(x)

    detached.compile(jit_compile=JIT_COMPILE)
    preds, compiled = detached.predict(x, batch_size=2, verbose=0)
    assert rel_err(compiled, as_numpy(tokens)) < 1e-5


@pytest.mark.parametrize("index", range(len(VIT_PARITY)))
def test_recorder_and_extractor_match_vit_pytorch(index):
    from vit_pytorch.extractor import Extractor as RefExtractor
    from vit_pytorch.recorder import Recorder as RefRecorder
    from vit_pytorch.vit import ViT as RefViT

    from vitkit.convert import from_vit_pytorch

    config = {k: tuple(v) if isinstance(v, list) else v for k, v in VIT_PARITY[index].items()}
    torch.manual_seed(index)
    ref = randomize_torch(RefViT(**config), seed=index).eval()
    ours = from_vit_pytorch(ViT(**VIT_PARITY[index]), ref.state_dict())
    x = random_images(ours, 2, seed=index, data_format="channels_first")
    with torch.no_grad():
        ref_preds, ref_attns = RefRecorder(ref)(torch.as_tensor(x))
        ref_tokens = RefExtractor(ref, return_embeddings_only=True)(torch.as_tensor(x))
    preds, attns = Recorder(ours)(x.transpose(0, 2, 3, 1))
    assert attns.shape == tuple(ref_attns.shape)
    assert rel_err(as_numpy(preds), ref_preds.numpy()) < TOLERANCE
    assert rel_err(as_numpy(attns), ref_attns.numpy()) < TOLERANCE
    tokens = Extractor(ours, return_embeddings_only=True)(x.transpose(0, 2, 3, 1))
    assert rel_err(as_numpy(tokens), ref_tokens.numpy()) < TOLERANCE


# Attention rollout ----------------------------------------------------------------------


def test_rollout_of_known_matrices():
    """One layer: (A + I) / 2. Two layers: the product, last on the left. Heads average."""
    rng = np.random.default_rng(0)
    raw = rng.random((2, 3, 2, 5, 5)).astype("float32")  # (b, layers, heads, n, n)
    attns = raw / raw.sum(-1, keepdims=True)
    eye = np.eye(5, dtype="float32")
    layer = [(attns[:, i].mean(1) + eye) / 2 for i in range(3)]
    expected = layer[2] @ layer[1] @ layer[0]
    got = as_numpy(attention_rollout(attns))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    listed = as_numpy(attention_rollout([attns[:, i] for i in range(3)]))
    np.testing.assert_allclose(listed, expected, rtol=1e-5)

    grid = as_numpy(class_token_map(ops.convert_to_tensor(got), (2, 2)))
    np.testing.assert_allclose(grid, got[:, 0, 1:].reshape(2, 2, 2), rtol=1e-6)
    mean = as_numpy(class_token_map(ops.convert_to_tensor(got[:, 1:, 1:]), (2, 2), False))
    np.testing.assert_allclose(mean, got[:, 1:, 1:].mean(1).reshape(2, 2, 2), rtol=1e-6)
    with pytest.raises(ValueError, match="does not fit a 3x2 patch grid"):
        class_token_map(got, (3, 2))
    with pytest.raises(ValueError, match="one shape"):
        attention_rollout([attns[:, 0], attns[:, 0, :, :4, :4]])


@pytest.mark.parametrize(
    "name, why",
    [
        ("vit", None),
        ("simple_vit", None),  # no class token: the mean of the rows
        ("deepvit", None),
        ("pit", "change shape from layer to layer"),
        ("t2t", "no single grid of patch tokens"),
    ],
)
def test_attention_heatmap(name, why):
    model, x = tiny(name)
    if why is None:
        heat = attention_heatmap(model, x)
        rows, cols = (s // p for s, p in zip(model.image_hw, model.patch_hw))
        assert heat.shape == (2, rows, cols) and np.all(heat >= 0) and heat.std() > 0
    else:
        with pytest.raises(ValueError, match=why):
            attention_heatmap(model, x)
