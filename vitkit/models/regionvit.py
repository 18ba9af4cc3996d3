"""RegionViT: "RegionViT: Regional-to-Local Attention for Vision Transformers" (Chen, Panda,
Fan, ICLR 2022, arXiv:2106.02689)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.convert import Pointwise, channel_norm
from vitkit.layers import (
    PEG,
    Attention,
    FeedForward,
    RelativePositionBias,
    VitkitLayer,
    window_merge,
    window_partition,
)
from vitkit.layers.attention import LN_EPSILON
from vitkit.layers.backend_quirks import GELU, stored_gradient
from vitkit.layers.conv import ConvNormAct, conv_output_size
from vitkit.layers.utils import (
    check_int,
    check_rate,
    patches_to_channels,
    per_stage,
    smallest_side,
    to_channels_last,
    zero_pad,
)
from vitkit.models.base import VitkitModel
from vitkit.registry import register_model

HEADS, DIM_HEAD, MLP_MULT = 4, 32, 4  # fixed in vit-pytorch's RegionViT


@keras.saving.register_keras_serializable(package="vitkit")
class R2LTransformer(VitkitLayer):
    """Regional-to-local attention (sec. 3.2), `depth` times: the regional tokens attend to
    each other; then each regional token and the local tokens of its window attend together,
    with a learned relative position bias among the local tokens (none to or from the
    regional token); then a feed-forward. One attention serves both steps.

    `call(local, region)` takes and returns the local map `(b, lh, lw, dim)` and the regional
    map `(b, rh, rw, dim)`; each regional token owns a `(lh / rh) x (lw / rw)` window.
    """

    def __init__(self, dim, window_size, depth, attn_dropout=0.0, ff_dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.window_size = check_int("window_size", window_size, owner=owner)
        self.depth = check_int("depth", depth, minimum=0, owner=owner)
        self.attn_dropout = check_rate("attn_dropout", attn_dropout, owner=owner)
        self.ff_dropout = check_rate("ff_dropout", ff_dropout, owner=owner)
        policy = self.dtype_policy
        self.local_rel_pos_bias = RelativePositionBias(
            window_size, HEADS, dy_major=False, dtype=policy, name="local_rel_pos_bias"
        )
        self.attentions = [
            Attention(
                dim,
                heads=HEADS,
                dim_head=DIM_HEAD,
                dropout=attn_dropout,
                project_out=True,
                dtype=policy,
                name=f"attention_{i}",
            )
            for i in range(depth)
        ]
        # no dropout after the feed-forward's output projection in vit-pytorch
        self.feed_forwards = [
            FeedForward(
                dim,
                dim * MLP_MULT,
                ff_dropout,
                output_dropout=0.0,
                dtype=policy,
                name=f"feed_forward_{i}",
            )
            for i in range(depth)
        ]

    def build(self, local_shape, region_shape):
        self.local_rel_pos_bias.build()
        for attention, feed_forward in zip(self.attentions, self.feed_forwards):
            attention.build((None, None, self.dim))
            feed_forward.build((None, None, self.dim))

    def call(self, local, region, training=None):
        _, lh, lw, dim = ops.shape(local)
        _, rh, rw, _ = ops.shape(region)
        window = (lh // rh, lw // rw)
        bias = self.local_rel_pos_bias.window_bias(window)  # (heads, n, n)
        bias = zero_pad(zero_pad(bias, 1, before=1), 2, before=1)  # the regional token: none
        region = ops.reshape(region, (-1, rh * rw, dim))
        for attention, feed_forward in zip(self.attentions, self.feed_forwards):
            # each block's input gradients computed once (see `stored_gradient`)
            local, region = stored_gradient(local), stored_gradient(region)
            region = attention(region, training=training) + region
            # each window's regional token first, then its local tokens
            tokens = ops.concatenate(
                [ops.reshape(region, (-1, 1, dim)), window_partition(local, window)], axis=1
            )
            tokens = attention(tokens, bias=bias, training=training) + tokens
            tokens = feed_forward(tokens, training=training) + tokens
            region = ops.reshape(tokens[:, 0], (-1, rh * rw, dim))
            local = window_merge(tokens[:, 1:], (lh, lw), window)
        return local, ops.reshape(region, (-1, rh, rw, dim))

    def vit_pytorch_state_map(self):
        names = {"local_rel_pos_bias.weight": self.local_rel_pos_bias.table}
        for i, (attention, feed_forward) in enumerate(zip(self.attentions, self.feed_forwards)):
            names[f"layers.{i}.0"] = attention.vit_pytorch_state_map()
            names[f"layers.{i}.1"] = feed_forward.vit_pytorch_state_map(
                norm="0", hidden="1", out="4"
            )
        return names


@keras.saving.register_keras_serializable(package="vitkit")
class LocalTokenizer(VitkitLayer):
    """Local tokens, a quarter of the image's side: one 8x8 convolution of stride 4, or
    (`three_conv=True`, the paper's choice for its smaller models) three 3x3 convolutions of
    strides 2, 2, 1 with channel LayerNorm and GELU between them."""

    def __init__(self, dim, three_conv=False, **kwargs):
        super().__init__(**kwargs)
        self.dim = check_int("dim", dim, owner=type(self).__name__)
        self.three_conv = three_conv
        policy = self.dtype_policy
        if three_conv:
            self.convs = [
                ConvNormAct(dim, 3, stride, 1, dtype=policy, name=f"conv_{i}")
                for i, stride in enumerate((2, 2, 1))
            ]
            self.norms = [
                keras.layers.LayerNormalization(epsilon=LN_EPSILON, dtype=policy, name=f"norm_{i}")
                for i in range(2)
            ]
        else:
            self.convs = [ConvNormAct(dim, 8, 4, 3, dtype=policy, name="conv")]
            self.norms = []

    def output_side(self, side: int) -> int:
        for conv in self.convs:
            side = conv.output_size(side, side)[0]
        return side

    def build(self, input_shape):
        shape = input_shape
        for i, conv in enumerate(self.convs):
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            if i < len(self.norms):
                self.norms[i].build(shape)

    def call(self, images):
        x = images
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.norms):
                x = GELU(self.norms[i](x))
        return x

    def vit_pytorch_state_map(self):
        if not self.three_conv:  # a bare Conv2d
            return self.convs[0].conv
        return {
            "0": self.convs[0].conv,
            "1": channel_norm(self.norms[0]),
            "3": self.convs[1].conv,
            "4": channel_norm(self.norms[1]),
            "6": self.convs[2].conv,
        }


# fmt: off
@register_model(
    # Every stage has a block (its position bias table exists either way), the last two: the
    # bias acts on local tokens only, which reach the logits through a later block alone.
    tiny=dict(
        dim=(8, 12, 16, 10), depth=(1, 1, 1, 2), window_size=2, num_classes=5,
        tokenize_local_3_conv=True, use_peg=True,
    ),
    parity=[
        dict(dim=(8, 12, 16, 10), depth=(1, 0, 0, 1), window_size=2, num_classes=5,
             tokenize_local_3_conv=True, use_peg=True),
        dict(dim=(16, 24, 32, 40), depth=(1, 0, 2, 0), window_size=7, num_classes=3),
        dict(dim=12, depth=1, window_size=3, num_classes=4, use_peg=True, attn_dropout=0.1,
             ff_dropout=0.2),
    ],
    parity_sizes=[(16, 32), (56, 28), (12, 24)],
    presets={
        # Table 1 of the paper: RegionViT-Ti, -S, -M, -B (heads fixed at 4 x 32 in vit-pytorch)
        "regionvit_tiny": dict(dim=(64, 128, 256, 512), depth=(2, 2, 8, 2),
                               tokenize_local_3_conv=True),
        "regionvit_small": dict(dim=(96, 192, 384, 768), depth=(2, 2, 8, 2),
                                tokenize_local_3_conv=True),
        "regionvit_medium": dict(dim=(96, 192, 384, 768), depth=(2, 2, 14, 2)),
        "regionvit_base": dict(dim=(128, 256, 512, 1024), depth=(2, 2, 14, 2)),
    },
    invalid=[
        (dict(dim=(8, 12, 16)), "dim"),
        (dict(dim=0), "dim"),
        (dict(depth=(1, -1, 1, 1)), "depth"),
        (dict(window_size=0), "window_size"),
        (dict(local_patch_size=0), "local_patch_size"),
        (dict(ff_dropout=1.0), "ff_dropout"),
        (dict(num_classes=0), "num_classes"),
    ],
    digits=dict(
        dim=(32, 64, 96, 128), depth=(1, 1, 0, 0), window_size=2, num_classes=10,
        tokenize_local_3_conv=True, channels=1,
    ),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class RegionViT(VitkitModel):
    """RegionViT: the image gives two token maps: local tokens (a quarter of the image's
    side, from convolutions) and regional tokens (one per `local_patch_size * window_size`
    square patch). Four stages follow; from the second on, one strided convolution halves both
    maps (and an optional position encoding generator acts on the local map), then
    regional-to-local attention blocks run. The mean of the regional tokens, a LayerNorm and
    a linear head give the logits. Heads are 4 x 32 wide, as in vit-pytorch.

    Per-stage arguments take one value for all four stages or a tuple of four.

    Args:
        dim: channels per stage.
        depth: regional-to-local blocks per stage.
        window_size: local tokens per region side at the first stage (7 or 14 in the paper);
            the relative position bias covers windows up to this side.
        num_classes: number of outputs.
        tokenize_local_3_conv: three 3x3 convolutions for the local tokens instead of one 8x8.
        local_patch_size: pixels per local token side in the regional patch size
            `local_patch_size * window_size`; the local tokenizer itself always strides by 4,
            so windows fit when it is 4.
        use_peg: a position encoding generator on the local tokens of stages 2 to 4.
        attn_dropout: dropout on the attention weights and output.
        ff_dropout: dropout inside the feed-forward blocks.
        channels: image channels (vit-pytorch's local tokenizer takes 3 whatever this says;
            here it takes `channels`).
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    Example:
        >>> model = RegionViT(dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), window_size=7,
        ...                   num_classes=1000, tokenize_local_3_conv=False, use_peg=False)
        >>> model(np.zeros((1, 224, 224, 3))).shape
        (1, 1000)
    """

    def __init__(
        self,
        *,
        dim=(64, 128, 256, 512),
        depth=(2, 2, 8, 2),
        window_size=7,
        num_classes=1000,
        tokenize_local_3_conv=False,
        local_patch_size=4,
        use_peg=False,
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
        self.window_size = check_int("window_size", window_size, owner=owner)
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.tokenize_local_3_conv = tokenize_local_3_conv
        self.local_patch_size = check_int("local_patch_size", local_patch_size, owner=owner)
        self.use_peg = use_peg
        self.attn_dropout = check_rate("attn_dropout", attn_dropout, owner=owner)
        self.ff_dropout = check_rate("ff_dropout", ff_dropout, owner=owner)
        self.channels = check_int("channels", channels, owner=owner)
        dims, depths = per_stage("dim", dim, 4, owner), per_stage("depth", depth, 4, owner)
        for value in dims:
            check_int("dim", value, owner=owner)
        for value in depths:
            check_int("depth", value, minimum=0, owner=owner)
        self.region_patch_size = local_patch_size * window_size

        policy = self.dtype_policy
        self.local_encoder = LocalTokenizer(
            dims[0], tokenize_local_3_conv, dtype=policy, name="local_encoder"
        )
        self.region_encoder = keras.layers.Dense(dims[0], dtype=policy, name="region_encoder")
        self.downsamples, self.pegs, self.transformers = [], [], []
        for i, (width, blocks) in enumerate(zip(dims, depths)):
            self.downsamples.append(
                ConvNormAct(width, 3, 2, 1, dtype=policy, name=f"downsample_{i}")
                if i
                else None
            )
            self.pegs.append(PEG(dtype=policy, name=f"peg_{i}") if i and use_peg else None)
            self.transformers.append(
                R2LTransformer(
                    width, window_size, blocks, attn_dropout, ff_dropout, dtype=policy,
                    name=f"transformer_{i}",
                )
            )
        self.head_norm = keras.layers.LayerNormalization(
            epsilon=LN_EPSILON, dtype=policy, name="head_norm"
        )
        self.head = keras.layers.Dense(num_classes, dtype=policy, name="head")
        # the local tokens of each region must form a window of at most `window_size` a side
        side = smallest_side(self.accepts_side, owner, "`window_size` and `local_patch_size`")
        self.image_hw = (side, side)  # the smallest image it takes

    @property
    def size_rule(self):
        return (
            f"height and width divisible by the regional patch size {self.region_patch_size} "
            "whose local tokens fit the regions' windows"
        )

    def accepts_side(self, side: int) -> bool:
        """Whether an image side suits the model (vit-pytorch's rules): divisible by the
        regional and local patch sizes, and at every stage the local tokens split evenly
        among the regional ones, at most `window_size` per region."""
        if side % self.region_patch_size or side % self.local_patch_size:
            return False
        local, region = self.local_encoder.output_side(side), side // self.region_patch_size
        for stage in range(4):
            if stage:
                local, region = (conv_output_size(n, 3, 2, 1) for n in (local, region))
            if local % region or local // region > self.window_size:
                return False
        return True


    def call(self, images, training=None):
        images = to_channels_last(self.check_images(images), self.data_format)
        local = self.local_encoder(images)  # (b, h / 4, w / 4, dim_1)
        p = self.region_patch_size
        region = self.region_encoder(patches_to_channels(images, (p, p)))  # (b, h/p, w/p, dim_1)
        for down, peg, transformer in zip(self.downsamples, self.pegs, self.transformers):
            if down is not None:  # one convolution shrinks both maps
                local, region = down(local), down(region)
            if peg is not None:
                local = peg(local)
            local, region = transformer(local, region, training=training)
        return self.head(self.head_norm(ops.mean(region, axis=(1, 2))))

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.regionvit.RegionViT`'s state dict."""
        names = {
            "local_encoder": self.local_encoder,
            "region_encoder.1": Pointwise(self.region_encoder),
            "to_logits.1": self.head_norm,
            "to_logits.2": self.head,
        }
        for i, (down, peg, transformer) in enumerate(
            zip(self.downsamples, self.pegs, self.transformers)
        ):
            if down is not None:
                names[f"layers.{i}.0.conv"] = down.conv
            if peg is not None:
                names[f"layers.{i}.1"] = peg
            names[f"layers.{i}.2"] = transformer
        return names
