"""Attention over channels-last feature maps `(b, h, w, c)`: inside windows (Swin, Liu et al.
2021, arXiv:2103.14030; Twins' locally-grouped attention; CrossFormer's short- and long-distance
attention), or against keys and values pooled by a strided convolution (PVT's spatial-reduction
attention, Wang et al. 2021, arXiv:2102.12122; Twins' global sub-sampled attention; ScalableViT's
scalable self-attention)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.layers.attention import Attention
from vitkit.layers.utils import check_int, check_pair


def window_partition(x, window_hw, dilated=False):
    """Cut a map into windows of `window_hw` tokens: `(b, nh*wh, nw*ww, c) -> (b*nh*nw, wh*ww, c)`.

    Windows come out in row-major order of the (nh, nw) grid, each batch element's together,
    and the tokens of a window in row-major order. Contiguous windows (`dilated=False`) are
    blocks of `wh x ww` neighbouring pixels; dilated windows (`dilated=True`) gather the pixels
    `nh` rows and `nw` columns apart, so each spans the whole map (CrossFormer's long-distance
    attention). Both sides of the map must be divisible by the window's.
    """
    _, height, width, channels = ops.shape(x)
    wh, ww = window_hw
    nh, nw = height // wh, width // ww
    if dilated:
        x = ops.reshape(x, (-1, wh, nh, ww, nw, channels))
        x = ops.transpose(x, (0, 2, 4, 1, 3, 5))  # b nh nw wh ww c
    else:
        x = ops.reshape(x, (-1, nh, wh, nw, ww, channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # b nh nw wh ww c
    return ops.reshape(x, (-1, wh * ww, channels))


def window_merge(windows, map_hw, window_hw, dilated=False):
    """The inverse of `window_partition`: `(b*nh*nw, wh*ww, c) -> (b, nh*wh, nw*ww, c)` for a
    map of `map_hw` pixels."""
    height, width = map_hw
    wh, ww = window_hw
    nh, nw = height // wh, width // ww
    channels = ops.shape(windows)[-1]
    x = ops.reshape(windows, (-1, nh, nw, wh, ww, channels))
    # dilated: b wh nh ww nw c; contiguous: b nh wh nw ww c
    x = ops.transpose(x, (0, 3, 1, 4, 2, 5) if dilated else (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, height, width, channels))


@keras.saving.register_keras_serializable(package="vitkit")
class WindowAttention(Attention):
    """Pre-norm multi-head attention inside windows of a map: `(b, h, w, c) -> (b, h, w, dim)`.

    Each window attends within itself only; the windows are cut by `window_partition` and put
    back by `window_merge`, and everything else is `Attention` (LayerNorm and projections are
    per pixel, so they commute with the cut). `call(x, bias=...)` adds a position bias
    broadcastable to `(windows, heads, n, n)`, `n = wh * ww`.

    Args:
        dim: channels in and out.
        window_size: int or (height, width) of a window; both sides of the map must be
            divisible by it. `None`: the whole map is one window.
        dilated: windows of pixels spread over the whole map (see `window_partition`).
        heads, dim_head, dropout, qkv_bias, out_bias, separate_kv, dim_value, output_dropout:
            as in `Attention`.
    """

    def __init__(
        self,
        dim,
        window_size=None,
        dilated=False,
        heads=8,
        dim_head=64,
        dropout=0.0,
        qkv_bias=False,
        out_bias=True,
        separate_kv=False,
        dim_value=None,
        output_dropout=None,
        **kwargs,
    ):
        super().__init__(
            dim,
            heads=heads,
            dim_head=dim_head,
            dropout=dropout,
            project_out=True,
            out_bias=out_bias,
            qkv_bias=qkv_bias,
            separate_kv=separate_kv,
            dim_value=dim_value,
            output_dropout=output_dropout,
            **kwargs,
        )
        self.window_size = window_size
        self.dilated = dilated
        self.window_hw = (
            None
            if window_size is None
            else check_pair("window_size", window_size, owner=type(self).__name__)
        )

    def window_of(self, x) -> tuple:
        """The window for a map `x`: the configured one, or the whole map."""
        if self.window_hw is not None:
            return self.window_hw
        _, height, width, _ = ops.shape(x)
        return (height, width)

    def partition(self, x):
        return window_partition(x, self.window_of(x), self.dilated)

    def merge(self, windows, x):
        """Windows back into a map shaped as `x` was."""
        _, height, width, _ = ops.shape(x)
        return window_merge(windows, (height, width), self.window_of(x), self.dilated)

    def call(self, x, bias=None, training=None):
        out = super().call(self.partition(x), bias=bias, training=training)
        return self.merge(out, x)


@keras.saving.register_keras_serializable(package="vitkit")
class SpatialReductionAttention(Attention):
    """Pre-norm attention over a map `(b, h, w, c) -> (b, h, w, dim)` in which every pixel
    queries keys and values pooled by a `reduction x reduction` convolution of stride
    `reduction`: `(h // r) * (w // r)` of them, so the cost falls by `r**2`.

    Queries come from a per-pixel projection (`to_q`), keys and values from one strided
    convolution (`to_kv`, its first `heads * dim_head` outputs the keys).

    Args:
        dim: channels in and out.
        reduction: kernel size and stride of the key/value convolution; 1 is plain global
            attention.
        heads, dim_head, dim_value, dropout, output_dropout, qkv_bias, out_bias: as in
            `Attention`.
    """

    def __init__(
        self,
        dim,
        reduction=1,
        heads=8,
        dim_head=64,
        dim_value=None,
        dropout=0.0,
        output_dropout=None,
        qkv_bias=False,
        out_bias=True,
        **kwargs,
    ):
        # `make_projection` (called by Attention's constructor) reads it.
        self.reduction = check_int("reduction", reduction, owner=type(self).__name__)
        super().__init__(
            dim,
            heads=heads,
            dim_head=dim_head,
            dropout=dropout,
            project_out=True,
            out_bias=out_bias,
            qkv_bias=qkv_bias,
            separate_kv=True,
            dim_value=dim_value,
            output_dropout=output_dropout,
            **kwargs,
        )

    def make_projection(self, name, units):
        if name != "to_kv":
            return super().make_projection(name, units)
        r = self.reduction
        return keras.layers.Conv2D(
            units, r, strides=r, use_bias=self.qkv_bias, dtype=self.dtype_policy, name=name
        )

    def queries_keys_values(self, x, context=None):
        """Normed map -> q (b, h*w, heads, d), k and v (b, (h//r)*(w//r), heads, .)."""
        if context is not None:
            raise ValueError(f"{self.name}: spatial-reduction attention takes no `context`.")
        _, height, width, _ = ops.shape(x)
        (q,) = self.split_heads(ops.reshape(self.to_q(x), (-1, height * width, self.inner_dim)), 1)
        kv = self.to_kv(x)
        _, rh, rw, units = ops.shape(kv)
        k, v = self.split_with_values(ops.reshape(kv, (-1, rh * rw, units)), 2)
        return q, k, v

    def call(self, x, training=None):
        _, height, width, _ = ops.shape(x)
        out = super().call(x, training=training)  # (b, h*w, dim)
        return ops.reshape(out, (-1, height, width, self.dim))
