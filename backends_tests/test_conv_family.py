"""The convolutional and hierarchical transformers (CCT, CvT, PiT, LeViT, MobileViT, NesT):
BatchNorm layers, CCT's factories and its `mlp_radio` alias, presets, and the
image sizes each model takes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

import vitkit
from backends_tests.helpers import (
    as_numpy,
    batch_norm_layers,
    plain_kwargs,
    random_images,
    randomize_torch,
    reference_class,
    rel_err,
)
from vitkit.convert import from_vit_pytorch, vit_pytorch_keys
from vitkit.layers.utils import plain


def build(name, **overrides):
    spec = vitkit.get_spec(name)
    return spec.cls(**{**spec.tiny, **overrides})


@pytest.mark.parametrize("name", ["cvt", "levit", "mobile_vit"])
def test_batch_norm_models_have_batch_norms(name):
    """test_models' `test_fit_lowers_the_loss` checks that every BatchNorm's moving statistics
    move in `fit` and stay in `evaluate`: make sure that it has some to check here."""
    assert batch_norm_layers(build(name))


# CCT: the factories, the `mlp_radio` alias ----------------------------------------------


FACTORIES = ["cct_2", "cct_4", "cct_6", "cct_7", "cct_8", "cct_14", "cct_16"]


@pytest.mark.parametrize("factory", FACTORIES)
def test_cct_factories_build_what_vit_pytorch_builds(factory):
    from vit_pytorch import cct as reference

    from vitkit.models import cct

    kwargs = dict(img_size=8, n_conv_layers=1, num_classes=3, positional_embedding="learnable")
    ours = getattr(cct, factory)(**kwargs)
    ref = getattr(reference, factory)(**kwargs)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert vit_pytorch_keys(ours) == expected
    # vit-pytorch's defaults for the tokenizer: stride max(1, k // 2 - 1), padding max(1, k // 2)
    assert (ours.kernel_size, ours.stride, ours.padding) == (3, 1, 1)
    assert getattr(cct, factory)(kernel_size=7).get_config()["stride"] == 2


def test_cct_factory_matches_vit_pytorch_numerically():
    from vit_pytorch.cct import cct_2 as reference_cct_2

    from vitkit.models.cct import cct_2

    kwargs = dict(img_size=(12, 10), kernel_size=5, n_input_channels=2, num_classes=4)
    torch.manual_seed(0)
    ref = randomize_torch(reference_cct_2(**kwargs)).eval()
    ours = from_vit_pytorch(cct_2(**kwargs), ref.state_dict())
    x = np.random.default_rng(0).normal(size=(2, 2, 12, 10)).astype("float32")
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    assert rel_err(as_numpy(ours(x.transpose(0, 2, 3, 1))), expected) < 1e-4


def test_cct_mlp_radio_is_mlp_ratio_with_a_warning():
    from vitkit.models.cct import CCT

    tiny = dict(vitkit.get_spec("cct").tiny)
    tiny.pop("mlp_ratio")
    with pytest.warns(DeprecationWarning, match=r"`mlp_radio`.*`mlp_ratio`"):
        model = CCT(**tiny, mlp_radio=3.0)
    assert model.mlp_ratio == 3.0
    assert "mlp_radio" not in model.get_config()
    assert model.get_config()["mlp_ratio"] == 3.0
    hidden = model.transformer.feed_forwards[0].hidden_dim
    assert hidden == int(tiny["embedding_dim"] * 3.0)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="mlp_radio.*mlp_ratio"):
        CCT(**tiny, mlp_radio=3.0, mlp_ratio=2.0)


def test_cct_presets_are_the_factories():
    from vitkit.models import cct

    model = vitkit.create_model("cct_14_7x2_224")
    factory = cct.cct_14(
        img_size=224,
        n_conv_layers=2,
        kernel_size=7,
        num_classes=1000,
        positional_embedding="learnable",
    )
    assert model.get_config() == {**factory.get_config(), "name": model.name}
    model = vitkit.create_model("cct_7_3x1_32")
    factory = cct.cct_7(
        img_size=32, n_conv_layers=1, num_classes=10, positional_embedding="learnable"
    )
    assert model.get_config() == {**factory.get_config(), "name": model.name}


def test_mobilevit_xs_preset_is_the_seed_example_with_vit_pytorchs_parameter_count():
    spec = vitkit.get_spec("mobilevit_xs")
    config = spec.presets["mobilevit_xs"]
    seed = dict(
        image_size=(256, 256),
        dims=[96, 120, 144],
        channels=[16, 32, 48, 48, 64, 64, 80, 80, 96, 96, 384],
        num_classes=1000,
    )
    assert plain(config) == plain(seed)
    model = vitkit.create_model("mobilevit_xs")
    model.build((None, 256, 256, 3))
    ref = reference_class(spec)(**plain_kwargs(config))
    # Parameters are the trainable weights: torch keeps BatchNorm's running statistics as
    # buffers, Keras as non-trainable weights (which `count_params` would count too).
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == sum(p.numel() for p in ref.parameters())
    keras.utils.clear_session()


# The sizes each model takes --------------------------------------------------------------


def test_cct_without_position_embedding_takes_other_sizes():
    # two tokenizer layers: 1/4 of the size
    model = build("cct", positional_embedding="none", n_conv_layers=2)
    for size in [(28, 16), (9, 30)]:
        assert tuple(model(random_images(model, 2, size=size)).shape) == (2, 7)
    learnable = build("cct", n_conv_layers=2)  # unbuilt: the size is refused before building
    with pytest.raises(ValueError, match=r"15 tokens.*28x16 images \(7x4 tokens\)"):
        learnable(random_images(learnable, 2, size=(28, 16)))


def test_pit_takes_smaller_images_and_rectangular_ones():
    model = build("pit")  # (24, 16), patches of 4 with stride 2: 11x7
    assert tuple(model(random_images(model, 2, size=(16, 16))).shape) == (2, 7)
    assert tuple(model(random_images(model, 2, size=(25, 16))).shape) == (2, 7)  # 11x7 still
    with pytest.raises(ValueError, match=r"11x7 patches.*26x16 images \(12x7 patches\)"):
        model(random_images(model, 2, size=(26, 16)))


def test_nest_takes_smaller_blocks_and_refuses_larger_ones():
    model = build("nest")  # (16, 8), patches of 2, 2x2 blocks of 4x2 positions
    assert tuple(model(random_images(model, 2, size=(8, 8))).shape) == (2, 7)
    with pytest.raises(ValueError, match=r"at most 8 positions.*16x12 images \(4x3 per block\)"):
        model(random_images(model, 2, size=(16, 12)))
    with pytest.raises(ValueError, match=r"divisible by \(4, 4\).*14x8"):
        model(random_images(model, 2, size=(14, 8)))


def test_mobilevit_takes_any_size_its_patches_tile():
    model = build("mobile_vit")  # patches (2, 1) at strides 8, 16, 32
    assert tuple(model(random_images(model, 2, size=(128, 40))).shape) == (2, 7)
    with pytest.raises(ValueError, match=r"tiles at the MobileViT blocks.*96x32"):
        model(random_images(model, 2, size=(96, 32)))  # 12, 6, 3: 3 rows cannot take 2


def test_levit_takes_its_size_only():
    model = build("levit")
    with pytest.raises(ValueError, match=r"exactly \(32, 48\).*48x48"):
        model(random_images(model, 2, size=(48, 48)))


def test_levit_returns_both_heads():
    logits, distill = build("levit")(random_images(build("levit"), 2))
    assert tuple(logits.shape) == (2, 7) and tuple(distill.shape) == (2, 5)
    assert tuple(
        build("levit", num_distill_classes=None)(random_images(build("levit"), 2)).shape
    ) == (2, 7)
