"""The shared blocks on their own: config round trips, and the weight mapping of each Keras
layer type against the torch module it stands for."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

from backends_tests.helpers import as_numpy, randomize_torch, rel_err
from vitkit import layers
from vitkit.convert.mapping import flatten
from vitkit.layers.utils import KERAS_BASE_KWARGS, constructor_args

LAYERS = [
    (layers.Attention, dict(dim=12, heads=3, dim_head=5), (2, 7, 12)),
    (layers.Attention, dict(dim=12, heads=2, dim_head=4, separate_kv=True), (2, 7, 12)),
    (layers.FeedForward, dict(dim=12, hidden_dim=17), (2, 7, 12)),
    (layers.Transformer, dict(dim=12, depth=2, heads=3, dim_head=5, mlp_dim=17), (2, 7, 12)),
    (layers.PatchEmbedding, dict(dim=12, patch_size=(2, 3)), (2, 6, 9, 3)),
    (layers.ClassToken, dict(num_tokens=2), (2, 7, 12)),
    (layers.LearnedPositionEmbedding, dict(length=9), (2, 7, 12)),
    (layers.TokenPool, dict(pool="mean"), (2, 7, 12)),
    (layers.Attention, dict(dim=12, heads=2, dim_head=4, attention_dropout=0.2), (2, 7, 12)),
    (layers.ChannelLayerNorm, dict(data_format="channels_first"), (2, 5, 4, 3)),
    (
        layers.ConvNormAct,
        dict(filters=6, kernel_size=3, strides=2, padding=1, norm="batch", activation="silu"),
        (2, 7, 6, 4),
    ),
    (
        layers.ConvNormAct,
        dict(
            depth_multiplier=2,
            kernel_size=(3, 1),
            padding=(1, 0),
            norm="layer",
            data_format="channels_first",
        ),
        (2, 4, 7, 6),
    ),
    (
        layers.ConvStem,
        dict(
            filters=[5, 6], kernel_size=3, strides=2, padding=1, activation="relu", pool=(3, 2, 1)
        ),
        (2, 17, 12, 3),
    ),
    (layers.MaxPool, dict(pool_size=3, strides=2, padding=1), (2, 6, 5, 3)),
    (layers.DropPath, dict(rate=0.3), (2, 7, 12)),
    (
        layers.Attention,
        dict(dim=12, heads=2, dim_head=4, dim_value=5, separate_kv=True, output_dropout=0.1),
        (2, 7, 12),
    ),
    (layers.FeedForward, dict(dim=12, hidden_dim=17, output_dropout=0.0), (2, 7, 12)),
    (layers.WindowAttention, dict(dim=6, window_size=(2, 3), heads=2, dim_head=4), (2, 4, 6, 6)),
    (layers.WindowAttention, dict(dim=6, window_size=2, dilated=True, dim_value=3), (2, 4, 6, 6)),
    (layers.SpatialReductionAttention, dict(dim=6, reduction=2, heads=3, dim_head=2), (2, 5, 4, 6)),
    (layers.PEG, dict(kernel_size=3), (2, 5, 4, 6)),
    (layers.DynamicPositionBias, dict(dim=6, depth=2), (9, 2)),
]


@pytest.mark.parametrize("cls, kwargs, shape", LAYERS)
def test_layer_config_round_trip_and_serialization(cls, kwargs, shape):
    layer = cls(**kwargs)
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    y = as_numpy(layer(x))
    config = layer.get_config()
    assert set(config) == set(constructor_args(cls)) | KERAS_BASE_KWARGS
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is cls and clone.get_config() == config
    assert clone.built  # the build config travels with the serialized layer
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(as_numpy(clone(x)), y, rtol=1e-6, atol=1e-6)


def test_layers_reject_unknown_keywords():
    with pytest.raises(TypeError, match="'heds'"):
        layers.Attention(dim=8, heds=2)


def _load(keras_layer, torch_module):
    """Copy a torch module's state into a Keras layer through the converter's leaf rules."""
    targets = flatten({"m": keras_layer})
    state = {f"m.{k}": v.detach().numpy() for k, v in torch_module.state_dict().items()}
    assert set(targets) == set(state)
    for key, target in targets.items():
        assert tuple(state[key].shape) == target.torch_shape, key
        if target.variable is not None:
            target.variable.assign(target.to_keras(state[key]))


@pytest.mark.parametrize(
    "make_ref, make_ours, shape",
    [
        (  # grouped, strided convolution
            lambda: torch.nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=0, groups=2),
            lambda: keras.layers.Conv2D(6, (3, 2), strides=(1, 2), groups=2),
            (2, 4, 7, 8),
        ),
        (  # depthwise convolution with a channel multiplier
            lambda: torch.nn.Conv2d(3, 6, 3, padding=1, groups=3),
            lambda: keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2),
            (2, 3, 5, 6),
        ),
    ],
    ids=["conv2d", "depthwise"],
)
def test_conv_weights_map_from_torch(make_ref, make_ours, shape):
    ref, ours = randomize_torch(make_ref()), make_ours()
    x = np.random.default_rng(0).normal(size=shape).astype("float32")  # (b, c, h, w)
    ours.build((None, *shape[2:], shape[1]))
    _load(ours, ref)
    expected = ref(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
    assert rel_err(as_numpy(ours(x.transpose(0, 2, 3, 1))), expected) < 1e-5


def test_batch_norm_statistics_map_from_torch():
    ref = randomize_torch(torch.nn.BatchNorm2d(5)).eval()
    ours = keras.layers.BatchNormalization(epsilon=1e-5)
    ours.build((None, 4, 4, 5))
    _load(ours, ref)
    x = np.random.default_rng(0).normal(size=(2, 5, 4, 4)).astype("float32")
    expected = ref(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
    got = as_numpy(ours(x.transpose(0, 2, 3, 1), training=False))
    assert rel_err(got, expected) < 1e-5


def test_cross_attention_matches_vit_pytorch_cross_vit_attention():
    """`separate_kv` + `context`: keys and values over [normed x, context], as CrossViT's
    attention with `kv_include_self=True`."""
    from vit_pytorch.cross_vit import Attention as Reference

    ref = randomize_torch(Reference(12, heads=3, dim_head=5)).eval()
    ours = layers.Attention(12, heads=3, dim_head=5, separate_kv=True)
    ours.build((None, 1, 12))
    _load(ours, ref)  # CrossViT's names are ours: norm, to_q, to_kv, to_out.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 1, 12)).astype("float32")
    context = rng.normal(size=(2, 6, 12)).astype("float32")
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(context), kv_include_self=True)
    got = as_numpy(ours(x, context=context))
    assert rel_err(got, expected.numpy()) < 1e-5


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_conv_norm_act_pads_and_normalizes_as_torch(data_format):
    ref = torch.nn.Sequential(
        torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(6)
    )
    ref = randomize_torch(ref).eval()
    ours = layers.ConvNormAct(6, 3, 2, 1, use_bias=False, norm="batch", data_format=data_format)
    x = np.random.default_rng(0).normal(size=(2, 4, 8, 7)).astype("float32")  # even and odd
    ours.build(x.shape if data_format == "channels_first" else x.transpose(0, 2, 3, 1).shape)
    _load(ours, ref)
    expected = ref(torch.from_numpy(x)).detach().numpy()
    if data_format == "channels_last":
        got = as_numpy(ours(x.transpose(0, 2, 3, 1), training=False)).transpose(0, 3, 1, 2)
    else:
        got = as_numpy(ours(x, training=False))
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("depthwise", [False, True], ids=["conv2d", "depthwise"])
def test_channels_first_bias_lands_on_channels_when_width_equals_channels(depthwise):
    """Keras 3.15's `ops.add` on TensorFlow put a `(1, c, 1, 1)` bias on the width axis of a
    `(b, c, h, w)` map with `w == c`; LeViT on channels_first gave wrong numbers through it."""
    if depthwise:
        ref = torch.nn.Conv2d(6, 6, 3, stride=2, groups=6)
        ours = layers.DepthwiseConv2D(3, 2, data_format="channels_first")
    else:
        ref = torch.nn.Conv2d(4, 6, 3, stride=2)
        ours = layers.Conv2D(6, 3, 2, data_format="channels_first")
    ref = randomize_torch(ref).eval()
    x = np.random.default_rng(0).normal(size=(2, ref.in_channels, 9, 13)).astype("float32")
    ours.build(x.shape)  # output (2, 6, 4, 6): as wide as it has channels
    _load(ours, ref)
    expected = ref(torch.from_numpy(x)).detach().numpy()
    got = as_numpy(ours(x))
    assert got.shape == expected.shape == (2, 6, 4, 6)
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_max_pool_pads_with_minus_infinity_as_torch(data_format):
    x = -np.abs(np.random.default_rng(0).normal(size=(2, 3, 8, 7))).astype("float32") - 1.0
    expected = torch.nn.MaxPool2d(3, 2, 1)(torch.from_numpy(x)).numpy()
    pool = layers.MaxPool(3, 2, 1, data_format=data_format)
    if data_format == "channels_last":
        got = as_numpy(pool(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    else:
        got = as_numpy(pool(x))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert pool.output_size(8, 7) == expected.shape[2:]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_channel_norm_matches_vit_pytorchs(data_format):
    from vit_pytorch.cvt import LayerNorm as Reference

    ref = randomize_torch(Reference(5))
    ours = layers.ChannelLayerNorm(data_format)
    x = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype("float32")
    ours.build(x.shape if data_format == "channels_first" else x.transpose(0, 2, 3, 1).shape)
    _load(ours, ref)  # g, b of shape (1, 5, 1, 1)
    expected = ref(torch.from_numpy(x)).detach().numpy()
    if data_format == "channels_last":
        got = as_numpy(ours(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    else:
        got = as_numpy(ours(x))
    assert rel_err(got, expected) < 1e-5


def test_drop_path_drops_whole_samples_in_training_only():
    x = np.ones((64, 3, 4), "float32")
    drop = layers.DropPath(0.5, seed=1)
    np.testing.assert_array_equal(as_numpy(drop(x)), x)
    y = as_numpy(drop(x, training=True))
    per_sample = y.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))  # a sample is kept or not
    assert 0 < (per_sample[:, 0] == 0).sum() < 64


def test_tokens_and_feature_maps_round_trip():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype("float32")  # (b, h, w, c)
    tokens = layers.map_to_tokens(x)
    np.testing.assert_array_equal(as_numpy(tokens), x.reshape(2, 12, 5))
    first = layers.map_to_tokens(x.transpose(0, 3, 1, 2), "channels_first")
    np.testing.assert_array_equal(as_numpy(first), x.reshape(2, 12, 5))
    back = layers.tokens_to_map(tokens, (3, 4), "channels_first")
    np.testing.assert_array_equal(as_numpy(back), x.transpose(0, 3, 1, 2))


def test_reshaped_variables_map_from_the_reference_layout():
    from vitkit.convert import Reshaped

    norm = keras.layers.LayerNormalization(epsilon=1e-5)
    norm.build((None, 4, 4, 5))
    targets = flatten({"g": Reshaped(norm.gamma, (1, 5, 1, 1))})
    assert targets["g"].torch_shape == (1, 5, 1, 1)
    values = np.arange(5, dtype="float32").reshape(1, 5, 1, 1)
    targets["g"].variable.assign(targets["g"].to_keras(values))
    np.testing.assert_array_equal(as_numpy(norm.gamma), np.arange(5))


@pytest.mark.parametrize("dilated", [False, True])
def test_window_partition_matches_the_reference_rearranges(dilated):
    """Contiguous windows are `b (h s1) (w s2) d -> (b h w) (s1 s2) d`; dilated ones
    `b (s1 h) (s2 w) d -> (b h w) (s1 s2) d` (CrossFormer's short and long distance)."""
    from einops import rearrange

    x = np.random.default_rng(0).normal(size=(2, 6, 8, 3)).astype("float32")
    pattern = "b (s1 h) (s2 w) d" if dilated else "b (h s1) (w s2) d"
    expected = rearrange(x, f"{pattern} -> (b h w) (s1 s2) d", s1=3, s2=2)
    windows = layers.window_partition(x, (3, 2), dilated=dilated)
    np.testing.assert_array_equal(as_numpy(windows), expected)
    back = layers.window_merge(windows, (6, 8), (3, 2), dilated=dilated)
    np.testing.assert_array_equal(as_numpy(back), x)


def test_relative_position_indices_match_vit_pytorch():
    from vit_pytorch.crossformer import Attention as CrossFormerAttention

    for w in (1, 2, 3):
        expected = CrossFormerAttention(32, "short", w).rel_pos_indices.numpy()
        got = layers.relative_position_index((w, w), w - 1, (2 * w - 1, 1))
        np.testing.assert_array_equal(as_numpy(got), expected)


def test_relative_position_bias_reads_the_table_in_either_order():
    bias = layers.RelativePositionBias(3, heads=2, dy_major=False)
    bias.build()
    table = np.arange(25 * 2, dtype="float32").reshape(25, 2)
    bias.table.assign(table)
    got = as_numpy(bias.window_bias((2, 3)))  # (heads, 6, 6)
    # token 5 is (1, 2), token 0 is (0, 0): offset (dy, dx) = (1, 2) -> row (1 + 2) + (2 + 2) * 5
    assert got.shape == (2, 6, 6)
    np.testing.assert_array_equal(got[:, 5, 0], table[3 + 4 * 5])
    with pytest.raises(ValueError, match="larger"):
        bias.window_bias((4, 1))


def test_pointwise_and_output_slices_map_from_torch_convolutions():
    """A Dense layer loads a 1x1 Conv2d (`Pointwise`), and two torch layers fill the two
    halves of one of ours (`OutputSlice`), through `from_vit_pytorch`."""
    from vitkit.convert import OutputSlice, Pointwise, from_vit_pytorch

    to_k = randomize_torch(torch.nn.Conv2d(4, 3, 1, bias=False))
    to_v = randomize_torch(torch.nn.Conv2d(4, 5, 1, bias=False), seed=1)
    ours = keras.layers.Dense(8, use_bias=False)
    ours.build((None, 4))

    class Block:  # anything with a state map loads
        def vit_pytorch_state_map(self):
            return {
                "to_k": OutputSlice(Pointwise(ours), 0, 3),
                "to_v": OutputSlice(Pointwise(ours), 3, 8),
            }

    targets = flatten(Block().vit_pytorch_state_map())
    assert targets["to_k.weight"].torch_shape == (3, 4, 1, 1)
    assert targets["to_v.weight"].torch_shape == (5, 4, 1, 1)
    from_vit_pytorch(Block(), {"to_k.weight": to_k.weight, "to_v.weight": to_v.weight})
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 6)).astype("float32")
    with torch.no_grad():
        expected = torch.cat([to_k(torch.from_numpy(x)), to_v(torch.from_numpy(x))], 1)
    got = as_numpy(ours(x.transpose(0, 2, 3, 1)))
    assert rel_err(got, expected.numpy().transpose(0, 2, 3, 1)) < 1e-6


def test_padded_conv_matches_torch_padding():
    ref = randomize_torch(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1))
    ours = layers.ConvNormAct(4, 3, strides=2, padding=1)
    ours.build((None, 7, 6, 3))
    _load(ours.conv, ref)
    x = np.random.default_rng(0).normal(size=(2, 3, 7, 6)).astype("float32")
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    got = as_numpy(ours(x.transpose(0, 2, 3, 1)))
    assert got.shape == expected.shape == (2, 4, 3, 4)
    assert tuple(ours.compute_output_shape((2, 7, 6, 3))) == (2, 4, 3, 4)
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("fusable", [True, False])
def test_key_mask_matches_vit_pytorch_masked_attention(fusable):
    """`key_mask`: keys marked False get no weight, in the fused and the explicit path, as in
    vit-pytorch's masked attention (ATS's); padded query rows are don't-cares there."""
    from vit_pytorch.ats_vit import Attention as Reference

    ref = randomize_torch(Reference(12, heads=3, dim_head=5)).eval()
    ours = layers.Attention(12, heads=3, dim_head=5, project_out=True)
    ours.fusable = fusable
    ours.build((None, 7, 12))
    _load(ours, ref)
    x = np.random.default_rng(0).normal(size=(2, 7, 12)).astype("float32")
    mask = np.array([[1, 1, 0, 1, 0, 1, 1], [1, 0, 0, 0, 1, 1, 0]], bool)
    with torch.no_grad():
        expected, _, _ = ref(torch.from_numpy(x), mask=torch.from_numpy(mask))
    got = as_numpy(ours(x, key_mask=mask))
    assert rel_err(got[mask], expected.numpy()[mask]) < 1e-5


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_sublayer_shortcut_matches_keras_call_and_keeps_hooks(monkeypatch, policy):
    """`backend_quirks.call_sublayer` (eager torch skips Keras' `__call__` on Dense,
    LayerNormalization, Dropout and vitkit blocks; JAX runs Dense on rows) gives Keras'
    numbers, in float32 and in mixed precision (where Keras' call would cast, and its
    LayerNormalization reads float32 weights), and a torch forward hook on a sublayer still
    sees its call (the shortcut steps aside for it). TensorFlow has no shortcut: there both
    runs are the plain call, and `test_dense_on_rows_matches_dense` and
    `test_layer_norm_in_torch_form_matches_keras` check the JAX paths' functions on every
    backend. On torch and JAX the test also checks that the shortcuts were taken."""
    from vitkit.layers import backend_quirks

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        stack = layers.Transformer(dim=12, depth=2, heads=3, dim_head=5, mlp_dim=17, dropout=0.1)
        x = np.random.default_rng(3).normal(size=(2, 7, 12))
        x = keras.ops.convert_to_tensor(x, "float32")
    finally:
        keras.config.set_dtype_policy(previous)

    def run():
        return as_numpy(keras.ops.cast(stack(x, training=False), "float32"))

    taken = []
    if keras.config.backend() == "torch":
        can_skip = backend_quirks._can_skip_call

        def counting(layer, inputs, kwargs):
            taken.append(can_skip(layer, inputs, kwargs))
            return taken[-1]

        monkeypatch.setattr(backend_quirks, "_can_skip_call", counting)
    norms = []
    if keras.config.backend() == "jax":
        plain_norm = backend_quirks._jax_plain_layer_norm

        def counting_norms(layer, inputs, kwargs):
            plain = plain_norm(layer, inputs, kwargs)
            if type(layer) is keras.layers.LayerNormalization:
                norms.append(plain)
            return plain

        monkeypatch.setattr(backend_quirks, "_jax_plain_layer_norm", counting_norms)
    fast = run()
    if keras.config.backend() == "torch":  # every sublayer, LayerNormalization included
        assert taken and all(taken), taken
    if keras.config.backend() == "jax":  # 2 per block and the final one
        assert len(norms) == 5 and all(norms), norms
    monkeypatch.setattr(backend_quirks, "FAST_TORCH_CALLS", False)
    monkeypatch.setattr(backend_quirks, "FLAT_JAX_DENSE", False)
    monkeypatch.setattr(backend_quirks, "JAX_LAYER_NORM", False)
    plain = run()
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(backend_quirks, "FAST_TORCH_CALLS", True)
    monkeypatch.setattr(backend_quirks, "FLAT_JAX_DENSE", True)
    monkeypatch.setattr(backend_quirks, "JAX_LAYER_NORM", True)
    if keras.config.backend() == "torch":
        seen = []
        hook = stack.feed_forwards[1].hidden.register_forward_hook(
            lambda module, args, out: seen.append(out)
        )
        try:
            np.testing.assert_allclose(run(), plain, atol=1e-5)
        finally:
            hook.remove()
        assert len(seen) == 1


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_conv_and_batch_norm_shortcut_matches_keras_call(monkeypatch, policy, data_format):
    """On eager torch `call_sublayer` runs Conv2D, DepthwiseConv2D (Keras' and vitkit's) and
    an inference BatchNormalization as torch's own conv2d / batch_norm: Keras' numbers and
    dtypes, in both layouts, with strides, groups, "same" padding, dilation and a depth
    multiplier, in float32 and mixed precision; a training BatchNormalization keeps Keras'
    call (its moving statistics). Other backends compare the plain call with itself."""
    from vitkit.layers import backend_quirks

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        convs = [
            layers.ConvNormAct(6, 3, strides=2, padding=1, norm="batch", data_format=data_format),
            layers.ConvNormAct(
                depth_multiplier=2,
                kernel_size=(3, 1),
                padding=(1, 0),
                norm="batch",
                data_format=data_format,
            ),
            keras.layers.Conv2D(
                8,
                3,
                padding="same",
                groups=2,
                dilation_rate=2,
                data_format=data_format,
                activation="relu",
            ),
            keras.layers.DepthwiseConv2D(
                3, strides=(1, 2), use_bias=False, data_format=data_format
            ),
        ]

        class Stack(keras.layers.Layer):
            def call(self, x, training=None):
                for conv in convs:
                    x = backend_quirks.call_sublayer(conv, x, training=training)
                return x

        stack = Stack()
        shape = (2, 9, 10, 4) if data_format == "channels_last" else (2, 4, 9, 10)
        x = keras.ops.convert_to_tensor(np.random.default_rng(8).normal(size=shape), "float32")
        stack(x)
    finally:
        keras.config.set_dtype_policy(previous)
    rng = np.random.default_rng(9)
    for conv in convs:
        for weight in conv.weights:
            value = rng.normal(size=weight.shape)
            if "variance" in weight.path:
                value = np.abs(value) + 0.5
            weight.assign(value.astype("float32"))
    if keras.config.backend() == "torch":
        x = x.to(torch.bfloat16) if policy == "mixed_bfloat16" else x
    else:
        x = keras.ops.cast(x, keras.mixed_precision.Policy(policy).compute_dtype)

    def run(training):
        y = stack(x, training=training)
        return keras.backend.standardize_dtype(y.dtype), as_numpy(keras.ops.cast(y, "float32"))

    direct = []
    if keras.config.backend() == "torch":
        for name in ("_torch_conv2d", "_torch_batch_norm"):
            original = getattr(backend_quirks, name)

            def counting(*args, _original=original, _name=name, **kwargs):
                direct.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(backend_quirks, name, counting)
    fast = run(False)
    if keras.config.backend() == "torch":
        assert direct.count("_torch_conv2d") == 4 and direct.count("_torch_batch_norm") == 2
    monkeypatch.setattr(backend_quirks, "FAST_TORCH_CALLS", False)
    plain = run(False)
    assert fast[0] == plain[0] == keras.mixed_precision.Policy(policy).compute_dtype
    if policy == "float32":
        np.testing.assert_allclose(fast[1], plain[1], rtol=1e-5, atol=1e-5)
    else:  # torch's conv adds the bias before rounding to bfloat16, Keras after: 4 layers on
        assert rel_err(fast[1], plain[1]) < 1e-2
    if keras.config.backend() == "torch":  # last: training moves the statistics
        monkeypatch.setattr(backend_quirks, "FAST_TORCH_CALLS", True)
        direct.clear()
        run(True)
        assert direct.count("_torch_conv2d") == 4 and "_torch_batch_norm" not in direct


@pytest.mark.parametrize("shape", [(2, 7, 12), (2, 3, 4, 12), (5, 12)])
def test_dense_on_rows_matches_dense(shape):
    """JAX's Dense-on-rows (`backend_quirks._dense_on_rows`: `(b, ..., d)` tokens as one
    `(rows, d)` matmul) gives Dense's numbers and shapes, eagerly and on symbolic inputs
    whose batch is unknown."""
    from vitkit.layers.backend_quirks import _dense_on_rows

    dense = keras.layers.Dense(5)
    x = keras.ops.convert_to_tensor(np.random.default_rng(4).normal(size=shape), "float32")
    expected = as_numpy(dense(x))
    got = as_numpy(_dense_on_rows(dense, x))
    assert got.shape == expected.shape == (*shape[:-1], 5)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    symbolic = _dense_on_rows(dense, keras.Input(shape[1:]))
    assert tuple(symbolic.shape) == (None, *shape[1:-1], 5)


@pytest.mark.parametrize(
    "policy, center, scale",
    [
        ("float32", True, True),
        ("float32", False, True),
        ("float32", True, False),
        ("mixed_bfloat16", True, True),
    ],
)
def test_layer_norm_in_torch_form_matches_keras(policy, center, scale):
    """JAX's LayerNormalization path (`backend_quirks._jax_layer_norm`: `(x - mean) *
    rsqrt(var + eps) * gamma + beta` on the input as given, in at least float32, the result
    in the compute dtype)
    gives Keras' call's numbers and dtype, with and without gamma and beta. Plain
    `keras.ops`, so it runs under every backend."""
    from vitkit.layers.backend_quirks import _jax_layer_norm

    norm = keras.layers.LayerNormalization(epsilon=1e-5, center=center, scale=scale, dtype=policy)
    rng = np.random.default_rng(7)
    x = keras.ops.convert_to_tensor(3.0 + 2.0 * rng.normal(size=(2, 5, 12)), "float32")
    norm.build(x.shape)
    for weight in norm.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    expected, got = norm(x), _jax_layer_norm(norm, x)
    assert keras.backend.standardize_dtype(got.dtype) == norm.compute_dtype
    tolerance = 1e-5 if policy == "float32" else 2**-7  # one bfloat16 rounding
    np.testing.assert_allclose(
        as_numpy(keras.ops.cast(got, "float32")),
        as_numpy(keras.ops.cast(expected, "float32")),
        rtol=tolerance,
        atol=tolerance,
    )


@pytest.mark.parametrize("with_bias", [False, True])
def test_dot_product_attention_matches_softmax_attention(with_bias):
    """`backend_quirks.dot_product_attention` (heads-first products on JAX's CPU, Keras'
    op elsewhere) is softmax(q k^T * scale + bias) v on `(b, n, h, d)` inputs, with queries
    and keys of different lengths."""
    from vitkit.layers.backend_quirks import dot_product_attention

    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=(2, n, 3, 4)).astype("float32") for n in (5, 7, 7))
    bias = rng.normal(size=(1, 3, 5, 7)).astype("float32") if with_bias else None
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * 0.3 + (0.0 if bias is None else bias)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", weights, v)
    got = dot_product_attention(
        *(keras.ops.convert_to_tensor(t) for t in (q, k, v)),
        bias=None if bias is None else keras.ops.convert_to_tensor(bias),
        scale=0.3,
    )
    np.testing.assert_allclose(as_numpy(got), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "batch, queries, keys, heads, chunk",
    [(2, 12, 5, 1, 4), (2, 13, 7, 3, 5), (1, 9, 9, 2, 9), (1, 6, 4, 2, 16)],
)
def test_attention_in_query_chunks_is_the_whole_attention(batch, queries, keys, heads, chunk):
    """`attention_in_query_chunks` (JAX on a CPU, large score tensors), written in keras.ops
    and so checked on every backend: the values and the gradients of q, k and v are the
    whole attention's, with and without padding the queries to whole chunks (13 by 5, and
    a chunk longer than the queries)."""
    from vitkit.layers.backend_quirks import _attention_heads_first, attention_in_query_chunks

    rng = np.random.default_rng(7)
    q, k, v = (
        rng.normal(size=(batch, n, heads, 4)).astype("float32") for n in (queries, keys, keys)
    )

    def chunked(q, k, v):
        return attention_in_query_chunks(q, k, v, 0.3, chunk)

    def whole(q, k, v):
        return _attention_heads_first(q, k, v, None, 0.3)

    tensors = [keras.ops.convert_to_tensor(t) for t in (q, k, v)]
    got, expected = chunked(*tensors), whole(*tensors)
    assert tuple(got.shape) == q.shape
    np.testing.assert_allclose(as_numpy(got), as_numpy(expected), rtol=1e-5, atol=1e-6)
    projection = rng.normal(size=q.shape).astype("float32")
    for ours, theirs in zip(
        _gradients(chunked, (q, k, v), projection), _gradients(whole, (q, k, v), projection)
    ):
        np.testing.assert_allclose(as_numpy(ours), as_numpy(theirs), rtol=1e-5, atol=1e-5)


def test_query_chunks_only_for_large_scores():
    """Chunks of about CHUNK_SCORES bytes of scores, covering every query, only above
    CHUNK_ABOVE bytes: CvT-13's stage 1 and 2 at batch 8 are chunked, ViT-S/16's scores and
    unknown or symbolic sizes (an export's dynamic batch) are not."""
    from vitkit.layers.backend_quirks import CHUNK_SCORES, query_chunk

    assert query_chunk(8, 197, 6, 197) is None  # ViT-S/16, 7 MiB
    assert query_chunk(None, 3136, 1, 784) is None
    import jax  # every session installs it

    assert query_chunk(jax.export.symbolic_shape("b")[0], 3136, 1, 784) is None
    for batch, queries, heads, keys in [(8, 3136, 1, 784), (8, 784, 3, 196), (1, 50000, 2, 300)]:
        chunk = query_chunk(batch, queries, heads, keys)
        row = 4 * batch * heads * keys
        assert 0 < chunk < queries and chunk * row <= CHUNK_SCORES + row
        chunks = -(-queries // chunk)
        assert chunks * chunk - queries < chunk  # the padding is less than one chunk
        assert row * queries / chunks <= CHUNK_SCORES


def test_dot_product_attention_chunks_large_scores_on_jax_cpu(monkeypatch):
    """With the threshold lowered, `dot_product_attention` takes the chunked path exactly
    where it is meant to (JAX on a CPU, float32, no bias or mask) and still gives the
    softmax attention's numbers; with a bias it keeps the whole path."""
    from vitkit.layers import backend_quirks

    calls = []
    chunked = backend_quirks.attention_in_query_chunks

    def spy(*args):
        calls.append(args[-1])
        return chunked(*args)

    monkeypatch.setattr(backend_quirks, "attention_in_query_chunks", spy)
    monkeypatch.setattr(backend_quirks, "CHUNK_ABOVE", 100)
    monkeypatch.setattr(backend_quirks, "CHUNK_SCORES", 50)
    rng = np.random.default_rng(8)
    q, k, v = (rng.normal(size=(2, n, 1, 4)).astype("float32") for n in (9, 6, 6))
    tensors = [keras.ops.convert_to_tensor(t) for t in (q, k, v)]
    got = backend_quirks.dot_product_attention(*tensors, scale=0.3)
    expected = backend_quirks._attention_heads_first(*tensors, None, 0.3)
    np.testing.assert_allclose(as_numpy(got), as_numpy(expected), rtol=1e-5, atol=1e-6)
    on_jax_cpu = keras.config.backend() == "jax" and backend_quirks._jax_on_cpu()
    assert calls == ([1] if on_jax_cpu else [])  # 48-byte rows, 50-byte chunks: one query each
    bias = keras.ops.zeros((1, 1, 9, 6))
    backend_quirks.dot_product_attention(*tensors, bias=bias, scale=0.3)
    assert len(calls) == (1 if on_jax_cpu else 0)


def test_attention_padded_to_even_lengths_matches_unpadded():
    """JAX on a GPU pads odd sequence lengths by one for cuDNN's fused attention and masks
    the padding with the true lengths (`_jax_attention_padded_to_even`). Checked here with
    XLA's implementation of the same call: the values and the gradients of q, k and v are
    those of the unpadded attention. The helper is plain JAX, which every test session
    installs, so it runs under every backend."""
    import jax

    from vitkit.layers.backend_quirks import _jax_attention_padded_to_even

    rng = np.random.default_rng(6)
    q, k, v = (rng.normal(size=(2, n, 3, 4)).astype("float32") for n in (5, 7, 7))

    def padded(q, k, v):
        return _jax_attention_padded_to_even(q, k, v, 0.3, "xla")

    def plain(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=0.3, implementation="xla")

    got, expected = padded(q, k, v), plain(q, k, v)
    assert got.shape == expected.shape == q.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
    weights = rng.normal(size=q.shape).astype("float32")
    grads = [
        jax.grad(lambda *t, f=f: (f(*t) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
        for f in (padded, plain)
    ]
    for ours, reference in zip(*grads):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-5, atol=1e-6)


def test_conv_stack_trains_compiled():
    """Convolutions, depth-wise ones and BatchNorm compiled (`jit_compile=True`: XLA on JAX
    and TensorFlow, torch.compile on torch, where the eager shortcut's conv2d on a permuted
    view once broke Inductor's dynamic shapes), over two batch sizes, give the eager
    numbers."""
    inputs = keras.Input((9, 10, 4))
    x = layers.ConvNormAct(6, 3, strides=2, padding=1, norm="batch")(inputs)
    x = layers.ConvNormAct(depth_multiplier=1, kernel_size=3, padding=1, norm="batch")(x)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    eager = keras.models.clone_model(model)
    eager.set_weights(model.get_weights())
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer="sgd", loss=loss, jit_compile=True)
    rng = np.random.default_rng(10)
    for batch in (2, 3):
        x = rng.normal(size=(batch, 9, 10, 4)).astype("float32")
        np.testing.assert_allclose(
            as_numpy(model.predict_on_batch(x)), as_numpy(eager(x)), rtol=1e-4, atol=1e-5
        )
        assert np.isfinite(model.train_on_batch(x, rng.integers(0, 3, batch)))
        eager.set_weights(model.get_weights())


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize(
    "multiplier, strides, padding, dilation",
    [
        (1, 1, "same", 1),
        (1, 2, "valid", 1),
        (2, 2, "same", 1),
        (1, 1, "valid", 2),
        (2, 1, "same", 2),
    ],
)
def test_depthwise_conv_as_shifts_matches_keras(
    data_format, multiplier, strides, padding, dilation
):
    """`backend_quirks._depthwise_conv_as_shifts` (the depth-wise convolution vitkit runs on
    XLA:CPU) gives `keras.ops.depthwise_conv`'s numbers in both layouts, with depth
    multipliers, strides, dilation and "same" padding that is uneven (odd and even map sides
    at stride 2); in bfloat16 it returns bfloat16. Plain keras.ops (strided slices), so it
    runs under every backend."""
    from vitkit.layers.backend_quirks import _depthwise_conv_as_shifts

    rng = np.random.default_rng(11)
    for height, width in ((9, 9), (8, 11)):
        shape = (2, height, width, 5) if data_format == "channels_last" else (2, 5, height, width)
        x = rng.normal(size=shape).astype("float32")
        kernel = rng.normal(size=(3, 3, 5, multiplier)).astype("float32")
        args = ((strides, strides), padding, (dilation, dilation), data_format)
        expected = keras.ops.depthwise_conv(
            x, kernel, args[0], padding, data_format, dilation_rate=args[2]
        )
        got = _depthwise_conv_as_shifts(x, kernel, *args)
        assert tuple(got.shape) == tuple(expected.shape)
        np.testing.assert_allclose(as_numpy(got), as_numpy(expected), rtol=1e-5, atol=1e-5)
        half = _depthwise_conv_as_shifts(
            keras.ops.cast(x, "bfloat16"), keras.ops.cast(kernel, "bfloat16"), *args
        )
        assert keras.backend.standardize_dtype(half.dtype) == "bfloat16"


def _gradients(fn, arrays, projection, unknown_batch=False):
    """d(sum(fn(*arrays) * projection)) / d(arrays), compiled where the backend compiles
    (`jax.jit`, TensorFlow's `jit_compile=True`: the XLA:CPU path). `unknown_batch`: on
    TensorFlow, traced with the first array's leading axis unknown (as Keras' `fit` retraces
    for a new batch size); JAX traces shapes as they are."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        def loss(*arrays):
            return keras.ops.sum(fn(*arrays) * projection)

        return jax.jit(jax.grad(loss, argnums=tuple(range(len(arrays)))))(*arrays)
    if backend == "tensorflow":
        import tensorflow as tf

        signature = [tf.TensorSpec(a.shape, a.dtype) for a in arrays]
        if unknown_batch:
            signature[0] = tf.TensorSpec((None, *arrays[0].shape[1:]), arrays[0].dtype)

        @tf.function(jit_compile=True, input_signature=signature)
        def grads(*arrays):
            with tf.GradientTape() as tape:
                tape.watch(arrays)
                loss = tf.reduce_sum(fn(*arrays) * projection)
            return tape.gradient(loss, list(arrays))

        return grads(*map(tf.constant, arrays))
    import torch

    arrays = [torch.tensor(a, requires_grad=True) for a in arrays]
    keras.ops.sum(fn(*arrays) * torch.as_tensor(projection)).backward()
    return [a.grad for a in arrays]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize(
    "multiplier, strides, padding, dilation",
    [
        (1, 1, "same", 1),
        (1, 2, "same", 1),
        (2, 2, "valid", 1),
        (1, 1, "same", 2),
        (1, 3, "same", 1),
    ],
)
def test_depthwise_conv_as_shifts_differentiates_like_keras(
    data_format, multiplier, strides, padding, dilation
):
    """The shifted windows' gradients (on JAX its own backward pass: the output's gradient
    padded and dilated once, then windows times the flipped kernel; on TensorFlow the
    kernel's gradient as matrix products) are the convolution's, for the input and the
    kernel, with strides (uneven "same" padding, a stride that skips input rows), dilation
    and depth multipliers, in both layouts, also for a batch size unknown when traced."""
    from vitkit.layers.backend_quirks import _depthwise_conv_as_shifts

    rng = np.random.default_rng(13)
    args = ((strides, strides), padding, (dilation, dilation), data_format)
    for height, width in ((9, 9), (8, 11)):
        shape = (2, height, width, 4) if data_format == "channels_last" else (2, 4, height, width)
        x = rng.normal(size=shape).astype("float32")
        kernel = rng.normal(size=(3, 3, 4, multiplier)).astype("float32")
        out_shape = keras.ops.depthwise_conv(
            x, kernel, args[0], padding, data_format, dilation_rate=args[2]
        ).shape
        projection = rng.normal(size=tuple(out_shape)).astype("float32")
        expected = _gradients(
            lambda x, k: keras.ops.depthwise_conv(
                x, k, args[0], padding, data_format, dilation_rate=args[2]
            ),
            (x, kernel),
            projection,
        )
        for unknown_batch in (False, True):
            got = _gradients(
                lambda x, k: _depthwise_conv_as_shifts(x, k, *args),
                (x, kernel),
                projection,
                unknown_batch=unknown_batch,
            )
            for ours, theirs in zip(got, expected):
                np.testing.assert_allclose(as_numpy(ours), as_numpy(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_depthwise_conv_layer_takes_the_shifts_under_xla_on_cpu(monkeypatch, data_format):
    """vitkit's DepthwiseConv2D (bias, stride 2, "same") gives Keras' layer's numbers with the
    same weights, eagerly and compiled, and runs as shifted windows exactly where XLA
    compiles it for a CPU: under `jax.jit`, and TensorFlow's `jit_compile=True`."""
    from vitkit.layers import backend_quirks

    calls = []
    shifts = backend_quirks._depthwise_conv_as_shifts
    monkeypatch.setattr(
        backend_quirks,
        "_depthwise_conv_as_shifts",
        lambda *args: calls.append(1) or shifts(*args),
    )
    config = dict(
        kernel_size=3, strides=2, padding="same", depth_multiplier=2, data_format=data_format
    )
    ours, theirs = layers.DepthwiseConv2D(**config), keras.layers.DepthwiseConv2D(**config)
    rng = np.random.default_rng(12)
    shape = (2, 7, 8, 3) if data_format == "channels_last" else (2, 3, 7, 8)
    x = rng.normal(size=shape).astype("float32")
    ours.build(shape)
    theirs.build(shape)
    for weight in ours.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    theirs.set_weights(ours.get_weights())
    expected = as_numpy(theirs(x))
    np.testing.assert_allclose(as_numpy(ours(x)), expected, rtol=1e-5, atol=1e-5)
    assert not calls  # op by op, every backend keeps its own convolution
    if keras.config.backend() == "jax":
        import jax

        compiled = jax.jit(lambda x: ours(x))
    elif keras.config.backend() == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(ours, jit_compile=True)
    else:
        return
    np.testing.assert_allclose(as_numpy(compiled(x)), expected, rtol=1e-5, atol=1e-5)
    assert calls


def test_softmax_matches_keras_and_differentiates_from_its_output():
    """`backend_quirks.softmax` gives `keras.ops.softmax`'s numbers; on JAX through JAX's
    custom gradient rule, whose gradient is `y * (dy - sum(y * dy))`."""
    from vitkit.layers.backend_quirks import softmax

    rng = np.random.default_rng(13)
    x = (4.0 * rng.normal(size=(2, 3, 5, 7))).astype("float32")
    np.testing.assert_allclose(
        as_numpy(softmax(x, axis=-1)), as_numpy(keras.ops.softmax(x, axis=-1)), rtol=1e-6
    )
    np.testing.assert_allclose(
        as_numpy(softmax(x, axis=1)), as_numpy(keras.ops.softmax(x, axis=1)), rtol=1e-6
    )
    if keras.config.backend() != "jax":
        return
    import jax

    assert "custom_jvp_call" in str(jax.make_jaxpr(softmax)(x))
    weights = rng.normal(size=x.shape).astype("float32")
    got = jax.grad(lambda t: (softmax(t) * weights).sum())(x)
    y = np.asarray(softmax(x))
    expected = y * (weights - (y * weights).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_gelu_is_torchs_exact_gelu_eager_and_compiled():
    """`backend_quirks.GELU` (every feed-forward block's) is torch's exact GELU, values and
    gradient, run op by op and compiled. On JAX the compiled form is erf's rational form with
    its own derivative (`_jax_gelu`), whose erf must stay within float32 rounding."""
    from vitkit.layers.backend_quirks import GELU, _erf_rational

    rng = np.random.default_rng(17)
    x = np.concatenate([4.0 * rng.normal(size=4000), [-12.0, -6.0, -1e-3, 0.0, 1e-3, 6.0, 12.0]])
    x = x.astype("float32")
    weights = rng.normal(size=x.shape).astype("float32")
    t = torch.from_numpy(x).requires_grad_()
    (torch.nn.functional.gelu(t) * torch.from_numpy(weights)).sum().backward()
    expected, expected_grad = torch.nn.functional.gelu(t).detach().numpy(), t.grad.numpy()

    np.testing.assert_allclose(as_numpy(GELU(x)), expected, rtol=1e-6, atol=2e-6)
    grid = np.linspace(-6.0, 6.0, 24001).astype("float32")
    exact = torch.special.erf(torch.from_numpy(grid.astype("float64"))).numpy()
    assert np.abs(as_numpy(_erf_rational(grid)) - exact).max() < 5e-7
    if keras.config.backend() != "jax":
        return
    import jax

    def weighted(t):
        return (GELU(t) * weights).sum()

    assert "custom_jvp_call" in str(jax.make_jaxpr(weighted)(x))  # traced: the rational form
    np.testing.assert_allclose(np.asarray(jax.jit(GELU)(x)), expected, rtol=1e-6, atol=2e-6)
    got = jax.jit(jax.grad(weighted))(x)
    np.testing.assert_allclose(np.asarray(got), expected_grad, rtol=1e-5, atol=2e-6)


def _residual_stack(depth):
    """A small built `Transformer` of `depth` blocks and a `(2, 5, 16)` input."""
    stack = layers.Transformer(dim=16, depth=depth, heads=2, dim_head=8, mlp_dim=32)
    x = np.random.default_rng(19).normal(size=(2, 5, 16)).astype("float32")
    stack.build(x.shape)
    return stack, x


def test_stored_gradient_changes_no_value_or_gradient(monkeypatch):
    """`backend_quirks.stored_gradient` (each transformer block's input; on JAX on a CPU a
    conditional in the gradient) is the identity: a residual stack's output and its input's
    gradient, compiled where the backend compiles, are those of the stack without it. On
    JAX: exact first and second derivatives and forward mode (`jax.jvp`), and the gradient
    is passed on unchanged when the element the condition tests is NaN."""
    from vitkit.layers import backend_quirks, transformer

    stack, x = _residual_stack(3)
    projection = np.random.default_rng(20).normal(size=x.shape).astype("float32")
    with_store = as_numpy(stack(x)), [as_numpy(g) for g in _gradients(stack, (x,), projection)]
    monkeypatch.setattr(transformer, "stored_gradient", lambda x: x)
    plain = as_numpy(stack(x)), [as_numpy(g) for g in _gradients(stack, (x,), projection)]
    np.testing.assert_array_equal(with_store[0], plain[0])
    np.testing.assert_allclose(with_store[1][0], plain[1][0], rtol=1e-6, atol=1e-7)
    if keras.config.backend() != "jax":
        return
    import jax
    import jax.numpy as jnp

    def cubes(t):
        return jnp.sum(backend_quirks.stored_gradient(t) ** 3)

    assert "cond" in str(jax.make_jaxpr(jax.grad(cubes))(x))  # the quirk is in the gradient
    np.testing.assert_allclose(jax.jit(jax.grad(cubes))(x), 3 * x**2, rtol=1e-6)
    second = jax.jit(jax.grad(lambda t: jnp.sum(jax.grad(cubes)(t))))(x)
    np.testing.assert_allclose(second, 6 * x, rtol=1e-6)
    _, tangent = jax.jit(lambda t: jax.jvp(cubes, (t,), (jnp.ones_like(t),)))(x)
    np.testing.assert_allclose(tangent, np.sum(3 * x**2), rtol=1e-5)
    poisoned = x.copy()
    poisoned[0, 0, 0] = np.nan

    def weighted(t):
        return jnp.sum(backend_quirks.stored_gradient(t) * projection)

    np.testing.assert_array_equal(jax.jit(jax.grad(weighted))(poisoned), projection)


if keras.config.backend() == "jax":

    def test_stored_gradient_keeps_xla_from_refusing_the_residual_sums(monkeypatch):
        """Without `stored_gradient`, XLA:CPU fuses a residual stream's gradient (a running sum
        over the blocks) into every operation that reads it, so the first blocks' fusions read
        every later block's terms: a 12-block stack's largest fusion read 204 operands (jax
        0.10.2). With it, the gradient is stored at each block input and the largest read 25.
        The optimized program's largest elementwise fusion must be at least 4x smaller with it."""
        import re

        import jax

        from vitkit.layers import transformer

        def largest_fusion():
            stack, x = _residual_stack(12)
            weights = [v.value for v in stack.trainable_variables]

            def loss(weights, x):
                y, _ = stack.stateless_call(weights, [], x)
                return keras.ops.sum(y * y)

            program = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(weights, x).compile().as_text()
            fusions = re.finditer(r"= \S+ fusion\((.*?)\), kind=kLoop", program)
            return max(found.group(1).count("%") for found in fusions)

        stored = largest_fusion()
        monkeypatch.setattr(transformer, "stored_gradient", lambda x: x)
        assert 4 * stored < largest_fusion()


if keras.config.backend() == "torch":

    @pytest.mark.parametrize("use_bias", [True, False])
    @pytest.mark.parametrize("shape", [(2, 7, 12), (5, 12), (2, 3, 4, 12)])
    def test_onednn_dense_matches_dense_values_and_gradients(monkeypatch, shape, use_bias):
        """Eager torch's float32 Dense through oneDNN (`backend_quirks.ONEDNN_DENSE`, on by
        default on AMD CPUs; forced on here, whatever the CPU): Keras' numbers, shapes and
        activation, on a permuted (non-contiguous) input too; the gradients of the input,
        kernel and bias, and a second derivative (`create_graph`), as torch's own linear
        gives them. bfloat16 keeps torch's linear."""
        from vitkit.layers import backend_quirks

        calls = []
        original = backend_quirks._LINEAR_POINTWISE

        def counting(*args):
            calls.append(args[0].shape)
            return original(*args)

        monkeypatch.setattr(backend_quirks, "_LINEAR_POINTWISE", counting)
        monkeypatch.setattr(backend_quirks, "ONEDNN_DENSE", True)
        dense = keras.layers.Dense(9, activation="gelu", use_bias=use_bias)

        class Outer(keras.layers.Layer):
            def call(self, x):
                return backend_quirks.call_sublayer(dense, x)

        outer = Outer()
        rng = np.random.default_rng(11)
        x = torch.tensor(rng.normal(size=shape[:-2] + shape[:-3:-1]), dtype=torch.float32)
        x = x.transpose(-1, -2)  # a non-contiguous view of `shape`
        assert x.shape == shape and not x.is_contiguous()
        outer(x)
        for weight in dense.weights:
            weight.assign(rng.normal(size=weight.shape).astype("float32"))

        def values_and_grads():
            xg = x.detach().clone().requires_grad_()
            y = outer(xg)
            weights = [xg, *(w.value for w in dense.trainable_weights)]
            grads = torch.autograd.grad((y**2).sum(), weights, create_graph=True)
            # a second derivative: of the input gradient's norm, by the kernel
            (second,) = torch.autograd.grad((grads[0] ** 2).sum(), [dense.kernel.value])
            return [as_numpy(t.detach()) for t in (y, *grads, second)]

        fast = values_and_grads()
        assert calls, "the oneDNN product was not called"
        assert len(fast) == (5 if use_bias else 4)
        monkeypatch.setattr(backend_quirks, "ONEDNN_DENSE", False)
        calls.clear()
        plain = values_and_grads()
        assert not calls
        for got, expected in zip(fast, plain):  # float32 rounding, in another order
            assert got.shape == expected.shape and rel_err(got, expected) < 1e-5
        monkeypatch.setattr(backend_quirks, "FAST_TORCH_CALLS", False)  # Keras' own call
        np.testing.assert_allclose(fast[0], as_numpy(outer(x)), rtol=2e-5, atol=2e-5)
        monkeypatch.setattr(backend_quirks, "FAST_TORCH_CALLS", True)
        monkeypatch.setattr(backend_quirks, "ONEDNN_DENSE", True)
        half = keras.layers.Dense(9, dtype="bfloat16")
        half.build(shape)
        with torch.no_grad():
            y = backend_quirks._torch_dense(half, x.to(torch.bfloat16))
        assert y.dtype is torch.bfloat16 and not calls

    def test_onednn_dense_lays_out_broadcast_gradients(monkeypatch):
        """The gradient of a sum is a broadcast (zero strides); handed to oneDNN as it is, a
        `(1568, 384)` kernel gradient took 2.3 s instead of 3 ms. No oneDNN call of the
        backward sees a zero stride, and the gradients are torch's."""
        from vitkit.layers import backend_quirks

        strides = []
        original = backend_quirks._LINEAR_POINTWISE

        def recording(*args):
            strides.extend(t.stride() for t in args if isinstance(t, torch.Tensor))
            return original(*args)

        monkeypatch.setattr(backend_quirks, "_LINEAR_POINTWISE", recording)
        monkeypatch.setattr(backend_quirks, "ONEDNN_DENSE", True)
        dense = keras.layers.Dense(5)
        dense.build((None, 3))
        x = torch.tensor(np.random.default_rng(2).normal(size=(4, 6, 3)), dtype=torch.float32)

        def grads():
            xg = x.detach().clone().requires_grad_()
            y = backend_quirks._torch_dense(dense, xg)
            return torch.autograd.grad(y.sum(), [xg, dense.kernel.value, dense.bias.value])

        fast = grads()
        assert len(strides) >= 6 and all(0 not in s for s in strides), strides
        monkeypatch.setattr(backend_quirks, "ONEDNN_DENSE", False)
        for got, expected in zip(fast, grads(), strict=True):
            assert rel_err(as_numpy(got), as_numpy(expected)) < 1e-5

    def test_onednn_dense_is_kept_by_torch_compile_not_by_export(monkeypatch):
        """The oneDNN Dense is the custom op `vitkit::onednn_linear`: torch.compile keeps it
        in the forward and the backward graph (Inductor would turn torch's linear into MKL's
        product), with torch's numbers and gradients. torch.export's program, which may run
        anywhere, has no oneDNN op (its tensors are not plain ones: Keras' own call)."""
        from vitkit.layers import backend_quirks

        calls = []
        original = backend_quirks._LINEAR_POINTWISE

        def counting(*args):
            calls.append(tuple(args[0].shape))
            return original(*args)

        monkeypatch.setattr(backend_quirks, "_LINEAR_POINTWISE", counting)
        monkeypatch.setattr(backend_quirks, "ONEDNN_DENSE", True)
        dense = keras.layers.Dense(6, activation="gelu")

        class Outer(keras.layers.Layer):
            def call(self, x):
                return backend_quirks.call_sublayer(dense, x)

        outer = Outer()
        rng = np.random.default_rng(5)
        x = torch.tensor(rng.normal(size=(2, 5, 4)), dtype=torch.float32)
        outer(x)

        def loss_and_grads(fn):
            xg = x.detach().clone().requires_grad_()
            y = fn(xg)
            weights = [xg, *(w.value for w in dense.trainable_weights)]
            grads = torch.autograd.grad((y**2).sum(), weights)
            return [as_numpy(t.detach()) for t in (y, *grads)]

        torch._dynamo.reset()
        compiled = loss_and_grads(torch.compile(outer, backend="aot_eager", fullgraph=True))
        # forward (10 rows); backward: the input's gradient (10 rows), the kernel's (4 rows)
        assert sorted(calls) == [(4, 10), (10, 4), (10, 6)]
        monkeypatch.setattr(backend_quirks, "ONEDNN_DENSE", False)
        plain = loss_and_grads(outer)
        for got, expected in zip(compiled, plain, strict=True):
            assert got.shape == expected.shape and rel_err(got, expected) < 1e-5

        monkeypatch.setattr(backend_quirks, "ONEDNN_DENSE", True)
        calls.clear()

        class Module(torch.nn.Module):
            def forward(self, x):
                return outer(x)

        program = torch.export.export(Module(), (x,))
        targets = {str(node.target) for node in program.graph.nodes}
        assert not calls and not any("onednn" in target for target in targets), targets
        np.testing.assert_allclose(as_numpy(program.module()(x)), plain[0], rtol=1e-5, atol=1e-5)
