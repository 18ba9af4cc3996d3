"""CCT: "Escaping the Big Data Paradigm with Compact Transformers" (Hassani et al., 2021,
arXiv:2104.05704)."""

from __future__ import annotations

import warnings

import keras
import numpy as np
from keras import ops

from vitkit.convert.mapping import Reshaped
from vitkit.layers import (
    ConvStem,
    DropPath,
    LearnedPositionEmbedding,
    Transformer,
    map_to_tokens,
)
from vitkit.layers.attention import LN_EPSILON
from vitkit.layers.backend_quirks import softmax
from vitkit.layers.base import VitkitLayer
from vitkit.layers.utils import (
    check_choice,
    check_int,
    check_pair,
    check_positive,
    check_rate,
)
from vitkit.models.base import VitkitModel
from vitkit.registry import register_model

__all__ = ["CCT", "cct_2", "cct_4", "cct_6", "cct_7", "cct_8", "cct_14", "cct_16"]

# The sizes of vit-pytorch's factories (Table 1 of the paper): layers, heads, mlp ratio, width.
CCT_SIZES = {
    2: dict(num_layers=2, num_heads=2, mlp_ratio=1, embedding_dim=128),
    4: dict(num_layers=4, num_heads=2, mlp_ratio=1, embedding_dim=128),
    6: dict(num_layers=6, num_heads=4, mlp_ratio=2, embedding_dim=256),
    7: dict(num_layers=7, num_heads=4, mlp_ratio=2, embedding_dim=256),
    8: dict(num_layers=8, num_heads=4, mlp_ratio=2, embedding_dim=256),
    14: dict(num_layers=14, num_heads=6, mlp_ratio=3, embedding_dim=384),
    16: dict(num_layers=16, num_heads=6, mlp_ratio=3, embedding_dim=384),
}


def tokenizer_geometry(kernel_size: int) -> dict:
    """The factories' stride and padding for a tokenizer kernel: 3 -> (1, 1), 7 -> (2, 3)."""
    return dict(stride=max(1, kernel_size // 2 - 1), padding=max(1, kernel_size // 2))


def _published(layers: int, kernel: int, convs: int, image: int, classes: int) -> dict:
    """`cct_<layers>_<kernel>x<convs>_<image>` of the paper and its official repository."""
    return dict(
        img_size=image,
        n_conv_layers=convs,
        kernel_size=kernel,
        num_classes=classes,
        positional_embedding="learnable",
        **tokenizer_geometry(kernel),
        **CCT_SIZES[layers],
    )


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
    """CCT's fixed position table `(length, dim)`: position p, channel i holds
    `sin` (even i) or `cos` (odd i) of `p / 10000 ** (2 * (i // 2) / dim)`."""
    position = np.arange(length, dtype="float64")[:, None]
    channel = np.arange(dim)[None, :]
    angle = position / np.power(10000.0, 2 * (channel // 2) / dim)
    return np.where(channel % 2 == 0, np.sin(angle), np.cos(angle)).astype("float32")


@keras.saving.register_keras_serializable(package="vitkit")
class CCTPositionEmbedding(LearnedPositionEmbedding):
    """CCT's position embedding: learned (truncated normal, std 0.2) or the fixed
    `sinusoidal_table` (kept as a non-trainable weight, as vit-pytorch keeps it)."""

    def __init__(self, length, kind="learnable", **kwargs):
        super().__init__(length, **kwargs)
        self.kind = check_choice("kind", kind, ("learnable", "sine"), type(self).__name__)

    def build(self, input_shape):
        dim = input_shape[-1]
        if self.kind == "sine":
            table = sinusoidal_table(self.length, dim)
            initializer, trainable = (lambda shape, dtype=None: ops.cast(table, dtype)), False
        else:
            initializer, trainable = keras.initializers.TruncatedNormal(stddev=0.2), True
        self.embedding = self.add_weight(
            shape=(self.length, dim),
            initializer=initializer,
            trainable=trainable,
            name="embedding",
        )


@keras.saving.register_keras_serializable(package="vitkit")
class SequencePooling(VitkitLayer):
    """CCT's sequence pooling (Sec. 3.2): attention weights from one linear score per token,
    softmax over the sequence, weighted mean: `(b, n, d) -> (b, d)`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.score = keras.layers.Dense(1, dtype=self.dtype_policy, name="attention_pool")

    def build(self, input_shape):
        self.score.build(input_shape)

    def call(self, x):
        weights = softmax(ops.cast(self.score(x)[..., 0], "float32"), axis=1)
        return ops.einsum("bn,bnd->bd", ops.cast(weights, x.dtype), x)


@keras.saving.register_keras_serializable(package="vitkit")
class CCTTransformer(Transformer):
    """CCT's encoder block (after timm and torch's `TransformerEncoderLayer`): the attention
    is pre-norm, then the stream itself is normed before the feed-forward, each branch under
    stochastic depth: `x += drop(attn(norm(x))); x = norm1(x); x += drop(ff(x))`. The drop rate
    grows linearly from 0 to `stochastic_depth_rate` over the blocks; a LayerNorm closes.

    Args:
        dim, depth, heads, mlp_dim, dropout: as in `Transformer` (each head is `dim // heads`
            wide).
        attention_dropout: dropout on the attention weights.
        stochastic_depth_rate: the last block's drop-path rate.
    """

    def __init__(
        self,
        dim,
        depth,
        heads,
        mlp_dim,
        dropout=0.0,
        attention_dropout=0.1,
        stochastic_depth_rate=0.1,
        **kwargs,
    ):
        owner = type(self).__name__
        self.attention_dropout = check_rate("attention_dropout", attention_dropout, owner)
        self.stochastic_depth_rate = check_rate(
            "stochastic_depth_rate", stochastic_depth_rate, owner
        )
        super().__init__(
            dim, depth, heads, dim // heads, mlp_dim, dropout, project_out=True, **kwargs
        )
        policy = self.dtype_policy
        self.post_norms = [
            keras.layers.LayerNormalization(epsilon=LN_EPSILON, dtype=policy, name=f"norm1_{i}")
            for i in range(depth)
        ]
        rates = np.linspace(0.0, stochastic_depth_rate, depth)
        self.drop_paths = [
            DropPath(float(rate), dtype=policy, name=f"drop_path_{i}")
            for i, rate in enumerate(rates)
        ]

    def make_attention(self, index):
        return super().make_attention(index, attention_dropout=self.attention_dropout)

    def make_feed_forward(self, index):
        return super().make_feed_forward(index, norm=False)  # the stream is normed instead

    def build(self, input_shape):
        super().build(input_shape)
        for norm in self.post_norms:
            norm.build(input_shape)

    def residual_block(self, index, x, context=None, training=None):
        drop = self.drop_paths[index]
        x = x + drop(self.attentions[index](x, training=training), training=training)
        x = self.post_norms[index](x)
        return x + drop(self.feed_forwards[index](x, training=training), training=training)

    def vit_pytorch_state_map(self):
        """vit-pytorch's `TransformerClassifier.blocks` and `.norm`."""
        names = {"norm": self.norm}
        for i, (attention, ff) in enumerate(zip(self.attentions, self.feed_forwards)):
            names[f"blocks.{i}"] = {
                "pre_norm": attention.norm_layer,
                "self_attn.qkv": attention.to_qkv,
                "self_attn.proj": attention.to_out,
                "linear1": ff.hidden,
                "norm1": self.post_norms[i],
                "linear2": ff.out,
            }
        return names


# fmt: off
@register_model(
    tiny=dict(
        img_size=(20, 12), embedding_dim=20, n_conv_layers=1, kernel_size=3, stride=1,
        padding=1, num_layers=2, num_heads=2, mlp_ratio=1.5, num_classes=7,
        positional_embedding="learnable",
    ),
    parity=[
        dict(img_size=(20, 12), embedding_dim=20, n_conv_layers=1, kernel_size=3, stride=1,
             padding=1, num_layers=2, num_heads=2, mlp_ratio=1.5, num_classes=7,
             positional_embedding="learnable"),
        dict(img_size=(26, 19), embedding_dim=24, n_input_channels=2, kernel_size=5, stride=2,
             padding=2, pooling_kernel_size=2, pooling_stride=1, pooling_padding=0,
             num_layers=3, num_heads=3, mlp_ratio=2.0, num_classes=5,
             positional_embedding="sine"),
        dict(img_size=17, embedding_dim=12, n_conv_layers=1, kernel_size=7, stride=2,
             padding=3, num_layers=1, num_heads=1, mlp_ratio=0.75, num_classes=3,
             positional_embedding="none"),
    ],
    presets={
        "cct_2_3x2_32": _published(2, 3, 2, 32, 10),
        "cct_4_3x2_32": _published(4, 3, 2, 32, 10),
        "cct_6_3x1_32": _published(6, 3, 1, 32, 10),
        "cct_6_3x2_32": _published(6, 3, 2, 32, 10),
        "cct_7_3x1_32": _published(7, 3, 1, 32, 10),
        "cct_7_3x2_32": _published(7, 3, 2, 32, 10),
        "cct_14_7x2_224": _published(14, 7, 2, 224, 1000),
        "cct_14_7x2_384": _published(14, 7, 2, 384, 1000),
    },
    invalid=[
        (dict(positional_embedding="fixed"), "positional_embedding"),
        (dict(num_heads=3), "embedding_dim"),
        (dict(img_size=(20, 0)), "img_size"),
        (dict(pooling_padding=2), "pooling_padding"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(stochastic_depth_rate=1.0), "stochastic_depth_rate"),
        (dict(padding=-1), "padding"),
    ],
    digits=dict(img_size=8, embedding_dim=64, n_input_channels=1, n_conv_layers=1,
                kernel_size=3, stride=1, padding=1, num_layers=2, num_heads=2, mlp_ratio=2.0,
                num_classes=10, positional_embedding="learnable"),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class CCT(VitkitModel):
    """The Compact Convolutional Transformer: a convolutional tokenizer (conv, ReLU, max pool,
    `n_conv_layers` times) instead of patches, a transformer encoder, and sequence pooling
    instead of a class token.

    Args:
        img_size: int or (height, width).
        embedding_dim: token width (the last convolution's channels).
        n_input_channels: image channels.
        n_conv_layers: convolution + pooling layers in the tokenizer (64 channels between).
        kernel_size, stride, padding: the tokenizer's convolutions.
        pooling_kernel_size, pooling_stride, pooling_padding: its max pooling.
        dropout_rate: dropout on the embedded tokens and inside the blocks.
        attention_dropout: dropout on the attention weights.
        stochastic_depth_rate: drop-path rate of the last block (0 for the first).
        num_layers: transformer blocks.
        num_heads: attention heads; must divide `embedding_dim`.
        mlp_ratio: feed-forward width over `embedding_dim`.
        num_classes: outputs.
        positional_embedding: `"sine"` (fixed), `"learnable"` or `"none"`. With a position
            embedding the images must give as many tokens as `img_size` does; with `"none"`
            any size the tokenizer can take works.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    `mlp_radio`, a misspelling that vit-pytorch's README passes and vit-pytorch silently
    ignores, is accepted here as `mlp_ratio` with a `DeprecationWarning`.

    Example:
        >>> model = CCT(img_size=32, embedding_dim=128, n_conv_layers=2, kernel_size=3,
        ...             stride=1, padding=1, num_layers=2, num_heads=2, mlp_ratio=1.0,
        ...             num_classes=10)
        >>> model(np.zeros((1, 32, 32, 3))).shape
        (1, 10)
    """

    def __init__(
        self,
        *,
        img_size=224,
        embedding_dim=768,
        n_input_channels=3,
        n_conv_layers=1,
        kernel_size=7,
        stride=2,
        padding=3,
        pooling_kernel_size=3,
        pooling_stride=2,
        pooling_padding=1,
        dropout_rate=0.0,
        attention_dropout=0.1,
        stochastic_depth_rate=0.1,
        num_layers=12,
        num_heads=12,
        mlp_ratio=4.0,
        num_classes=1000,
        positional_embedding="sine",
        data_format="channels_last",
        **kwargs,
    ):
        owner = type(self).__name__
        if "mlp_radio" in kwargs:
            radio = kwargs.pop("mlp_radio")
            warnings.warn(
                f"{owner}: `mlp_radio` is a misspelling of `mlp_ratio` (vit-pytorch ignores it "
                "silently); it is used as `mlp_ratio` here. Pass `mlp_ratio` instead.",
                DeprecationWarning,
                stacklevel=2,
            )
            if mlp_ratio != 4.0 and mlp_ratio != radio:
                raise ValueError(
                    f"{owner}: `mlp_radio` ({radio!r}) and `mlp_ratio` ({mlp_ratio!r}) disagree; "
                    "pass `mlp_ratio` alone."
                )
            mlp_ratio = radio
        super().__init__(data_format=data_format, **kwargs)
        self.img_size = img_size
        self.embedding_dim = check_int("embedding_dim", embedding_dim, owner=owner)
        self.n_input_channels = check_int("n_input_channels", n_input_channels, owner=owner)
        self.n_conv_layers = check_int("n_conv_layers", n_conv_layers, owner=owner)
        self.kernel_size = check_int("kernel_size", kernel_size, owner=owner)
        self.stride = check_int("stride", stride, owner=owner)
        self.padding = check_int("padding", padding, minimum=0, owner=owner)
        self.pooling_kernel_size = check_int("pooling_kernel_size", pooling_kernel_size,
                                             owner=owner)
        self.pooling_stride = check_int("pooling_stride", pooling_stride, owner=owner)
        self.pooling_padding = check_int("pooling_padding", pooling_padding, minimum=0,
                                         owner=owner)
        if 2 * pooling_padding > pooling_kernel_size:
            raise ValueError(f"{owner}: `pooling_padding` must be at most half of "
                             f"`pooling_kernel_size` ({pooling_kernel_size}); got "
                             f"{pooling_padding}.")
        self.dropout_rate = check_rate("dropout_rate", dropout_rate, owner)
        self.attention_dropout = check_rate("attention_dropout", attention_dropout, owner)
        self.stochastic_depth_rate = check_rate("stochastic_depth_rate", stochastic_depth_rate,
                                                owner)
        self.num_layers = check_int("num_layers", num_layers, owner=owner)
        self.num_heads = check_int("num_heads", num_heads, owner=owner)
        if embedding_dim % num_heads:
            raise ValueError(f"{owner}: `embedding_dim` ({embedding_dim}) must be divisible by "
                             f"`num_heads` ({num_heads}).")
        self.mlp_ratio = check_positive("mlp_ratio", mlp_ratio, owner)
        mlp_dim = int(embedding_dim * mlp_ratio)
        if mlp_dim < 1:
            raise ValueError(f"{owner}: `mlp_ratio` ({mlp_ratio}) gives a feed-forward width "
                             f"of {mlp_dim}; it must be at least 1.")
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.positional_embedding = check_choice(
            "positional_embedding", positional_embedding, ("sine", "learnable", "none"), owner
        )
        self.image_hw = check_pair("img_size", img_size, owner=owner)
        self.channels = n_input_channels

        policy = self.dtype_policy
        self.tokenizer = ConvStem(
            [64] * (n_conv_layers - 1) + [embedding_dim], kernel_size, stride, padding,
            use_bias=False, activation="relu", kernel_initializer="he_normal",
            pool=(pooling_kernel_size, pooling_stride, pooling_padding),
            data_format=data_format, dtype=policy, name="tokenizer",
        )
        rows, cols = self.tokenizer.output_size(*self.image_hw)
        if rows < 1 or cols < 1:
            raise ValueError(f"{owner}: `img_size` {self.image_hw} is too small for the "
                             f"tokenizer (it would give a {rows}x{cols} grid).")
        self.grid = (rows, cols)
        self.sequence_length = rows * cols
        self.pos_embedding = (
            CCTPositionEmbedding(self.sequence_length, positional_embedding, dtype=policy,
                                 name="positional_emb")
            if positional_embedding != "none"
            else None
        )
        self.embedding_dropout = keras.layers.Dropout(dropout_rate, dtype=policy)
        self.transformer = CCTTransformer(
            embedding_dim, num_layers, num_heads, mlp_dim, dropout_rate, attention_dropout,
            stochastic_depth_rate, dtype=policy, name="transformer",
        )
        self.pooling = SequencePooling(dtype=policy, name="seq_pool")
        self.head = keras.layers.Dense(num_classes, dtype=policy, name="fc")

    def check_spatial(self, height, width):
        rows, cols = self.tokenizer.output_size(height, width)
        if rows < 1 or cols < 1:
            self.bad_input("images large enough for the convolutional tokenizer",
                           f"{height}x{width} images")
        if self.pos_embedding is not None and rows * cols != self.sequence_length:
            self.bad_input(
                f"a size that the tokenizer turns into {self.sequence_length} tokens, as "
                f"`img_size` {self.image_hw} does ({self.grid[0]}x{self.grid[1]})",
                f"{height}x{width} images ({rows}x{cols} tokens)",
            )

    def call(self, images, training=None):
        x = self.tokenizer(self.check_images(images), training=training)
        x = map_to_tokens(x, self.data_format)  # (b, rows * cols, embedding_dim)
        if self.pos_embedding is not None:
            x = self.pos_embedding(x)
        x = self.embedding_dropout(x, training=training)
        x = self.transformer(x, training=training)
        return self.head(self.pooling(x))

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.cct.CCT`'s state dict."""
        classifier = {
            **self.transformer.vit_pytorch_state_map(),
            "attention_pool": self.pooling.score,
            "fc": self.head,
        }
        if self.pos_embedding is not None:
            table = self.pos_embedding.embedding
            classifier["positional_emb"] = Reshaped(table, (1, *table.shape))
        return {
            "tokenizer": {"conv_layers": self.tokenizer.vit_pytorch_state_map(conv="{i}.0")},
            "classifier": classifier,
        }


def _factory(size: int):
    """vit-pytorch's `cct_<size>`: CCT with the layers, heads, mlp ratio and width of
    `CCT_SIZES[size]`, and the tokenizer's `stride` and `padding` defaulting to
    `max(1, kernel_size // 2 - 1)` and `max(1, kernel_size // 2)`."""
    sizes = CCT_SIZES[size]

    def factory(kernel_size=3, stride=None, padding=None, **kwargs) -> CCT:
        geometry = tokenizer_geometry(kernel_size)
        stride = geometry["stride"] if stride is None else stride
        padding = geometry["padding"] if padding is None else padding
        return CCT(kernel_size=kernel_size, stride=stride, padding=padding, **sizes, **kwargs)

    factory.__name__ = factory.__qualname__ = f"cct_{size}"
    factory.__doc__ = (
        f"CCT-{size}: {sizes['num_layers']} layers, {sizes['num_heads']} heads, mlp ratio "
        f"{sizes['mlp_ratio']}, width {sizes['embedding_dim']}. A 3x3 tokenizer kernel by "
        "default; `stride` and `padding` default to `max(1, k // 2 - 1)` and `max(1, k // 2)`."
    )
    return factory


cct_2 = _factory(2)
cct_4 = _factory(4)
cct_6 = _factory(6)
cct_7 = _factory(7)
cct_8 = _factory(8)
cct_14 = _factory(14)
cct_16 = _factory(16)
