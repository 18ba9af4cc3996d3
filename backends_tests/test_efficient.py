"""`efficient.ViT` takes any Keras layer as its transformer, and saves it with the model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from backends_tests.helpers import as_numpy
from vitkit.layers import Transformer
from vitkit.models.efficient import ViT

KWARGS = dict(image_size=(12, 8), patch_size=4, num_classes=3, dim=10, pool="mean")


@keras.saving.register_keras_serializable(package="vitkit_tests")
class TokenMixer(keras.layers.Layer):
    """Not a vitkit layer: a residual MLP across the tokens, (b, n, d) -> (b, n, d)."""

    def __init__(self, tokens, **kwargs):
        super().__init__(**kwargs)
        self.tokens = tokens
        self.mix = keras.layers.Dense(tokens)

    def call(self, x):
        return x + keras.ops.transpose(self.mix(keras.ops.transpose(x, (0, 2, 1))), (0, 2, 1))

    def get_config(self):
        return {**super().get_config(), "tokens": self.tokens}


@pytest.mark.parametrize(
    "transformer",
    [
        lambda: Transformer(dim=10, depth=1, heads=2, dim_head=3, mlp_dim=7),
        lambda: TokenMixer(tokens=7),  # 6 patches and the class token
        lambda: keras.Sequential([keras.layers.Dense(16, "gelu"), keras.layers.Dense(10)]),
    ],
    ids=["vitkit", "custom", "sequential"],
)
def test_any_keras_layer_is_a_transformer_and_saves_with_the_model(transformer, tmp_path):
    model = ViT(**KWARGS, transformer=transformer())
    x = np.random.default_rng(0).normal(size=(2, 12, 8, 3)).astype("float32")
    y = as_numpy(model(x))
    assert y.shape == (2, 3)
    assert model.get_config()["transformer"]["config"]  # serialized, not an object
    model.save(tmp_path / "efficient.keras")
    loaded = keras.saving.load_model(tmp_path / "efficient.keras")
    assert type(loaded.transformer) is type(model.transformer)
    assert loaded.transformer is not model.transformer
    np.testing.assert_array_equal(as_numpy(loaded(x)), y)
    # from_config rebuilds the layer from its config, with fresh weights
    clone = ViT.from_config(model.get_config())
    assert isinstance(clone.transformer, type(model.transformer))
    assert clone.get_config() == model.get_config()


def test_a_transformer_that_changes_the_shape_is_named():
    model = ViT(**KWARGS, transformer=keras.layers.Dense(4))
    with pytest.raises(ValueError, match="`transformer` must map tokens"):
        model(np.zeros((1, 12, 8, 3), "float32"))


def test_a_serialized_transformer_takes_the_models_dtype_policy():
    config = {
        "class_name": "vitkit>Transformer",
        "config": dict(dim=10, depth=1, heads=2, dim_head=3, mlp_dim=7),
    }
    model = ViT(**KWARGS, transformer=config, dtype="mixed_bfloat16")
    assert model.transformer.dtype_policy.name == "mixed_bfloat16"
    assert "dtype" not in config["config"]  # the argument is not changed
