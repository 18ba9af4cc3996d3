"""CrossFormer: "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention"
(Wang et al., ICLR 2022, arXiv:2108.00154)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.convert import as_feature_map
from vitkit.layers import (
    DynamicPositionBias,
    FeedForward,
    VitkitLayer,
    WindowAttention,
)
from vitkit.layers.backend_quirks import stored_gradient
from vitkit.layers.conv import ConvNormAct
from vitkit.layers.utils import (
    check_int,
    check_rate,
    per_stage,
    smallest_side,
    to_channels_last,
)
from vitkit.models.base import VitkitModel
from vitkit.registry import register_model

DIM_HEAD, MLP_MULT = 32, 4  # fixed in vit-pytorch's CrossFormer


@keras.saving.register_keras_serializable(package="vitkit")
class CrossEmbedLayer(VitkitLayer):
    """Cross-scale embedding (sec. 3.1): convolutions of several kernel sizes, one stride,
    concatenated on channels: `(b, h, w, c) -> (b, h / stride, w / stride, dim)`. The smallest
    kernel gets half the channels, the next a quarter, and so on; the largest the rest.

    Args:
        dim: output channels.
        kernel_sizes: the kernel sides, each at least `stride` (padded by
            `(kernel - stride) // 2`, so all give the same map size).
        stride: stride of every convolution.
    """

    def __init__(self, dim, kernel_sizes, stride=2, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.kernel_sizes = kernel_sizes
        self.stride = check_int("stride", stride, owner=owner)
        kernels = sorted(check_int("kernel_sizes", k, owner=owner) for k in kernel_sizes)
        widths = [dim // 2**i for i in range(1, len(kernels))]
        widths.append(dim - sum(widths))
        self.convs = [
            ConvNormAct(
                width,
                kernel,
                strides=stride,
                padding=(kernel - stride) // 2,
                dtype=self.dtype_policy,
                name=f"conv_{i}",
            )
            for i, (kernel, width) in enumerate(zip(kernels, widths))
        ]

    def build(self, input_shape):
        for conv in self.convs:
            conv.build(input_shape)

    def output_sides(self, side: int) -> list[int]:
        """The map side after each convolution, for an input side of `side`."""
        return [c.output_size(side, side)[0] for c in self.convs]

    def call(self, x):
        return ops.concatenate([conv(x) for conv in self.convs], axis=-1)

    def vit_pytorch_state_map(self):
        return {f"convs.{i}": conv.conv for i, conv in enumerate(self.convs)}


@keras.saving.register_keras_serializable(package="vitkit")
class CrossFormerAttention(WindowAttention):
    """Short-distance (`dilated=False`: contiguous `window_size` windows) or long-distance
    (`dilated=True`: windows of pixels spread over the whole map) attention (sec. 3.2), with
    the dynamic position bias (sec. 3.3) of its own; `dim // dim_head` heads, dropout on the
    attention weights only."""

    def __init__(self, dim, window_size, dilated=False, dim_head=DIM_HEAD, dropout=0.0, **kwargs):
        super().__init__(
            dim,
            window_size,
            dilated,
            heads=check_int("dim // dim_head", dim // dim_head, owner=type(self).__name__),
            dim_head=dim_head,
            dropout=dropout,
            output_dropout=0.0,
            **kwargs,
        )
        self.dpb = DynamicPositionBias(dim // 4, dtype=self.dtype_policy, name="dpb")

    def build(self, input_shape):
        super().build(input_shape)
        self.dpb.build()

    def call(self, x, training=None):
        bias = self.dpb.window_bias(self.window_hw[0])  # (n, n), shared by the heads
        return super().call(x, bias=bias, training=training)

    def vit_pytorch_state_map(self, out="to_out"):
        # The block is over feature maps (1x1 convolutions, channel LayerNorm); the bias
        # network is over offsets (Linear, LayerNorm).
        names = as_feature_map(super().vit_pytorch_state_map(out=out))
        names["dpb"] = self.dpb
        return names


@keras.saving.register_keras_serializable(package="vitkit")
class CrossFormerTransformer(VitkitLayer):
    """`depth` CrossFormer blocks on a map `(b, h, w, dim)`: short-distance attention and a
    feed-forward, then long-distance attention and a feed-forward, each residual."""

    def __init__(
        self,
        dim,
        local_window_size,
        global_window_size,
        depth,
        attn_dropout=0.0,
        ff_dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.local_window_size = check_int("local_window_size", local_window_size, owner=owner)
        self.global_window_size = check_int("global_window_size", global_window_size, owner=owner)
        self.depth = check_int("depth", depth, minimum=0, owner=owner)
        self.attn_dropout = check_rate("attn_dropout", attn_dropout, owner=owner)
        self.ff_dropout = check_rate("ff_dropout", ff_dropout, owner=owner)
        policy = self.dtype_policy
        self.blocks = []
        for i in range(depth):
            for kind, window, dilated in (
                ("short", local_window_size, False),
                ("long", global_window_size, True),
            ):
                attention = CrossFormerAttention(
                    dim,
                    window,
                    dilated,
                    dropout=attn_dropout,
                    dtype=policy,
                    name=f"{kind}_attention_{i}",
                )
                # no dropout after the feed-forward's output projection in vit-pytorch
                feed_forward = FeedForward(
                    dim,
                    dim * MLP_MULT,
                    ff_dropout,
                    output_dropout=0.0,
                    dtype=policy,
                    name=f"{kind}_feed_forward_{i}",
                )
                self.blocks.extend([attention, feed_forward])

    def build(self, input_shape):
        for block in self.blocks:
            block.build(input_shape)

    def call(self, x, training=None):
        for block in self.blocks:
            x = stored_gradient(x)  # see backend_quirks.stored_gradient
            x = block(x, training=training) + x
        return x

    def vit_pytorch_state_map(self):
        """vit-pytorch's `layers.i.0` to `layers.i.3`: short attention, feed-forward, long
        attention, feed-forward."""
        names = {}
        for j, block in enumerate(self.blocks):
            if isinstance(block, CrossFormerAttention):
                block_names = block.vit_pytorch_state_map()
            else:  # a bare nn.Sequential: ChanLayerNorm, Conv2d, GELU, Dropout, Conv2d
                block_names = as_feature_map(
                    block.vit_pytorch_state_map(norm="0", hidden="1", out="4")
                )
            names[f"layers.{j // 4}.{j % 4}"] = block_names
        return names


# fmt: off
@register_model(
    # windows of 2 x 2 everywhere at the smallest image (8 x 8), so every attention has
    # several keys to choose from and every weight a gradient
    tiny=dict(
        dim=(32, 40, 64, 48), depth=(1, 0, 1, 0), global_window_size=2, local_window_size=2,
        cross_embed_kernel_sizes=((2, 4), (2,), (1, 3), (1,)), cross_embed_strides=(2, 2, 1, 1),
        num_classes=5,
    ),
    invalid_size=(10, 8),  # 9 rows pool to the same maps as 8, 10 do not fit the windows
    parity=[
        dict(dim=(32, 40, 64, 48), depth=(1, 0, 1, 0), global_window_size=(2, 2, 1, 1),
             local_window_size=(2, 2, 2, 1),
             cross_embed_kernel_sizes=((2, 4), (2,), (2, 4, 6), (2, 4)),
             cross_embed_strides=2, num_classes=5),
        dict(dim=(32, 64, 32, 64), depth=(1, 0, 0, 1), global_window_size=(2, 2, 1, 1),
             local_window_size=(4, 2, 2, 1), num_classes=3, channels=1),
        dict(dim=33, depth=(2, 0, 0, 0), global_window_size=1, local_window_size=3,
             cross_embed_kernel_sizes=((3, 5), (1,), (1, 3), (3,)),
             cross_embed_strides=(1, 1, 1, 1), num_classes=4, channels=2, attn_dropout=0.1,
             ff_dropout=0.2),
    ],
    parity_sizes=[(32, 16), (64, 32), (9, 6)],
    presets={
        # Table 1 of the paper: CrossFormer-T, -S, -B, -L (vit-pytorch fixes heads at dim/32)
        "crossformer_tiny": dict(dim=(64, 128, 256, 512), depth=(1, 1, 8, 6)),
        "crossformer_small": dict(dim=(96, 192, 384, 768), depth=(2, 2, 6, 2)),
        "crossformer_base": dict(dim=(96, 192, 384, 768), depth=(2, 2, 18, 2)),
        "crossformer_large": dict(dim=(128, 256, 512, 1024), depth=(2, 2, 18, 2)),
    },
    invalid=[
        (dict(dim=16), "dim"),
        (dict(dim=(32, 32, 32)), "dim"),
        (dict(depth=(1, 1, -1, 1)), "depth"),
        (dict(global_window_size=0), "global_window_size"),
        (dict(local_window_size=(2, 2, 0, 1)), "local_window_size"),
        (dict(cross_embed_kernel_sizes=((1, 4), (2,), (2,), (2,))), "cross_embed_kernel_sizes"),
        (dict(cross_embed_strides=0), "cross_embed_strides"),
        # strides larger than the tiny config's smallest kernels
        (dict(cross_embed_strides=(1, 1, 2, 2)), "cross_embed_strides"),
        (dict(attn_dropout=1.0), "attn_dropout"),
        (dict(num_classes=0), "num_classes"),
    ],
    digits=dict(
        dim=(32, 64, 96, 128), depth=(1, 1, 0, 0), global_window_size=(2, 1, 1, 1),
        local_window_size=(2, 2, 1, 1), cross_embed_kernel_sizes=((2, 4), (2, 4), (1, 3), (1,)),
        cross_embed_strides=(2, 2, 1, 1), num_classes=10, channels=1,
    ),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class CrossFormer(VitkitModel):
    """CrossFormer: four stages, each a cross-scale embedding (convolutions of several kernel
    sizes concatenated, shrinking the map by its stride) and `depth` blocks that alternate
    short-distance attention (inside contiguous `local_window_size` windows) with
    long-distance attention (inside windows of pixels spread across the map, `global_window_size`
    a side), both with a dynamic position bias. Global average pooling and a linear head close
    it. Heads are `dim // 32` wide-32 heads per stage, as in vit-pytorch.

    Per-stage arguments take one value for all four stages or a tuple of four.

    Args:
        dim: channels per stage, each at least 32.
        depth: blocks per stage.
        global_window_size: side of the long-distance windows; must divide the stage's map.
        local_window_size: side of the short-distance windows; must divide the stage's map.
        cross_embed_kernel_sizes: per stage, the kernel sides of its cross-scale embedding,
            each at least the stage's stride.
        cross_embed_strides: how much each stage shrinks the map.
        num_classes: number of outputs.
        attn_dropout: dropout on the attention weights.
        ff_dropout: dropout inside the feed-forward blocks.
        channels: image channels.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    Example:
        >>> model = CrossFormer(num_classes=1000, dim=(64, 128, 256, 512),
        ...                     depth=(2, 2, 8, 2), global_window_size=(8, 4, 2, 1),
        ...                     local_window_size=7)
        >>> model(np.zeros((1, 224, 224, 3))).shape
        (1, 1000)
    """

    def __init__(
        self,
        *,
        dim=(64, 128, 256, 512),
        depth=(2, 2, 8, 2),
        global_window_size=(8, 4, 2, 1),
        local_window_size=7,
        cross_embed_kernel_sizes=((4, 8, 16, 32), (2, 4), (2, 4), (2, 4)),
        cross_embed_strides=(4, 2, 2, 2),
        num_classes=1000,
        attn_dropout=0.0,
        ff_dropout=0.0,
        channels=3,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        owner = type(self).__name__
        self.dim = dim
        self.depth = depth
        self.global_window_size = global_window_size
        self.local_window_size = local_window_size
        self.cross_embed_kernel_sizes = cross_embed_kernel_sizes
        self.cross_embed_strides = cross_embed_strides
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.attn_dropout = check_rate("attn_dropout", attn_dropout, owner=owner)
        self.ff_dropout = check_rate("ff_dropout", ff_dropout, owner=owner)
        self.channels = check_int("channels", channels, owner=owner)

        stages = {}
        for arg, value in (
            ("dim", dim),
            ("depth", depth),
            ("global_window_size", global_window_size),
            ("local_window_size", local_window_size),
            ("cross_embed_strides", cross_embed_strides),
            ("cross_embed_kernel_sizes", cross_embed_kernel_sizes),
        ):
            values = per_stage(arg, value, 4, owner)
            if arg == "cross_embed_kernel_sizes":  # a stage's kernel sides: a tuple or one int
                values = tuple(tuple(k) if isinstance(k, (tuple, list)) else (k,) for k in values)
            else:
                minimum = {"dim": DIM_HEAD, "depth": 0}.get(arg, 1)
                values = tuple(check_int(arg, v, minimum=minimum, owner=owner) for v in values)
            stages[arg] = values
        per_stage_kernels = zip(stages["cross_embed_kernel_sizes"], stages["cross_embed_strides"])
        for kernels, stride in per_stage_kernels:
            if not kernels or any(
                isinstance(k, bool) or not isinstance(k, int) or k < stride for k in kernels
            ):
                raise ValueError(
                    f"{owner}: `cross_embed_kernel_sizes` must give each stage a tuple of "
                    f"kernel sides no smaller than its stride in `cross_embed_strides` "
                    f"({stride}); got {kernels!r}."
                )
        for width, kernels in zip(stages["dim"], stages["cross_embed_kernel_sizes"]):
            scales = len(kernels)
            if width < 2 ** (scales - 1):
                raise ValueError(
                    f"{owner}: `dim` {width} is too narrow to split among the {scales} "
                    "kernels of its stage's `cross_embed_kernel_sizes`."
                )

        policy = self.dtype_policy
        self.embeddings, self.transformers = [], []
        for i in range(4):
            self.embeddings.append(
                CrossEmbedLayer(
                    stages["dim"][i],
                    stages["cross_embed_kernel_sizes"][i],
                    stages["cross_embed_strides"][i],
                    dtype=policy,
                    name=f"cross_embed_{i}",
                )
            )
            self.transformers.append(
                CrossFormerTransformer(
                    stages["dim"][i],
                    stages["local_window_size"][i],
                    stages["global_window_size"][i],
                    stages["depth"][i],
                    attn_dropout,
                    ff_dropout,
                    dtype=policy,
                    name=f"transformer_{i}",
                )
            )
        self.head = keras.layers.Dense(num_classes, dtype=policy, name="head")
        side = smallest_side(
            self.accepts_side,
            owner,
            "`cross_embed_strides`, `local_window_size` and `global_window_size`",
        )
        self.image_hw = (side, side)  # the smallest image it takes

    size_rule = (
        "height and width whose maps every stage's local and global windows divide"
    )

    def accepts_side(self, side: int) -> bool:
        """Whether an image side of `side` pixels suits every stage (vit-pytorch's rules:
        the scales of an embedding agree, both windows divide the map)."""
        for embedding, transformer in zip(self.embeddings, self.transformers):
            sides = set(embedding.output_sides(side))
            if len(sides) != 1:
                return False
            side = sides.pop()
            if side < 1 or side % transformer.local_window_size:
                return False
            if side % transformer.global_window_size:
                return False
        return True


    def call(self, images, training=None):
        x = to_channels_last(self.check_images(images), self.data_format)
        for embedding, transformer in zip(self.embeddings, self.transformers):
            x = transformer(embedding(x), training=training)
        return self.head(ops.mean(x, axis=(1, 2)))

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.crossformer.CrossFormer`'s state dict."""
        names = {}
        for i, (embedding, transformer) in enumerate(zip(self.embeddings, self.transformers)):
            names[f"layers.{i}.0"] = embedding
            names[f"layers.{i}.1"] = transformer
        names["to_logits.1"] = self.head
        return names
