"""MobileViT: "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision
Transformer" (Mehta and Rastegari, 2021, arXiv:2110.02178)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.layers import ConvNormAct, Transformer
from vitkit.layers.base import VitkitLayer
from vitkit.layers.conv import channel_axis, conv_output_size, spatial_size
from vitkit.layers.utils import (
    DATA_FORMATS,
    check_choice,
    check_int,
    check_int_tuple,
    check_pair,
    check_positive,
)
from vitkit.models.base import VitkitModel
from vitkit.registry import register_model

HEADS, DIM_HEAD = 4, 8  # vit-pytorch's MobileViT blocks: 4 heads of width 8


def unfold(x, patch, data_format="channels_last"):
    """Feature map `(b, h * ph, w * pw, d)` (or channels-first) -> `(b * ph * pw, h * w, d)`:
    one sequence per pixel position inside the `(ph, pw)` patches, over all patches."""
    (ph, pw), (hh, ww) = patch, spatial_size(x, data_format)
    if data_format == "channels_last":
        d = x.shape[3]
        x = ops.reshape(x, (-1, hh // ph, ph, ww // pw, pw, d))
        x = ops.transpose(x, (0, 2, 4, 1, 3, 5))  # b, ph, pw, h, w, d
    else:
        d = x.shape[1]
        x = ops.reshape(x, (-1, d, hh // ph, ph, ww // pw, pw))
        x = ops.transpose(x, (0, 3, 5, 2, 4, 1))  # b, ph, pw, h, w, d
    return ops.reshape(x, (-1, (hh // ph) * (ww // pw), d))


def fold(x, size, patch, data_format="channels_last"):
    """The inverse of `unfold`, back to a feature map of `size = (h * ph, w * pw)`."""
    (ph, pw), (hh, ww), d = patch, size, x.shape[-1]
    x = ops.reshape(x, (-1, ph, pw, hh // ph, ww // pw, d))
    if data_format == "channels_last":
        x = ops.transpose(x, (0, 3, 1, 4, 2, 5))  # b, h, ph, w, pw, d
        return ops.reshape(x, (-1, hh, ww, d))
    x = ops.transpose(x, (0, 5, 3, 1, 4, 2))  # b, d, h, ph, w, pw
    return ops.reshape(x, (-1, d, hh, ww))


def _conv_bn(filters=None, kernel_size=1, strides=1, activation="silu", **kwargs):
    """vit-pytorch's `conv_nxn_bn` / `conv_1x1_bn`: convolution (no bias), BatchNorm, SiLU."""
    return ConvNormAct(
        filters,
        kernel_size,
        strides,
        kernel_size // 2,
        use_bias=False,
        norm="batch",
        activation=activation,
        **kwargs,
    )


@keras.saving.register_keras_serializable(package="vitkit")
class MV2Block(VitkitLayer):
    """MobileNetV2's inverted residual block (Sandler et al. 2018, arXiv:1801.04381):
    point-wise expansion, 3x3 depth-wise convolution (of stride `stride`), point-wise
    projection, each with BatchNorm (SiLU after the first two); a residual when the shape is
    kept. With `expansion == 1` the expansion is left out.

    Args:
        inp, oup: channels in and out.
        stride: 1 or 2.
        expansion: hidden channels over `inp`.
        data_format: layout of the feature maps.
    """

    def __init__(self, inp, oup, stride=1, expansion=4, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.inp = check_int("inp", inp, owner=owner)
        self.oup = check_int("oup", oup, owner=owner)
        self.stride = check_choice("stride", stride, (1, 2), owner)
        self.expansion = check_positive("expansion", expansion, owner)
        self.data_format = check_choice("data_format", data_format, DATA_FORMATS, owner)
        self.residual = stride == 1 and inp == oup
        hidden = int(inp * expansion)
        conv = dict(data_format=data_format, dtype=self.dtype_policy)
        self.convs = [] if expansion == 1 else [_conv_bn(hidden, name="expand", **conv)]
        self.convs += [
            _conv_bn(None, 3, stride, depth_multiplier=1, name="depthwise", **conv),
            _conv_bn(oup, activation=None, name="project", **conv),
        ]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for conv in self.convs:
            conv.build(shape)
            shape = conv.compute_output_spec(keras.KerasTensor(shape)).shape

    def call(self, x, training=None):
        out = x
        for conv in self.convs:
            out = conv(out, training=training)
        return out + x if self.residual else out

    def vit_pytorch_state_map(self):
        """`conv` is an `nn.Sequential` of (conv, BatchNorm, SiLU) triples (the last without
        SiLU)."""
        names = {}
        for i, conv in enumerate(self.convs):
            names.update(conv.vit_pytorch_state_map(f"conv.{3 * i}", f"conv.{3 * i + 1}"))
        return names


@keras.saving.register_keras_serializable(package="vitkit")
class MobileViTTransformer(Transformer):
    """The transformer inside a MobileViT block: pre-norm blocks with SiLU feed-forwards and
    no closing norm."""

    def __init__(self, dim, depth, heads, dim_head, mlp_dim, dropout=0.0, **kwargs):
        super().__init__(
            dim,
            depth,
            heads,
            dim_head,
            mlp_dim,
            dropout,
            project_out=True,
            final_norm=False,
            **kwargs,
        )

    def make_feed_forward(self, index):
        return super().make_feed_forward(index, activation="silu")


@keras.saving.register_keras_serializable(package="vitkit")
class MobileViTBlock(VitkitLayer):
    """The MobileViT block (Sec. 3.1): local features from an n x n and a point-wise
    convolution, global ones from a transformer across the patches (each pixel position of a
    patch attends to the same position in every other patch), a point-wise convolution back to
    `channel`, and an n x n convolution fusing them with the input.

    Args:
        dim: the transformer's width.
        depth: its blocks.
        channel: channels in and out.
        kernel_size: the n x n kernel (odd; padded to keep the size).
        patch_size: (height, width) of the patches; must divide the feature map.
        mlp_dim: the transformer's feed-forward width.
        dropout: dropout in the transformer.
        data_format: layout of the feature maps.
    """

    def __init__(
        self,
        dim,
        depth,
        channel,
        kernel_size,
        patch_size,
        mlp_dim,
        dropout=0.0,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.depth = check_int("depth", depth, owner=owner)
        self.channel = check_int("channel", channel, owner=owner)
        self.kernel_size = check_int("kernel_size", kernel_size, owner=owner)
        self.patch_size = patch_size
        self.mlp_dim = check_int("mlp_dim", mlp_dim, owner=owner)
        self.dropout = dropout
        self.data_format = check_choice("data_format", data_format, DATA_FORMATS, owner)
        self.patch_hw = check_pair("patch_size", patch_size, owner=owner)
        conv = dict(data_format=data_format, dtype=self.dtype_policy)
        self.conv1 = _conv_bn(channel, kernel_size, name="conv1", **conv)
        self.conv2 = _conv_bn(dim, name="conv2", **conv)
        self.transformer = MobileViTTransformer(
            dim,
            depth,
            HEADS,
            DIM_HEAD,
            mlp_dim,
            dropout,
            dtype=self.dtype_policy,
            name="transformer",
        )
        self.conv3 = _conv_bn(channel, name="conv3", **conv)
        self.conv4 = _conv_bn(channel, kernel_size, name="conv4", **conv)

    def build(self, input_shape):
        def with_channels(c):
            shape = list(input_shape)
            shape[channel_axis(self.data_format)] = c
            return tuple(shape)

        self.conv1.build(tuple(input_shape))
        self.conv2.build(with_channels(self.channel))
        self.transformer.build((None, None, self.dim))
        self.conv3.build(with_channels(self.dim))
        self.conv4.build(with_channels(2 * self.channel))

    def call(self, x, training=None):
        y = x
        x = self.conv2(self.conv1(x, training=training), training=training)  # local
        size = spatial_size(x, self.data_format)
        x = unfold(x, self.patch_hw, self.data_format)  # (b * ph * pw, h * w, dim)
        x = self.transformer(x, training=training)  # global
        x = fold(x, size, self.patch_hw, self.data_format)
        x = self.conv3(x, training=training)
        x = ops.concatenate([x, y], axis=channel_axis(self.data_format))  # fusion
        return self.conv4(x, training=training)

    def vit_pytorch_state_map(self):
        names = {"transformer": self.transformer}
        for name in ("conv1", "conv2", "conv3", "conv4"):
            names.update(getattr(self, name).vit_pytorch_state_map(f"{name}.0", f"{name}.1"))
        return names


MOBILEVIT_SIZES = {  # Table 4 of the paper, as in vit-pytorch's source (chinhsuanwu's port)
    "xxs": dict(
        dims=(64, 80, 96), channels=(16, 16, 24, 24, 48, 48, 64, 64, 80, 80, 320), expansion=2
    ),
    "xs": dict(dims=(96, 120, 144), channels=(16, 32, 48, 48, 64, 64, 80, 80, 96, 96, 384)),
    "s": dict(dims=(144, 192, 240), channels=(16, 32, 64, 64, 96, 96, 128, 128, 160, 160, 640)),
}


# fmt: off
@register_model(
    tiny=dict(
        image_size=(64, 32), dims=(8, 12, 16), channels=(4, 6, 8, 8, 10, 10, 12, 12, 14, 14, 20),
        num_classes=7, expansion=1, patch_size=(2, 1), depths=(1, 1, 1),
    ),
    parity=[
        dict(image_size=(64, 32), dims=(8, 12, 16),
             channels=(4, 6, 8, 8, 10, 10, 12, 12, 14, 14, 20), num_classes=7, expansion=1,
             patch_size=(2, 1), depths=(1, 1, 1)),
        dict(image_size=(96, 64), dims=(6, 10, 12),
             channels=(3, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15), num_classes=5,
             patch_size=(1, 2), depths=(2, 1, 1)),
        dict(image_size=(32, 64), dims=(5, 7, 9), channels=(4, 4, 6, 6, 8, 8, 8, 8, 10, 10, 6),
             num_classes=3, expansion=2, patch_size=(1, 1), depths=(1, 1, 2)),
    ],
    presets={
        f"mobilevit_{size}": dict(image_size=(256, 256), num_classes=1000, **sizes)
        for size, sizes in MOBILEVIT_SIZES.items()
    },
    invalid=[
        (dict(channels=(4, 6, 8, 9, 10, 10, 12, 12, 14, 14, 20)), "channels"),
        (dict(channels=(4, 6, 8, 8)), "channels"),
        (dict(dims=(8, 12)), "dims"),
        (dict(image_size=(66, 32)), "image_size"),
        (dict(kernel_size=4), "kernel_size"),
        (dict(expansion=0), "expansion"),
        (dict(depths=(1, 0, 1)), "depths"),
    ],
    digits=dict(image_size=(32, 32), dims=(32, 48, 64),
                channels=(8, 16, 24, 24, 32, 32, 48, 48, 64, 64, 128), num_classes=10,
                expansion=2, patch_size=(1, 1), depths=(1, 1, 1)),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class MobileViT(VitkitModel):
    """MobileViT: a MobileNetV2 network (a strided 3x3 stem and inverted residual blocks)
    whose last three stages each end with a MobileViT block, where a transformer mixes
    information across patches; a point-wise convolution, global average pooling and a linear
    head (no bias).

    Args:
        image_size: (height, width) (an int for a square). No position embedding: other sizes
            work too, as long as the patches tile the feature maps at the three MobileViT
            blocks (strides 8, 16 and 32).
        dims: the three MobileViT blocks' transformer widths.
        channels: the 11 channel counts of the network, in order: the stem, the four
            inverted residual blocks, then (inverted residual, MobileViT block) for each of
            the three stages, then the last point-wise convolution. Where vit-pytorch chains a
            block's output into the next one, the counts must agree:
            `channels[2] == channels[3]`, `channels[4] == channels[5]`,
            `channels[6] == channels[7]`, `channels[8] == channels[9]`.
        num_classes: outputs.
        expansion: hidden channels over input channels in the inverted residual blocks.
        kernel_size: the MobileViT blocks' n x n kernel (odd; vit-pytorch takes only 3).
        patch_size: (height, width) of the MobileViT blocks' patches.
        depths: transformer blocks in each of the three MobileViT blocks.
        data_format: `"channels_last"` (b, h, w, 3) or `"channels_first"` (b, 3, h, w).

    Images have 3 channels (vit-pytorch's stem takes 3). The transformers have 4 heads of
    width 8 and feed-forward widths 2, 4 and 4 times `dims`, as in vit-pytorch.

    Example:
        >>> model = MobileViT(image_size=(256, 256), dims=(96, 120, 144),
        ...                   channels=(16, 32, 48, 48, 64, 64, 80, 80, 96, 96, 384),
        ...                   num_classes=1000)
        >>> model(np.zeros((1, 256, 256, 3))).shape
        (1, 1000)
    """

    input_channels = 3

    def __init__(
        self,
        *,
        image_size,
        dims,
        channels,
        num_classes,
        expansion=4,
        kernel_size=3,
        patch_size=(2, 2),
        depths=(2, 4, 3),
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        owner = type(self).__name__
        self.image_size = image_size
        self.dims = check_int_tuple("dims", dims, owner=owner, length=3)
        self.channels = check_int_tuple("channels", channels, owner=owner, length=11)
        for a in (2, 4, 6, 8):
            if self.channels[a] != self.channels[a + 1]:
                raise ValueError(
                    f"{owner}: `channels` items {a} and {a + 1} must be equal (vit-pytorch "
                    f"feeds one block's output to the next); got {self.channels}."
                )
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.expansion = check_positive("expansion", expansion, owner)
        if int(min(self.channels) * expansion) < 1:
            raise ValueError(f"{owner}: `expansion` {expansion} leaves a block without "
                             "hidden channels.")
        self.kernel_size = check_int("kernel_size", kernel_size, owner=owner)
        if kernel_size % 2 == 0:
            raise ValueError(f"{owner}: `kernel_size` must be odd (the blocks keep the map's "
                             f"size); got {kernel_size}.")
        self.patch_size = patch_size
        self.depths = check_int_tuple("depths", depths, owner=owner, length=3)
        self.image_hw = check_pair("image_size", image_size, owner=owner)
        self.patch_hw = check_pair("patch_size", patch_size, owner=owner)
        if not self.fits(*self.image_hw):
            raise ValueError(
                f"{owner}: `image_size` {self.image_hw} must give feature maps that "
                f"`patch_size` {self.patch_hw} tiles at the MobileViT blocks "
                f"(it gives {self.block_sizes(*self.image_hw)})."
            )

        c, policy = self.channels, self.dtype_policy
        conv = dict(data_format=data_format, dtype=policy)
        self.stem_conv = _conv_bn(c[0], 3, 2, name="conv1", **conv)
        self.stem = [
            MV2Block(c[0], c[1], 1, expansion, name="mv2_0", **conv),
            MV2Block(c[1], c[2], 2, expansion, name="mv2_1", **conv),
            MV2Block(c[2], c[3], 1, expansion, name="mv2_2", **conv),
            MV2Block(c[2], c[3], 1, expansion, name="mv2_3", **conv),
        ]
        self.trunk_convs, self.trunk_blocks = [], []
        for i, (dim, depth, mult) in enumerate(zip(self.dims, self.depths, (2, 4, 4))):
            self.trunk_convs.append(
                MV2Block(c[3 + 2 * i], c[4 + 2 * i], 2, expansion, name=f"mv2_{4 + i}", **conv)
            )
            self.trunk_blocks.append(
                MobileViTBlock(dim, depth, c[5 + 2 * i], kernel_size, self.patch_hw, dim * mult,
                               name=f"mobilevit_{i}", **conv)
            )
        self.head_conv = _conv_bn(c[10], name="head_conv", **conv)
        self.pooling = keras.layers.GlobalAveragePooling2D(data_format=data_format, dtype=policy)
        self.head = keras.layers.Dense(num_classes, use_bias=False, dtype=policy, name="head")

    @staticmethod
    def _halve(n: int) -> int:  # a 3x3 convolution of stride 2, padded by 1
        return conv_output_size(n, 3, 2, 1)

    def block_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The feature map sizes at the three MobileViT blocks (strides 8, 16, 32)."""
        sizes = []
        for i in range(5):
            height, width = self._halve(height), self._halve(width)
            if i >= 2:
                sizes.append((height, width))
        return sizes

    def fits(self, height: int, width: int) -> bool:
        ph, pw = self.patch_hw
        return all(h % ph == 0 and w % pw == 0 for h, w in self.block_sizes(height, width))

    def check_spatial(self, height, width):
        if not self.fits(height, width):
            self.bad_input(
                f"feature maps that `patch_size` {self.patch_hw} tiles at the MobileViT blocks",
                f"{height}x{width} images (maps {self.block_sizes(height, width)})",
            )

    def call(self, images, training=None):
        x = self.stem_conv(self.check_images(images), training=training)
        for block in self.stem:
            x = block(x, training=training)
        for conv, mobilevit in zip(self.trunk_convs, self.trunk_blocks):
            x = mobilevit(conv(x, training=training), training=training)
        x = self.pooling(self.head_conv(x, training=training))
        return self.head(x)

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.mobile_vit.MobileViT`'s state dict."""
        names = {
            **self.stem_conv.vit_pytorch_state_map("conv1.0", "conv1.1"),
            **self.head_conv.vit_pytorch_state_map("to_logits.0.0", "to_logits.0.1"),
            "to_logits.2": self.head,
        }
        for i, block in enumerate(self.stem):
            names[f"stem.{i}"] = block
        for i, (conv, mobilevit) in enumerate(zip(self.trunk_convs, self.trunk_blocks)):
            names[f"trunk.{i}.0"] = conv
            names[f"trunk.{i}.1"] = mobilevit
        return names
