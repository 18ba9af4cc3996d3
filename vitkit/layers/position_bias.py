"""Relative position biases for attention inside a window: a learned table per relative offset
(Shaw et al. 2018, arXiv:1803.02155; Swin, arXiv:2103.14030), or a small network of the offset
(CrossFormer's dynamic position bias, Wang et al. 2021, arXiv:2108.00154, sec. 3.3)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.convert.mapping import Ignored
from vitkit.layers.attention import LN_EPSILON
from vitkit.layers.base import VitkitLayer
from vitkit.layers.utils import check_int


def relative_position_index(window_hw, offset: int, strides):
    """`(n, n)` int32 indices, `n = wh * ww`, for the tokens of a window in row-major order:
    `(dy + offset) * strides[0] + (dx + offset) * strides[1]`, where `(dy, dx)` is the offset of
    token i from token j. With `offset = w - 1` and strides `(2w - 1, 1)` these number the
    `(2w - 1)**2` offsets of a `w x w` window (Swin's table rows)."""
    wh, ww = window_hw
    ys, xs = ops.meshgrid(
        ops.arange(wh, dtype="int32"), ops.arange(ww, dtype="int32"), indexing="ij"
    )
    ys, xs = ops.reshape(ys, (-1,)), ops.reshape(xs, (-1,))
    dy = ys[:, None] - ys[None, :] + offset
    dx = xs[:, None] - xs[None, :] + offset
    return dy * strides[0] + dx * strides[1]


@keras.saving.register_keras_serializable(package="vitkit")
class RelativePositionBias(VitkitLayer):
    """A learned bias per head and relative offset inside windows of up to `window_size`
    tokens a side: `window_bias((wh, ww)) -> (heads, n, n)`, `n = wh * ww`.

    The table has `(2 * window_size - 1) ** 2` rows. With `dy_major=True` row
    `(dy + w - 1) * (2w - 1) + (dx + w - 1)` holds offset `(dy, dx)` (Swin's order); with
    `dy_major=False`, `dy` varies fastest (the order of vit-pytorch's RegionViT).

    Args:
        window_size: largest window side the table covers.
        heads: one bias per attention head.
        dy_major: the order of the table's rows (see above).
    """

    def __init__(self, window_size, heads, dy_major=True, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.window_size = check_int("window_size", window_size, owner=owner)
        self.heads = check_int("heads", heads, owner=owner)
        self.dy_major = dy_major

    def build(self, input_shape=None):
        side = 2 * self.window_size - 1
        self.table = self.add_weight(
            shape=(side * side, self.heads),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="table",
        )

    def call(self, index):
        """Table rows for an int tensor of row indices: `index.shape + (heads,)`."""
        return ops.take(self.table, index, axis=0)

    def window_bias(self, window_hw):
        """The bias of a `(wh, ww)` window: `(heads, n, n)`, `n = wh * ww`."""
        w = self.window_size
        wh, ww = window_hw
        if wh > w or ww > w:
            raise ValueError(
                f"{self.name}: a {wh}x{ww} window is larger than the {w}x{w} this bias covers."
            )
        strides = (2 * w - 1, 1) if self.dy_major else (1, 2 * w - 1)
        bias = self(relative_position_index(window_hw, w - 1, strides))  # (n, n, heads)
        return ops.transpose(bias, (2, 0, 1))


@keras.saving.register_keras_serializable(package="vitkit")
class DynamicPositionBias(VitkitLayer):
    """CrossFormer's dynamic position bias: an MLP maps a relative offset `(dy, dx)` to a
    bias, so windows of any size get one: `window_bias(window_size) -> (n, n)`,
    `n = window_size**2`, shared by the heads.

    The MLP is `Dense(dim) -> LayerNorm -> ReLU`, `depth` times, then `Dense(1)` without a
    bias: a bias there would add one constant to every score, which the softmax cancels (so
    vit-pytorch's, which has no gradient, is not loaded; `Ignored`). As in
    vit-pytorch 1.26.11 it is evaluated at the `(2w + 1)**2` offsets in `[-w, w]**2`, and
    offset `(dy, dx)` of a `w x w` window reads row `(dy + w - 1) * (2w - 1) + (dx + w - 1)`
    of that list. That keeps its weights interchangeable with vit-pytorch's; each offset still
    gets a bias of its own.

    Args:
        dim: width of the hidden layers.
        depth: number of hidden layers.
    """

    def __init__(self, dim, depth=3, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.depth = check_int("depth", depth, owner=owner)
        policy = self.dtype_policy
        self.hidden = [
            keras.layers.Dense(dim, dtype=policy, name=f"hidden_{i}") for i in range(depth)
        ]
        self.norms = [
            keras.layers.LayerNormalization(epsilon=LN_EPSILON, dtype=policy, name=f"norm_{i}")
            for i in range(depth)
        ]
        self.out = keras.layers.Dense(1, use_bias=False, dtype=policy, name="out")

    def build(self, input_shape=None):
        width = 2
        for dense, norm in zip(self.hidden, self.norms):
            dense.build((None, width))
            norm.build((None, self.dim))
            width = self.dim
        self.out.build((None, self.dim))

    def call(self, offsets):
        """Relative offsets `(..., 2)` (rows, columns) -> biases `(...)`."""
        x = offsets
        for dense, norm in zip(self.hidden, self.norms):
            x = ops.relu(norm(dense(x)))
        return self.out(x)[..., 0]

    def window_bias(self, window_size):
        """The bias of a `window_size x window_size` window: `(n, n)`, `n = window_size**2`."""
        w = window_size
        offsets = ops.arange(-w, w + 1, dtype=self.compute_dtype)
        dy, dx = ops.meshgrid(offsets, offsets, indexing="ij")
        offsets = ops.stack([ops.reshape(dy, (-1,)), ops.reshape(dx, (-1,))], axis=-1)
        biases = self(offsets)  # ((2w + 1)**2,)
        index = relative_position_index((w, w), w - 1, (2 * w - 1, 1))
        return ops.take(biases, index, axis=0)

    def vit_pytorch_state_map(self):
        """vit-pytorch's `nn.Sequential`: Linear, LayerNorm, ReLU per hidden layer, then
        Linear and a Rearrange."""
        names = {}
        for i, (dense, norm) in enumerate(zip(self.hidden, self.norms)):
            names[str(3 * i)] = dense
            names[str(3 * i + 1)] = norm
        names[str(3 * self.depth)] = self.out
        names[f"{3 * self.depth}.bias"] = Ignored((1,))
        return names
