"""NesT: "Nested Hierarchical Transformer: Towards Accurate, Data-Efficient and Interpretable
Visual Understanding" (Zhang et al., 2021, arXiv:2105.12723)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.convert.mapping import as_feature_map, channel_norm
from vitkit.layers import (
    ConvNormAct,
    MaxPool,
    PatchEmbedding,
    Transformer,
    map_to_tokens,
    tokens_to_map,
)
from vitkit.layers.attention import LN_EPSILON
from vitkit.layers.base import VitkitLayer
from vitkit.layers.utils import (
    DATA_FORMATS,
    check_choice,
    check_divisible,
    check_int,
    check_int_tuple,
    check_pair,
    check_rate,
)
from vitkit.models.base import VitkitModel
from vitkit.registry import register_model


def to_blocks(x, grid, blocks: int):
    """Tokens of a `grid = (h, w)` map `(b, h * w, c)` -> the tokens of each of its
    `blocks x blocks` local blocks, `(b * blocks**2, (h / blocks) * (w / blocks), c)`."""
    (h, w), c = grid, x.shape[-1]
    x = ops.reshape(x, (-1, blocks, h // blocks, blocks, w // blocks, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # b, b1, b2, h', w', c
    return ops.reshape(x, (-1, (h // blocks) * (w // blocks), c))


def from_blocks(x, grid, blocks: int):
    """The inverse of `to_blocks`."""
    (h, w), c = grid, x.shape[-1]
    x = ops.reshape(x, (-1, blocks, blocks, h // blocks, w // blocks, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # b, b1, h', b2, w', c
    return ops.reshape(x, (-1, h * w, c))


@keras.saving.register_keras_serializable(package="vitkit")
class NesTTransformer(Transformer):
    """The blocks of one hierarchy level, applied to every local block on its own: a learned
    scalar per position (shared by the channels) is added, then `depth` pre-norm blocks whose
    heads are `dim // heads` wide (no closing norm).

    Args:
        dim, depth, heads, dropout: as in `Transformer`.
        seq_len: positions in a local block.
        mlp_mult: feed-forward width over `dim`.
    """

    def __init__(self, dim, seq_len, depth, heads, mlp_mult=4, dropout=0.0, **kwargs):
        owner = type(self).__name__
        self.seq_len = check_int("seq_len", seq_len, owner=owner)
        self.mlp_mult = check_int("mlp_mult", mlp_mult, owner=owner)
        super().__init__(
            dim,
            depth,
            heads,
            dim // heads,
            dim * mlp_mult,
            dropout,
            project_out=True,
            final_norm=False,
            **kwargs,
        )

    def build(self, input_shape):
        self.pos_emb = self.add_weight(
            shape=(self.seq_len,),
            initializer=keras.initializers.RandomNormal(stddev=1.0),
            name="pos_emb",
        )
        super().build(input_shape)

    def call(self, x, training=None):
        pos = ops.cast(self.pos_emb[: x.shape[1]], x.dtype)
        return super().call(x + pos[None, :, None], training=training)

    def vit_pytorch_state_map(self):
        return {"pos_emb": self.pos_emb, **as_feature_map(super().vit_pytorch_state_map())}


@keras.saving.register_keras_serializable(package="vitkit")
class Aggregate(VitkitLayer):
    """NesT's block aggregation (Sec. 3.2): a 3x3 convolution, a channel LayerNorm and a 3x3
    max pooling of stride 2 over the whole feature map, so information crosses the block
    borders as the grid halves. Tokens `(b, h * w, dim)` of grid `size` in,
    `(b, ceil(h/2) * ceil(w/2), dim_out)` out.

    Args:
        dim_out: output channels.
        data_format: layout the convolution and pooling run in.
    """

    def __init__(self, dim_out, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim_out = check_int("dim_out", dim_out, owner=owner)
        self.data_format = check_choice("data_format", data_format, DATA_FORMATS, owner)
        policy = self.dtype_policy
        self.conv = ConvNormAct(
            dim_out, 3, 1, 1, norm="layer", data_format=data_format, dtype=policy, name="conv"
        )
        self.pool = MaxPool(3, 2, 1, data_format=data_format, dtype=policy, name="pool")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.pool.output_size(height, width)

    def build(self, input_shape):
        dim = input_shape[-1]
        self.conv.build(
            (None, None, None, dim)
            if self.data_format == "channels_last"
            else (None, dim, None, None)
        )

    def call(self, x, size):
        fmap = self.pool(self.conv(tokens_to_map(x, size, self.data_format)))
        return map_to_tokens(fmap, self.data_format)

    def vit_pytorch_state_map(self):
        return self.conv.vit_pytorch_state_map(conv="0", norm="1")


# fmt: off
@register_model(
    tiny=dict(
        image_size=(16, 8), patch_size=2, num_classes=7, dim=8, heads=2, num_hierarchies=2,
        block_repeats=(1, 1), mlp_mult=2,
    ),
    parity=[
        dict(image_size=32, patch_size=4, num_classes=7, dim=8, heads=2, num_hierarchies=3,
             block_repeats=(2, 1, 1), mlp_mult=2),
        dict(image_size=24, patch_size=3, num_classes=5, dim=6, heads=3, num_hierarchies=2,
             block_repeats=(1, 2), mlp_mult=1, channels=1, dropout=0.1),
        dict(image_size=12, patch_size=2, num_classes=3, dim=5, heads=1, num_hierarchies=1,
             block_repeats=2, channels=2, dim_head=7),
    ],
    presets={
        # The NesT-T example of vit-pytorch's README.
        "nest_tiny_224": dict(image_size=224, patch_size=4, num_classes=1000, dim=96, heads=3,
                              num_hierarchies=3, block_repeats=(8, 4, 1)),
    },
    invalid=[
        (dict(image_size=(18, 8)), "image_size"),
        (dict(block_repeats=(1, 1, 1)), "block_repeats"),
        (dict(heads=9), "heads"),
        (dict(num_hierarchies=0), "num_hierarchies"),
        (dict(num_hierarchies=1), "num_hierarchies"),  # two `block_repeats` given
        (dict(mlp_mult=0), "mlp_mult"),
    ],
    digits=dict(image_size=8, patch_size=1, num_classes=10, dim=32, heads=2, num_hierarchies=2,
                block_repeats=(2, 2), mlp_mult=2, channels=1),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class NesT(VitkitModel):
    """The Nested Hierarchical Transformer: patches are embedded, the token map is cut into
    local blocks (`2**(num_hierarchies - 1)` per side at the bottom level) and a transformer
    runs inside each block; between levels, a convolution and max pooling aggregate the map,
    which halves it (so a level has a quarter as many blocks, of the same size) and doubles its
    width and heads. A channel LayerNorm, global average pooling and a linear head close.

    Args:
        image_size: int or (height, width); its patch grid must split into
            `2**(num_hierarchies - 1)` blocks per side.
        patch_size: int or (height, width); must divide `image_size`.
        num_classes: outputs.
        dim: width of the bottom level (doubled at every level up).
        heads: heads of the bottom level (doubled at every level up); each `dim // heads`
            wide.
        num_hierarchies: levels.
        block_repeats: transformer blocks per level, bottom first: one for all, or a tuple
            with one per level.
        mlp_mult: feed-forward width over the level's width.
        channels: image channels.
        dim_head: accepted as vit-pytorch does, and unused as there: heads are
            `dim // heads` wide.
        dropout: dropout inside the transformers.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    Smaller images work if both sides stay divisible by `patch_size * 2**(num_hierarchies-1)`
    and a block holds no more positions than the configured ones.

    Example:
        >>> model = NesT(image_size=32, patch_size=2, num_classes=10, dim=32, heads=2,
        ...              num_hierarchies=3, block_repeats=(2, 1, 1))
        >>> model(np.zeros((1, 32, 32, 3))).shape
        (1, 10)
    """

    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes,
        dim,
        heads,
        num_hierarchies,
        block_repeats,
        mlp_mult=4,
        channels=3,
        dim_head=64,
        dropout=0.0,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        owner = type(self).__name__
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.dim = check_int("dim", dim, owner=owner)
        self.heads = check_int("heads", heads, owner=owner)
        if heads > dim:
            raise ValueError(f"{owner}: `heads` ({heads}) must be at most `dim` ({dim}): each "
                             "head is `dim // heads` wide.")
        self.num_hierarchies = check_int("num_hierarchies", num_hierarchies, owner=owner)
        if isinstance(block_repeats, (tuple, list)):
            self.block_repeats = check_int_tuple("block_repeats", block_repeats, owner=owner,
                                                 length=num_hierarchies,
                                                 counted_by="num_hierarchies")
        else:
            self.block_repeats = check_int("block_repeats", block_repeats, owner=owner)
        self.mlp_mult = check_int("mlp_mult", mlp_mult, owner=owner)
        self.channels = check_int("channels", channels, owner=owner)
        self.dim_head = check_int("dim_head", dim_head, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner)
        self.image_hw = check_pair("image_size", image_size, owner=owner)
        self.patch_hw = check_pair("patch_size", patch_size, owner=owner)
        rows, cols = check_divisible(self.image_hw, self.patch_hw, owner)
        self.blocks = 2 ** (num_hierarchies - 1)
        if rows % self.blocks or cols % self.blocks:
            raise ValueError(
                f"{owner}: `image_size` {self.image_hw} must be divisible by `patch_size` "
                f"{self.patch_hw} times {self.blocks} (the blocks per side at the bottom of "
                f"{num_hierarchies} levels)."
            )
        self.block_grid = (rows // self.blocks, cols // self.blocks)
        repeats = (
            self.block_repeats if isinstance(self.block_repeats, tuple)
            else (self.block_repeats,) * num_hierarchies
        )

        policy = self.dtype_policy
        self.patch_embed = PatchEmbedding(dim, self.patch_hw, data_format=data_format,
                                          dtype=policy, name="patch_embed")
        seq_len = self.block_grid[0] * self.block_grid[1]
        self.levels, self.aggregates = [], []
        for i, depth in enumerate(repeats):
            width = dim * 2**i
            self.levels.append(NesTTransformer(
                width, seq_len, depth, heads * 2**i, mlp_mult, dropout, dtype=policy,
                name=f"level_{i}",
            ))
            if i < num_hierarchies - 1:
                self.aggregates.append(Aggregate(2 * width, data_format, dtype=policy,
                                                 name=f"aggregate_{i}"))
        self.norm = keras.layers.LayerNormalization(epsilon=LN_EPSILON, dtype=policy,
                                                    name="norm")
        self.head = keras.layers.Dense(num_classes, dtype=policy, name="head")

    def check_spatial(self, height, width):
        step = (self.patch_hw[0] * self.blocks, self.patch_hw[1] * self.blocks)
        if height % step[0] or width % step[1]:
            self.bad_input(f"height and width divisible by {step} (`patch_size` times the "
                           f"{self.blocks} blocks per side)", f"{height}x{width} images")
        block = (height // step[0], width // step[1])
        capacity = self.block_grid[0] * self.block_grid[1]
        if block[0] * block[1] > capacity:
            self.bad_input(
                f"at most {capacity} positions per block (`image_size` {self.image_hw} gives "
                f"{self.block_grid[0]}x{self.block_grid[1]})",
                f"{height}x{width} images ({block[0]}x{block[1]} per block)",
            )

    def call(self, images, training=None):
        images = self.check_images(images)
        x = self.patch_embed(images)  # (b, h * w, dim)
        size = self.patch_embed.grid_size(images)
        for i, level in enumerate(self.levels):
            blocks = 2 ** (self.num_hierarchies - 1 - i)
            x = from_blocks(level(to_blocks(x, size, blocks), training=training), size, blocks)
            if i < len(self.aggregates):
                x = self.aggregates[i](x, size=size)
                size = self.aggregates[i].output_size(*size)
        return self.head(ops.mean(self.norm(x), axis=1))

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.nest.NesT`'s state dict."""
        layers = {}
        for i, level in enumerate(self.levels):
            layers[f"{i}.0"] = level
            if i < len(self.aggregates):
                layers[f"{i}.1"] = self.aggregates[i]
        return {
            "to_patch_embedding": as_feature_map(self.patch_embed.vit_pytorch_state_map()),
            "layers": layers,
            "mlp_head.0": channel_norm(self.norm),
            "mlp_head.2": self.head,
        }
