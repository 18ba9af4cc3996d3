"""The two base classes: every vitkit layer and model takes its config from its constructor."""

from __future__ import annotations

import keras

from vitkit.layers.utils import constructor_args, plain, reject_unknown_kwargs


class ConfigMixin:
    """`get_config()` returns exactly the constructor's own arguments (plus Keras' name,
    trainable and dtype), read from the attribute of the same name. A test enforces that
    every registered class keeps one attribute per constructor argument."""

    def get_config(self) -> dict:
        base = super().get_config()
        config = {key: base[key] for key in ("name", "trainable", "dtype") if key in base}
        for arg in constructor_args(type(self)):
            config[arg] = plain(getattr(self, arg))
        return config


class VitkitLayer(ConfigMixin, keras.layers.Layer):
    """A Keras layer whose unknown keyword arguments are a `TypeError` naming them."""

    def __init__(self, **kwargs):
        reject_unknown_kwargs(type(self).__name__, kwargs)
        super().__init__(**kwargs)
