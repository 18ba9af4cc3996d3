"""The two base classes: every vitkit layer and model takes its config from its constructor."""

from __future__ import annotations

import keras

from vitkit.layers.utils import constructor_args, plain, reject_unknown_kwargs


class ConfigMixin:
    """`get_config()` returns exactly the constructor's own arguments (plus Keras' name,
    trainable and dtype), read from the attribute of the same name. A test enforces that
    every registered class keeps one attribute per constructor argument.

    Arguments named in `layer_arguments` hold Keras layers or models (a user's transformer, a
    distillation teacher): the config keeps them serialized, and `from_config` rebuilds them.
    """

    layer_arguments: tuple[str, ...] = ()

    def get_config(self) -> dict:
        base = super().get_config()
        config = {key: base[key] for key in ("name", "trainable", "dtype") if key in base}
        for arg in constructor_args(type(self)):
            value = getattr(self, arg)
            if arg in self.layer_arguments:
                value = keras.saving.serialize_keras_object(value)
            config[arg] = plain(value)
        return config

    @classmethod
    def from_config(cls, config, **kwargs):
        config = dict(config)
        for arg in cls.layer_arguments:
            if isinstance(config.get(arg), dict):
                config[arg] = keras.saving.deserialize_keras_object(config[arg])
        return super().from_config(config, **kwargs)


class VitkitLayer(ConfigMixin, keras.layers.Layer):
    """A Keras layer whose unknown keyword arguments are a `TypeError` naming them."""

    def __init__(self, **kwargs):
        reject_unknown_kwargs(type(self).__name__, kwargs)
        super().__init__(**kwargs)
