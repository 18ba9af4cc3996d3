"""LayerScale: a learned per-channel gain on each residual branch (CaiT, Touvron et al. 2021,
arXiv:2103.17239, sec. 3.1)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.layers.base import VitkitLayer


def layer_scale_init(depth: int) -> float:
    """CaiT's starting gain for a block at `depth` (sec. 3.1): 0.1 up to depth 18, 1e-5 up to
    24, 1e-6 beyond. vit-pytorch applies it with each block's own depth (1, 2, ...)."""
    if depth <= 18:
        return 0.1
    return 1e-5 if depth <= 24 else 1e-6


@keras.saving.register_keras_serializable(package="vitkit")
class LayerScale(VitkitLayer):
    """`(..., dim) -> (..., dim) * gain`, a learned gain per channel starting at `init_value`.

    Args:
        init_value: the starting value of every channel's gain.
    """

    def __init__(self, init_value=0.1, **kwargs):
        super().__init__(**kwargs)
        if isinstance(init_value, bool) or not isinstance(init_value, (int, float)):
            raise ValueError(f"LayerScale: `init_value` must be a number; got {init_value!r}.")
        self.init_value = float(init_value)

    def build(self, input_shape):
        self.gain = self.add_weight(
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.init_value),
            name="gain",
        )

    def call(self, x):
        return x * ops.cast(self.gain, x.dtype)
