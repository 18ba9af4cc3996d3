"""The plain-token ViT family beyond the harness: DeepViT, CaiT, T2T-ViT, Parallel ViT and the
ViT for small datasets. Their shared blocks on their own, what only one model has (CaiT's layer
dropout, T2T's `transformer=`, the standalone SPT), inputs the parity configs do not cover, the
constructors against vit-pytorch's, and preset sizes."""

from __future__ import annotations

import inspect
import itertools

import keras
import numpy as np
import pytest
import torch

import vitkit
from backends_tests.helpers import (
    as_numpy,
    compiled_forward,
    plain_kwargs,
    randomize_torch,
    reference_class,
    rel_err,
)
from backends_tests.test_layers import (
    test_layer_config_round_trip_and_serialization as check_layer_round_trip,
)
from backends_tests.test_parity import TOLERANCE, reference_pair
from vitkit import layers
from vitkit.convert import from_vit_pytorch
from vitkit.models.cait import CaiT, CaiTTransformer
from vitkit.models.deepvit import ReAttention, ReAttentionTransformer
from vitkit.models.parallel_vit import ParallelTransformer
from vitkit.models.t2t import T2TViT, TokensToToken
from vitkit.models.vit_for_small_dataset import SPT, LSATransformer

FAMILY = ["cait", "deepvit", "parallel_vit", "t2t", "vit_for_small_dataset"]

# --- shared blocks and the family's own layers: config == constructor, serialization ------

BLOCKS = [
    (layers.TalkingHeadsAttention, dict(dim=12, heads=3, dim_head=5), (2, 7, 12)),
    (layers.TalkingHeadsAttention, dict(dim=12, heads=2, dim_head=4, separate_kv=True), (2, 7, 12)),
    (layers.LocalitySelfAttention, dict(dim=12, heads=3, dim_head=5, dropout=0.1), (2, 7, 12)),
    (layers.LayerScale, dict(init_value=1e-5), (2, 7, 12)),
    (
        layers.Transformer,
        dict(dim=12, depth=2, heads=3, dim_head=5, mlp_dim=17, layer_scale=True, layer_dropout=0.3),
        (2, 7, 12),
    ),
    (ReAttention, dict(dim=12, heads=3, dim_head=5), (2, 7, 12)),
    (ReAttentionTransformer, dict(dim=12, depth=2, heads=3, dim_head=5, mlp_dim=17), (2, 7, 12)),
    (CaiTTransformer, dict(dim=12, depth=2, heads=3, dim_head=5, mlp_dim=17), (2, 7, 12)),
    (LSATransformer, dict(dim=12, depth=1, heads=2, dim_head=5, mlp_dim=17), (2, 7, 12)),
    (
        ParallelTransformer,
        dict(dim=12, depth=2, heads=3, dim_head=5, mlp_dim=17, num_parallel_branches=3),
        (2, 7, 12),
    ),
    (TokensToToken, dict(dim=12, t2t_layers=((3, 2), (2, 1)), channels=2), (2, 9, 7, 2)),
    (SPT, dict(dim=12, patch_size=(2, 3), channels=2), (2, 6, 9, 2)),
]


@pytest.mark.parametrize("cls, kwargs, shape", BLOCKS, ids=lambda v: getattr(v, "__name__", ""))
def test_block_config_round_trip_and_serialization(cls, kwargs, shape):
    check_layer_round_trip(cls, kwargs, shape)


def test_parallel_transformer_refuses_options_it_does_not_wire():
    with pytest.raises(TypeError, match="'layer_scale'"):
        ParallelTransformer(12, 2, 3, 5, 17, layer_scale=True)


def test_every_vitkit_class_has_its_own_registered_name():
    """Keras keeps one class per registered name and silently replaces an earlier one: two
    vitkit classes named alike (three modules define a `ViT`) must register apart, or loading
    a saved model rebuilds the wrong class."""
    import importlib
    import pkgutil

    import vitkit.layers
    import vitkit.models

    abstract = {"VitkitLayer", "VitkitModel", "ClassicViT"}  # bases, never built themselves
    for package in (vitkit.layers, vitkit.models):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for cls in vars(module).values():
                if (
                    isinstance(cls, type)
                    and issubclass(cls, keras.layers.Layer)
                    and cls.__module__ == module.__name__
                    and cls.__name__ not in abstract
                ):
                    name = keras.saving.get_registered_name(cls)
                    assert keras.saving.get_registered_object(name) is cls, (cls, name)


# --- constructors: vit-pytorch's keyword arguments and defaults, plus data_format ----------


def _arguments(cls) -> dict:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.name != "self" and p.kind == p.KEYWORD_ONLY}


@pytest.mark.parametrize("name", FAMILY)
def test_constructor_is_vit_pytorchs(name):
    spec = vitkit.get_spec(name)
    ours = _arguments(spec.cls)
    assert ours.pop("data_format") == "channels_last"
    assert ours == _arguments(reference_class(spec))


def test_spt_constructor_is_vit_pytorchs():
    from vit_pytorch.vit_for_small_dataset import SPT as Reference

    ours = _arguments(SPT)
    assert ours.pop("data_format") == "channels_last"
    assert ours == _arguments(Reference)


# --- inputs smaller than image_size, and not square where the reference allows it -------

SMALLER_INPUTS = [("deepvit", 0, (16, 24)), ("cait", 0, (16, 24)), ("cait", 1, (24, 8))]
SMALLER_INPUTS += [("t2t", 0, (14, 14)), ("vit_for_small_dataset", 1, (16, 24))]


@pytest.mark.parametrize("name, index, size", SMALLER_INPUTS)
def test_smaller_inputs_match_vit_pytorch(name, index, size):
    spec, config, ref = reference_pair(name, index)
    x = np.random.default_rng(1).normal(size=(2, config.get("channels", 3), *size))
    x = x.astype("float32")
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    ours = from_vit_pytorch(spec.cls(**config), ref.state_dict())
    assert rel_err(as_numpy(ours(x.transpose(0, 2, 3, 1))), expected) < TOLERANCE


# --- vit_for_small_dataset.SPT on its own --------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, size",
    [(dict(dim=24, patch_size=4, channels=3), (20, 12)), (dict(dim=9, patch_size=3), (9, 9))],
)
def test_spt_alone_matches_vit_pytorch(kwargs, size):
    from vit_pytorch.vit_for_small_dataset import SPT as Reference

    ref = randomize_torch(Reference(**kwargs)).eval()
    channels = kwargs.get("channels", 3)
    x = np.random.default_rng(0).normal(size=(2, channels, *size)).astype("float32")
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    for data_format, images in (
        ("channels_last", x.transpose(0, 2, 3, 1)),
        ("channels_first", x),
    ):
        spt = SPT(**kwargs, data_format=data_format)
        spt(images)  # build
        from_vit_pytorch(spt, ref.state_dict())
        got = as_numpy(spt(images))
        assert got.shape == expected.shape
        assert rel_err(got, expected) < TOLERANCE


def test_spt_rejects_other_channel_counts():
    with pytest.raises(ValueError, match="channels"):
        SPT(dim=8, patch_size=2, channels=3)(np.zeros((1, 4, 4, 1), "float32"))


# --- CaiT's layer dropout ------------------------------------------------------------------


def _subset_outputs(transformer, x):
    """The stack's output for every non-empty subset of its blocks, run in order."""
    outputs = {}
    for keep in itertools.product((False, True), repeat=transformer.depth):
        if any(keep):
            y = keras.ops.convert_to_tensor(x)
            for index in np.flatnonzero(keep):
                y = transformer.residual_block(int(index), y)
            outputs[keep] = as_numpy(y)
    return outputs


def _which_subset(y, outputs):
    matches = [k for k, v in outputs.items() if np.allclose(y, v, rtol=1e-5, atol=1e-5)]
    assert len(matches) == 1, "the output is no stack of a non-empty subset of the blocks"
    return matches[0]


@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_layer_dropout_drops_whole_blocks_and_keeps_one(rate):
    transformer = layers.Transformer(
        12, depth=3, heads=2, dim_head=5, mlp_dim=17, final_norm=False, layer_dropout=rate
    )
    x = np.random.default_rng(0).normal(size=(2, 5, 12)).astype("float32")
    np.testing.assert_array_equal(as_numpy(transformer(x)), as_numpy(transformer(x)))
    outputs = _subset_outputs(transformer, x)
    np.testing.assert_allclose(
        as_numpy(transformer(x, training=False)), outputs[(True,) * 3], rtol=1e-5, atol=1e-5
    )
    seen = {_which_subset(as_numpy(transformer(x, training=True)), outputs) for _ in range(12)}
    assert len(seen) > 1, seen  # the subset changes from call to call
    # compiled (jit / XLA / torch.compile): no data-dependent shape stands in the way
    _which_subset(as_numpy(compiled_forward(transformer, x, training=True)), outputs)


def test_cait_layer_dropout_in_training_only():
    from vit_pytorch.cait import CaiT as Reference

    spec = vitkit.get_spec("cait")
    config = {**spec.parity[1], "dropout": 0.0, "emb_dropout": 0.0, "layer_dropout": 0.5}
    torch.manual_seed(0)
    ref = randomize_torch(Reference(**plain_kwargs(config))).eval()
    # vit-pytorch drops layers in eval() too; its inference without layer dropout is ours
    ref.patch_transformer.layer_dropout = ref.cls_transformer.layer_dropout = 0.0
    model = from_vit_pytorch(CaiT(**config), ref.state_dict())
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype("float32")
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    images = x.transpose(0, 2, 3, 1)
    first, second = (as_numpy(model(images, training=False)) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    assert rel_err(first, expected) < TOLERANCE
    trained = [as_numpy(model(images, training=True)) for _ in range(6)]
    assert any(rel_err(y, first) > 1e-3 for y in trained)
    assert any(rel_err(a, b) > 1e-3 for a, b in itertools.combinations(trained, 2))


# --- T2T-ViT's `transformer=` --------------------------------------------------------------


@keras.saving.register_keras_serializable(package="vitkit_tests")
class GatedMixer(keras.layers.Layer):
    """A stand-in encoder from outside vitkit: `x + tanh(Dense(x))`."""

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.dense = keras.layers.Dense(width)

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, x):
        return x + keras.ops.tanh(self.dense(x))

    def get_config(self):
        return {**super().get_config(), "width": self.width}


T2T_SMALL = dict(image_size=12, num_classes=7, dim=20, t2t_layers=((3, 2), (3, 1)))


def test_t2t_takes_any_keras_layer_as_transformer_and_saves_it(tmp_path):
    model = T2TViT(**T2T_SMALL, transformer=GatedMixer(20))  # depth, heads, mlp_dim unneeded
    x = np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype("float32")
    expected = as_numpy(model(x))
    assert expected.shape == (2, 7)
    config = model.get_config()
    assert config["transformer"]["class_name"] == "GatedMixer"
    assert config["depth"] is None
    clone = T2TViT.from_config(config)
    assert isinstance(clone.transformer, GatedMixer) and clone.get_config() == config

    model.save(tmp_path / "t2t.keras")
    loaded = keras.saving.load_model(tmp_path / "t2t.keras", safe_mode=True)
    assert isinstance(loaded.transformer, GatedMixer)
    assert loaded.get_config() == config
    np.testing.assert_array_equal(as_numpy(loaded(x)), expected)


def test_t2t_transformer_must_keep_the_width():
    model = T2TViT(**T2T_SMALL, transformer=keras.layers.Dense(7))
    with pytest.raises(ValueError, match="`transformer` must keep the token width"):
        model(np.zeros((1, 12, 12, 3), "float32"))


def test_t2t_custom_transformer_matches_vit_pytorch():
    """A vit-pytorch encoder passed to the reference, ours (mapping its weights) to us."""
    from vit_pytorch.t2t import T2TViT as Reference
    from vit_pytorch.vit import Transformer as ReferenceTransformer

    config = dict(image_size=20, num_classes=5, dim=16, t2t_layers=((5, 3), (3, 2)), channels=2)
    sizes = dict(dim=16, depth=2, heads=3, dim_head=6, mlp_dim=11)
    torch.manual_seed(0)
    ref = Reference(**config, transformer=ReferenceTransformer(**sizes))
    ref = randomize_torch(ref).eval()
    ours = T2TViT(**config, transformer=layers.Transformer(**sizes))
    from_vit_pytorch(ours, ref.state_dict())
    x = np.random.default_rng(0).normal(size=(2, 2, 20, 20)).astype("float32")
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    assert rel_err(as_numpy(ours(x.transpose(0, 2, 3, 1))), expected) < TOLERANCE


# --- presets: vit-pytorch's exact counts, the papers' rounded ones --------------------------

# Table 1 of the CaiT paper (millions, rounded); vit-pytorch's layout differs a little (no q/k/v
# bias, LayerNorms around the patch projection, talking heads in class attention too).
CAIT_PUBLISHED = {"cait_xxs24_224": 12.0e6, "cait_s24_224": 46.9e6}


@pytest.mark.parametrize("preset", ["cait_xxs24_224", "cait_s24_224", "t2t_vit_14"])
def test_preset_parameter_counts_equal_vit_pytorch(preset):
    spec = vitkit.get_spec(preset)
    model = vitkit.create_model(preset)
    model.build((None, 224, 224, 3))
    ref = reference_class(spec)(**plain_kwargs(spec.presets[preset]))
    count = model.count_params()
    assert count == sum(p.numel() for p in ref.parameters())
    if preset in CAIT_PUBLISHED:
        assert abs(count - CAIT_PUBLISHED[preset]) / CAIT_PUBLISHED[preset] < 0.01, count


# --- the digits configurations (`vitkit train`) --------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
def test_digits_config_runs_on_8x8_images(name):
    spec = vitkit.get_spec(name)
    model = spec.cls(**spec.digits)
    channels = model.channels  # CaiT takes 3 (vit-pytorch's CaiT has no `channels`)
    y = as_numpy(model(np.zeros((2, 8, 8, channels), "float32")))
    assert y.shape == (2, 10)
