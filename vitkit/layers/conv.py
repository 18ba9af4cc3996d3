"""Convolutions on channels-last maps as torch pads them, and the position encoding generator."""

from __future__ import annotations

import keras

from vitkit.layers.base import VitkitLayer
from vitkit.layers.utils import check_int, zero_pad


@keras.saving.register_keras_serializable(package="vitkit")
class ZeroPaddedConv2D(VitkitLayer):
    """`Conv2D` on `(b, h, w, c)` maps after `padding` zeros on every side, as
    `torch.nn.Conv2d(padding=p)`: the output side is `(n + 2p - kernel) // stride + 1` and the
    windows sit where torch's do (Keras' `"same"` pads strided convolutions differently).

    Args:
        filters: output channels.
        kernel_size: int, a square kernel.
        strides: int.
        padding: zeros added on each side.
        use_bias: whether the convolution has a bias.
    """

    def __init__(self, filters, kernel_size, strides=1, padding=0, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.filters = check_int("filters", filters, owner=owner)
        self.kernel_size = check_int("kernel_size", kernel_size, owner=owner)
        self.strides = check_int("strides", strides, owner=owner)
        self.padding = check_int("padding", padding, minimum=0, owner=owner)
        self.use_bias = use_bias
        self.conv = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            use_bias=use_bias,
            dtype=self.dtype_policy,
            name="conv",
        )

    @staticmethod
    def output_side(side: int, kernel_size: int, strides: int, padding: int) -> int:
        """Output length along one axis, torch's formula."""
        return (side + 2 * padding - kernel_size) // strides + 1

    def build(self, input_shape):
        p = self.padding
        h, w = input_shape[1], input_shape[2]
        self.conv.build(
            (
                input_shape[0],
                None if h is None else h + 2 * p,
                None if w is None else w + 2 * p,
                input_shape[3],
            )
        )

    def call(self, x):
        p = self.padding
        return self.conv(zero_pad(zero_pad(x, 1, p, p), 2, p, p))

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        k, s, p = self.kernel_size, self.strides, self.padding
        h = None if h is None else self.output_side(h, k, s, p)
        w = None if w is None else self.output_side(w, k, s, p)
        return (b, h, w, self.filters)

    def vit_pytorch_state_map(self):
        """torch's `Conv2d(padding=p)` holds exactly our convolution's weights."""
        return self.conv


@keras.saving.register_keras_serializable(package="vitkit")
class PEG(VitkitLayer):
    """Position encoding generator (CPVT, Chu et al. 2021, arXiv:2102.10882): a depth-wise
    `kernel_size x kernel_size` convolution added to its input, `(b, h, w, c) -> (b, h, w, c)`.
    Position information then comes from the zero padding at the borders, so any map size
    works.

    Args:
        kernel_size: odd side of the depth-wise kernel (the map keeps its size).
    """

    def __init__(self, kernel_size=3, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.kernel_size = check_int("kernel_size", kernel_size, owner=owner)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"{owner}: `kernel_size` must be odd so the map keeps its size; got {kernel_size}."
            )
        self.proj = keras.layers.DepthwiseConv2D(
            kernel_size, padding="same", dtype=self.dtype_policy, name="proj"
        )

    def build(self, input_shape):
        self.proj.build(input_shape)

    def call(self, x):
        return self.proj(x) + x

    def vit_pytorch_state_map(self, proj="proj"):
        """vit-pytorch's PEG: the convolution under `proj` (`"proj.fn"` inside a Residual)."""
        return {proj: self.proj}
