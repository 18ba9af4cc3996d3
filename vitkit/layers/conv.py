"""Convolutional pieces of the hybrid vision transformers (CCT, CvT, PiT, LeViT, MobileViT,
NesT, ...): torch-padded convolutions with an optional norm and activation, depth-wise
convolutions, max pooling, a channel LayerNorm, a convolutional stem, and the moves between
feature maps and token sequences.

Feature maps are in the model's `data_format`: `(b, h, w, c)` for `"channels_last"`,
`(b, c, h, w)` for `"channels_first"`; every convolution and pooling here runs in that layout.
Token sequences are always `(b, h * w, c)`, row-major. `ZeroPaddedConv2D` and `PEG` (the
position encoding generator) take channels-last maps only.
"""

from __future__ import annotations

import keras
from keras import ops

from vitkit.convert.mapping import channel_norm
from vitkit.layers import backend_quirks
from vitkit.layers.attention import LN_EPSILON
from vitkit.layers.backend_quirks import (
    add_channels_first_bias,
    call_sublayer,
    call_zero_padded_conv,
)
from vitkit.layers.base import ConfigMixin, VitkitLayer
from vitkit.layers.utils import (
    DATA_FORMATS,
    check_choice,
    check_int,
    check_pair,
    reject_unknown_kwargs,
    zero_pad,
)

# torch.nn.BatchNorm2d's defaults: eps 1e-5, and momentum 0.1 on the new batch (Keras counts
# the momentum on the running value, so 0.9).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
NORMS = (None, "batch", "layer")


def _bias_and_activation(layer, outputs):
    """A convolution layer's bias and activation on its convolved map. A channels_first bias
    goes through `add_channels_first_bias` (see `backend_quirks`: Keras' own `ops.add` puts it
    on the wrong axis on TensorFlow when the map is as wide as it has channels)."""
    if layer.use_bias:
        if layer.data_format == "channels_first":
            outputs = add_channels_first_bias(outputs, layer.bias)
        else:
            outputs = ops.add(outputs, layer.bias)
    return outputs if layer.activation is None else layer.activation(outputs)


@keras.saving.register_keras_serializable(package="vitkit")
class Conv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D`, right in channels_first on every backend."""

    def call(self, inputs):
        if not (self.use_bias and self.data_format == "channels_first"):
            return super().call(inputs)
        return _bias_and_activation(self, self.convolution_op(inputs, self.kernel))


@keras.saving.register_keras_serializable(package="vitkit")
class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """`keras.layers.DepthwiseConv2D`, right in channels_first on every backend, and fast on
    XLA:CPU (see `backend_quirks.depthwise_conv`)."""

    def call(self, inputs):
        outputs = backend_quirks.depthwise_conv(
            inputs,
            self.kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return _bias_and_activation(self, outputs)


backend_quirks.TORCH_CONVS.update({Conv2D: False, DepthwiseConv2D: True})


def channel_axis(data_format: str) -> int:
    return -1 if data_format == "channels_last" else 1


def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a torch convolution or pooling along one axis (floor mode); < 1 when
    the input is too small."""
    return (size + 2 * padding - kernel_size) // stride + 1


def map_to_tokens(x, data_format: str = "channels_last"):
    """Feature map `(b, h, w, c)` or `(b, c, h, w)` -> tokens `(b, h * w, c)`, row-major."""
    if data_format == "channels_first":
        x = ops.transpose(x, (0, 2, 3, 1))
    _, h, w, c = x.shape
    return ops.reshape(x, (-1, h * w, c))


def tokens_to_map(x, size, data_format: str = "channels_last"):
    """Tokens `(b, h * w, c)` -> feature map of `size = (h, w)` in `data_format`."""
    h, w = size
    x = ops.reshape(x, (-1, h, w, x.shape[-1]))
    return ops.transpose(x, (0, 3, 1, 2)) if data_format == "channels_first" else x


def spatial_size(x, data_format: str = "channels_last") -> tuple:
    """(height, width) of a feature map, as static ints."""
    return tuple(x.shape[1:3]) if data_format == "channels_last" else tuple(x.shape[2:4])


def pad_spatial(x, padding, data_format: str = "channels_last", value: float = 0.0):
    """Pad a feature map with `value` by `padding = (ph, pw)` on both sides of each spatial
    axis (zeros for torch's convolutions, `-inf` for its max pooling)."""
    axes = (1, 2) if data_format == "channels_last" else (2, 3)
    for axis, p in zip(axes, padding):
        x = zero_pad(x, axis, p, p, value)
    return x


def _padded_shape(shape, padding, data_format: str) -> tuple:
    axes = (1, 2) if data_format == "channels_last" else (2, 3)
    shape = list(shape)
    for axis, p in zip(axes, padding):
        shape[axis] = None if shape[axis] is None else shape[axis] + 2 * p
    return tuple(shape)


@keras.saving.register_keras_serializable(package="vitkit")
class ChannelLayerNorm(ConfigMixin, keras.layers.LayerNormalization):
    """LayerNorm over the channels of a feature map, in either layout (vit-pytorch's
    `LayerNorm` / `ChanLayerNorm` of CvT, NesT, Twins-SVT, RegionViT, ...):
    `(x - mean_c) / sqrt(var_c + eps) * g + b` at every position.

    On tokens `(b, n, c)` it is an ordinary LayerNorm. The reference keeps `g` and `b` as
    `(1, C, 1, 1)`; `vit_pytorch_state_map()` maps them.
    """

    def __init__(self, data_format="channels_last", epsilon=LN_EPSILON, **kwargs):
        reject_unknown_kwargs(type(self).__name__, kwargs)
        self.data_format = check_choice(
            "data_format", data_format, DATA_FORMATS, type(self).__name__
        )
        super().__init__(axis=-1, epsilon=epsilon, **kwargs)

    # Channels-first maps are normed channels-last: Keras' LayerNormalization over axis 1
    # fails on the torch backend (it hands torch's layer_norm the wrong dimensions).

    def build(self, input_shape):
        if self.data_format == "channels_first":
            input_shape = (input_shape[0], *input_shape[2:], input_shape[1])
        super().build(input_shape)

    def call(self, inputs):
        if self.data_format == "channels_last" or len(inputs.shape) != 4:
            return super().call(inputs)
        x = super().call(ops.transpose(inputs, (0, 2, 3, 1)))
        return ops.transpose(x, (0, 3, 1, 2))

    def compute_output_shape(self, input_shape):
        return input_shape

    def vit_pytorch_state_map(self):
        return channel_norm(self)


@keras.saving.register_keras_serializable(package="vitkit")
class ConvNormAct(VitkitLayer):
    """`zero padding -> convolution -> [norm] -> [activation]` on a feature map, with torch's
    `Conv2d` padding (the same on both sides, so strided convolutions line up with torch's).

    Args:
        filters: output channels of a full convolution; `None` for a depth-wise one.
        kernel_size: int or (height, width).
        strides: int or (height, width).
        padding: int or (height, width): zeros added before and after each side, as torch's.
        depth_multiplier: for a depth-wise convolution (torch's `groups=in_channels`), the
            outputs per input channel; `filters` must then be `None`.
        use_bias: whether the convolution has a bias.
        norm: `None`, `"batch"` (BatchNorm, with torch's epsilon and momentum) or `"layer"`
            (`ChannelLayerNorm`).
        activation: `None` or a Keras activation name (`"relu"`, `"silu"`, `"gelu"`, ...).
        data_format: layout of the feature maps.
        kernel_initializer: name of a Keras initializer for the convolution's kernel
            (`"he_normal"` is torch's `kaiming_normal_`).
    """

    def __init__(
        self,
        filters=None,
        kernel_size=1,
        strides=1,
        padding=0,
        depth_multiplier=None,
        use_bias=True,
        norm=None,
        activation=None,
        data_format="channels_last",
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        if (filters is None) == (depth_multiplier is None):
            raise ValueError(
                f"{owner}: give exactly one of `filters` (a full convolution) and "
                f"`depth_multiplier` (a depth-wise one); got filters={filters!r}, "
                f"depth_multiplier={depth_multiplier!r}."
            )
        self.filters = None if filters is None else check_int("filters", filters, owner=owner)
        self.depth_multiplier = (
            None
            if depth_multiplier is None
            else check_int("depth_multiplier", depth_multiplier, owner=owner)
        )
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.use_bias = use_bias
        self.norm = check_choice("norm", norm, NORMS, owner)
        self.activation = activation
        self.data_format = check_choice("data_format", data_format, DATA_FORMATS, owner)
        self.kernel_initializer = kernel_initializer
        self.kernel_hw = check_pair("kernel_size", kernel_size, owner=owner)
        self.strides_hw = check_pair("strides", strides, owner=owner)
        self.padding_hw = check_pair("padding", padding, minimum=0, owner=owner)

        policy = self.dtype_policy
        (kh, kw), (ph, pw) = self.kernel_hw, self.padding_hw
        same = self.strides_hw == (1, 1) and (2 * ph + 1, 2 * pw + 1) == (kh, kw)
        # Explicit zeros only where "same" would not place them as torch does.
        self.explicit_padding = (ph or pw) and not same
        conv_args = dict(
            kernel_size=self.kernel_hw,
            strides=self.strides_hw,
            padding="same" if same and (ph or pw) else "valid",
            use_bias=use_bias,
            data_format=data_format,
            dtype=policy,
            name="conv",
        )
        if depth_multiplier is None:
            self.conv = Conv2D(filters, kernel_initializer=kernel_initializer, **conv_args)
        else:
            self.conv = DepthwiseConv2D(
                depth_multiplier=depth_multiplier,
                depthwise_initializer=kernel_initializer,
                **conv_args,
            )
        if norm == "batch":
            self.norm_layer = keras.layers.BatchNormalization(
                axis=channel_axis(data_format),
                epsilon=BN_EPSILON,
                momentum=BN_MOMENTUM,
                dtype=policy,
                name="norm",
            )
        elif norm == "layer":
            self.norm_layer = ChannelLayerNorm(data_format, dtype=policy, name="norm")
        else:
            self.norm_layer = None
        self.act = keras.activations.get(activation) if activation else None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The output's (height, width) for an input of (height, width) (< 1: too small)."""
        return tuple(
            conv_output_size(n, k, s, p)
            for n, k, s, p in zip((height, width), self.kernel_hw, self.strides_hw, self.padding_hw)
        )

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        if self.explicit_padding:
            shape = _padded_shape(shape, self.padding_hw, self.data_format)
        return self.conv.compute_output_shape(shape)

    def build(self, input_shape):
        shape = tuple(input_shape)
        if self.explicit_padding:
            shape = _padded_shape(shape, self.padding_hw, self.data_format)
        self.conv.build(shape)
        if self.norm_layer is not None:
            self.norm_layer.build(self.conv.compute_output_shape(shape))

    def call(self, x, training=None):
        if self.explicit_padding:
            x = call_zero_padded_conv(
                self.conv,
                x,
                self.padding_hw,
                lambda x: pad_spatial(x, self.padding_hw, self.data_format),
            )
        else:
            x = call_sublayer(self.conv, x)
        if self.norm_layer is not None:
            x = call_sublayer(self.norm_layer, x, training=training)
        return self.act(x) if self.act is not None else x

    def vit_pytorch_state_map(self, conv="0", norm="1"):
        """vit-pytorch's `nn.Sequential(conv, norm, activation)` names (`conv`, `norm`)."""
        names = {conv: self.conv}
        if self.norm_layer is not None:
            names[norm] = self.norm_layer
        return names


@keras.saving.register_keras_serializable(package="vitkit")
class MaxPool(VitkitLayer):
    """Max pooling with torch's `MaxPool2d` padding (`-inf` on both sides), in `data_format`.

    Args:
        pool_size, strides: int or (height, width).
        padding: int or (height, width), at most half the pool size (torch's rule).
        data_format: layout of the feature maps.
    """

    def __init__(self, pool_size, strides, padding=0, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.pool_size = pool_size
        self.strides = strides
        self.padding = padding
        self.data_format = check_choice("data_format", data_format, DATA_FORMATS, owner)
        self.pool_hw = check_pair("pool_size", pool_size, owner=owner)
        self.strides_hw = check_pair("strides", strides, owner=owner)
        self.padding_hw = check_pair("padding", padding, minimum=0, owner=owner)
        for p, k in zip(self.padding_hw, self.pool_hw):
            if 2 * p > k:
                raise ValueError(
                    f"{owner}: `padding` {padding!r} must be at most half of `pool_size` "
                    f"{pool_size!r}."
                )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return tuple(
            conv_output_size(n, k, s, p)
            for n, k, s, p in zip((height, width), self.pool_hw, self.strides_hw, self.padding_hw)
        )

    def call(self, x):
        if any(self.padding_hw):
            x = pad_spatial(x, self.padding_hw, self.data_format, float("-inf"))
        return ops.max_pool(
            x, self.pool_hw, self.strides_hw, padding="valid", data_format=self.data_format
        )


@keras.saving.register_keras_serializable(package="vitkit")
class ConvStem(VitkitLayer):
    """A stack of `ConvNormAct` blocks, each optionally followed by a `MaxPool`: the
    convolutional tokenizers and stems (CCT's tokenizer, LeViT's embedding, ...).

    Args:
        filters: output channels of each block (a list; its length is the depth).
        kernel_size, strides, padding: int or (height, width), the same for every block.
        use_bias, norm, activation, kernel_initializer: as in `ConvNormAct`, for every block.
        pool: `None`, or `(pool_size, strides, padding)` of a `MaxPool` after every block.
        data_format: layout of the images and feature maps.
    """

    def __init__(
        self,
        filters,
        kernel_size=3,
        strides=1,
        padding=0,
        use_bias=True,
        norm=None,
        activation=None,
        pool=None,
        data_format="channels_last",
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        if not isinstance(filters, (list, tuple)) or not filters:
            raise ValueError(f"{owner}: `filters` must be a non-empty list; got {filters!r}.")
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.use_bias = use_bias
        self.norm = norm
        self.activation = activation
        self.pool = pool
        self.data_format = data_format
        self.kernel_initializer = kernel_initializer
        depth = len(filters)

        policy = self.dtype_policy
        self.blocks = [
            ConvNormAct(
                f,
                kernel_size,
                strides,
                padding,
                use_bias=use_bias,
                norm=norm,
                activation=activation,
                data_format=data_format,
                kernel_initializer=kernel_initializer,
                dtype=policy,
                name=f"conv_{i}",
            )
            for i, f in enumerate(filters)
        ]
        self.pools = [
            MaxPool(*pool, data_format=data_format, dtype=policy, name=f"pool_{i}")
            if pool is not None
            else None
            for i in range(depth)
        ]

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the output for an input of (height, width); a side < 1 means
        the input is too small."""
        for block, pool in zip(self.blocks, self.pools):
            height, width = block.output_size(height, width)
            if pool is not None:
                height, width = pool.output_size(height, width)
            if height < 1 or width < 1:
                return (height, width)
        return (height, width)

    def build(self, input_shape):
        shape = tuple(input_shape)
        for block, pool in zip(self.blocks, self.pools):
            block.build(shape)
            shape = block.compute_output_spec(keras.KerasTensor(shape)).shape
            if pool is not None:
                shape = pool.compute_output_spec(keras.KerasTensor(shape)).shape

    def call(self, x, training=None):
        for block, pool in zip(self.blocks, self.pools):
            x = block(x, training=training)
            if pool is not None:
                x = pool(x)
        return x

    def vit_pytorch_state_map(self, conv="{i}.0", norm="{i}.1"):
        """Names of block i's convolution and norm, as format strings of `i`."""
        names = {}
        for i, block in enumerate(self.blocks):
            names.update(block.vit_pytorch_state_map(conv.format(i=i), norm.format(i=i)))
        return names


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
        self.proj = DepthwiseConv2D(
            kernel_size, padding="same", dtype=self.dtype_policy, name="proj"
        )

    def build(self, input_shape):
        self.proj.build(input_shape)

    def call(self, x):
        return self.proj(x) + x

    def vit_pytorch_state_map(self, proj="proj"):
        """vit-pytorch's PEG: the convolution under `proj` (`"proj.fn"` inside a Residual)."""
        return {proj: self.proj}
