"""Stochastic depth: "Deep Networks with Stochastic Depth" (Huang et al., 2016,
arXiv:1603.09382), per sample, as timm's and vit-pytorch's `DropPath`."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.layers.base import VitkitLayer
from vitkit.layers.utils import check_rate


@keras.saving.register_keras_serializable(package="vitkit")
class DropPath(VitkitLayer):
    """In training, drops a residual branch for a random subset of the samples: each sample's
    output is zeroed with probability `rate`, the others scaled by `1 / (1 - rate)`. The
    identity in inference.

    Args:
        rate: probability of dropping a sample's branch, in [0, 1).
        seed: seed of the random draws.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = check_rate("rate", rate, owner=type(self).__name__)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training or self.rate == 0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        draw = keras.random.uniform(shape, seed=self.seed_generator)
        return x * ops.cast(draw < keep, x.dtype) / ops.cast(keep, x.dtype)
