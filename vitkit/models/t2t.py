"""T2T-ViT: "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet"
(Yuan et al., ICCV 2021, arXiv:2101.11986)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.convert.mapping import Reshaped
from vitkit.layers import ClassToken, LearnedPositionEmbedding, TokenPool, Transformer, VitkitLayer
from vitkit.layers.utils import (
    DATA_FORMATS,
    check_choice,
    check_int,
    check_pair,
    check_rate,
    plain,
    to_channels_last,
    unfold,
)
from vitkit.models.base import VitkitModel
from vitkit.registry import register_model

T2T_SIZES = {  # Table 1 of the paper: the backbone after the T2T module
    14: dict(dim=384, heads=6, mlp_dim=1152),
    19: dict(dim=448, heads=7, mlp_dim=1344),
    24: dict(dim=512, heads=8, mlp_dim=1536),
}


def check_t2t_layers(t2t_layers, owner: str) -> tuple:
    """A non-empty sequence of (kernel_size, stride) pairs of positive ints, as tuples."""
    rule = f"{owner}: `t2t_layers` must be a non-empty sequence of (kernel_size, stride) pairs"
    if not isinstance(t2t_layers, (list, tuple)) or not t2t_layers:
        raise ValueError(f"{rule} of positive integers; got {t2t_layers!r}.")
    layers = []
    for layer in t2t_layers:
        if not isinstance(layer, (list, tuple)) or len(layer) != 2:
            raise ValueError(f"{rule}; got the entry {layer!r}.")
        for value in layer:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{rule} of positive integers; got the entry {layer!r}.")
        layers.append(tuple(layer))
    return tuple(layers)


def soft_split_size(size: int, t2t_layers) -> int:
    """Tokens along one side after every soft split: each unfold pads by `stride // 2`."""
    for kernel, stride in t2t_layers:
        size = (size + 2 * (stride // 2) - kernel) // stride + 1
    return size


@keras.saving.register_keras_serializable(package="vitkit")
class TokensToToken(VitkitLayer):
    """The T2T module (sec. 3.1): images -> tokens by repeated soft splits.

    Each `(kernel_size, stride)` step unfolds overlapping `kernel x kernel` windows (zero
    padding `stride // 2`), so each new token concatenates a neighbourhood of old ones
    (`channels * kernel**2` wide). Between steps a one-block, one-head transformer at that
    width re-mixes the tokens, which are then put back on their grid; after the last step
    a linear layer projects to `dim`. `(b, h, w, c) -> (b, h' * w', dim)`.

    Args:
        dim: output token width.
        t2t_layers: the `(kernel_size, stride)` of each soft split.
        channels: image channels.
        dropout: dropout in the transformers between the splits.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).
    """

    def __init__(
        self,
        dim,
        t2t_layers=((7, 4), (3, 2), (3, 2)),
        channels=3,
        dropout=0.0,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.t2t_layers = check_t2t_layers(t2t_layers, owner)
        self.channels = check_int("channels", channels, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner=owner)
        self.data_format = check_choice("data_format", data_format, DATA_FORMATS, owner)

        self.widths = []  # token width after each split
        width = channels
        for kernel, _ in self.t2t_layers:
            width *= kernel**2
            self.widths.append(width)
        # a one-block transformer after every split but the last
        self.transformers = [
            Transformer(
                width,
                depth=1,
                heads=1,
                dim_head=width,
                mlp_dim=width,
                dropout=dropout,
                dtype=self.dtype_policy,
                name=f"transformer_{i}",
            )
            for i, width in enumerate(self.widths[:-1])
        ]
        self.proj = keras.layers.Dense(dim, dtype=self.dtype_policy, name="proj")

    def build(self, input_shape):
        for transformer, width in zip(self.transformers, self.widths):
            transformer.build((None, None, width))
        self.proj.build((None, None, self.widths[-1]))

    def call(self, images, training=None):
        x = to_channels_last(images, self.data_format)  # (b, h, w, c)
        for i, (kernel, stride) in enumerate(self.t2t_layers):
            pad = stride // 2
            x = unfold(x, (kernel, kernel), (stride, stride), (pad, pad))  # (b, h', w', c k k)
            _, rows, cols, width = x.shape
            x = ops.reshape(x, (-1, rows * cols, width))  # tokens
            if i < len(self.transformers):
                x = self.transformers[i](x, training=training)
                x = ops.reshape(x, (-1, rows, cols, width))  # back on the grid
        return self.proj(x)  # (b, h' * w', dim)

    def vit_pytorch_state_map(self):
        """vit-pytorch's `to_patch_embedding` Sequential: four modules per split (rearrange,
        unfold, rearrange, transformer or identity), then the Linear."""
        names = {f"{4 * i + 3}": t.vit_pytorch_state_map() for i, t in enumerate(self.transformers)}
        names[f"{4 * len(self.t2t_layers)}"] = self.proj
        return names


# fmt: off
@register_model(
    tiny=dict(
        image_size=12, num_classes=7, dim=20, depth=2, heads=3, dim_head=6, mlp_dim=26,
        t2t_layers=((3, 2), (3, 1)),
    ),
    parity=[
        dict(image_size=20, num_classes=7, dim=24, depth=2, heads=3, dim_head=7, mlp_dim=30,
             channels=2, pool="mean", t2t_layers=((5, 3), (3, 2))),
        dict(image_size=32, num_classes=5, dim=16, depth=1, heads=2, mlp_dim=20, channels=1,
             dropout=0.1, emb_dropout=0.1),
        dict(image_size=16, num_classes=3, dim=12, depth=1, heads=1, dim_head=12, mlp_dim=9,
             t2t_layers=((4, 4),)),
    ],
    presets={
        f"t2t_vit_{depth}": dict(image_size=224, num_classes=1000, depth=depth, **dims)
        for depth, dims in T2T_SIZES.items()
    },
    invalid=[
        (dict(depth=None), "depth"),
        (dict(t2t_layers=((3, 0),)), "t2t_layers"),
        (dict(t2t_layers=()), "t2t_layers"),
        (dict(transformer="transformer"), "transformer"),
        (dict(image_size=2, t2t_layers=((7, 1),)), "image_size"),
        (dict(pool="max"), "pool"),
    ],
    digits=dict(image_size=8, num_classes=10, dim=64, depth=4, heads=4, dim_head=16,
                mlp_dim=128, channels=1, t2t_layers=((3, 1), (3, 2))),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class T2TViT(VitkitModel):
    """ViT whose patch embedding is the Tokens-to-Token module (`TokensToToken`): overlapping
    soft splits with small transformers in between model local structure (edges, lines) that
    hard patches cut through. Then a class token, learned positions and a transformer encoder
    (vit-pytorch's ViT encoder, or any Keras layer given as `transformer`).

    As in vit-pytorch, the T2T module keeps every window's full width (`channels * k**2`,
    multiplied at each split) instead of the paper's 64-wide token projection, so presets
    have the paper's backbone sizes but more parameters than Table 1 lists.

    Args:
        image_size: int or (height, width). Smaller images work too (they use the first rows
            of the position table), as long as every split leaves at least one token.
        num_classes: number of outputs (>= 1).
        dim: token width of the encoder.
        depth, heads, mlp_dim: the encoder's blocks, attention heads and feed-forward width;
            required unless `transformer` is given (then they are ignored).
        pool: `"cls"` (class token) or `"mean"` (mean of all tokens).
        channels: image channels.
        dim_head: width of each attention head of the encoder.
        dropout: dropout in the T2T module and the encoder.
        emb_dropout: dropout on the embedded tokens.
        transformer: any Keras layer mapping `(b, n, dim) -> (b, n, dim)`, used as the
            encoder instead of the built-in one; it must be serializable
            (`keras.saving.register_keras_serializable`) to save the model.
        t2t_layers: `(kernel_size, stride)` of each soft split.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    Example:
        >>> model = T2TViT(dim=512, image_size=224, depth=5, heads=8, mlp_dim=512,
        ...                num_classes=1000, t2t_layers=((7, 4), (3, 2), (3, 2)))
        >>> model(np.zeros((1, 224, 224, 3))).shape
        (1, 1000)
    """

    def __init__(
        self,
        *,
        image_size,
        num_classes,
        dim,
        depth=None,
        heads=None,
        mlp_dim=None,
        pool="cls",
        channels=3,
        dim_head=64,
        dropout=0.0,
        emb_dropout=0.0,
        transformer=None,
        t2t_layers=((7, 4), (3, 2), (3, 2)),
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        owner = type(self).__name__
        if transformer is not None and not isinstance(transformer, keras.layers.Layer):
            raise ValueError(
                f"{owner}: `transformer` must be a Keras layer mapping (b, n, dim) to "
                f"(b, n, dim), or None; got {type(transformer).__name__}."
            )
        self.image_size = image_size
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.dim = check_int("dim", dim, owner=owner)
        # the built-in encoder needs its sizes; a given one makes them unused
        for name, value in (("depth", depth), ("heads", heads), ("mlp_dim", mlp_dim)):
            if value is None and transformer is None:
                raise ValueError(f"{owner}: `{name}` is required unless `transformer` is given.")
            if value is not None:
                check_int(name, value, owner=owner)
        self.depth, self.heads, self.mlp_dim = depth, heads, mlp_dim
        self.pool = check_choice("pool", pool, ("cls", "mean"), owner)
        self.channels = check_int("channels", channels, owner=owner)
        self.dim_head = check_int("dim_head", dim_head, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner=owner)
        self.emb_dropout = check_rate("emb_dropout", emb_dropout, owner=owner)
        self.t2t_layers = check_t2t_layers(t2t_layers, owner)
        self.image_hw = check_pair("image_size", image_size, owner=owner)
        rows, cols = (soft_split_size(side, self.t2t_layers) for side in self.image_hw)
        if min(rows, cols) < 1:
            raise ValueError(
                f"{owner}: `image_size` {self.image_hw} is too small for `t2t_layers` "
                f"{self.t2t_layers}: a soft split leaves no token."
            )

        policy = self.dtype_policy
        self.patch_embed = TokensToToken(
            dim, self.t2t_layers, channels, dropout, data_format, dtype=policy, name="t2t"
        )
        self.cls_token = ClassToken(dtype=policy, name="cls_token")
        self.pos_embedding = LearnedPositionEmbedding(
            rows * cols + 1, dtype=policy, name="pos_embedding"
        )
        self.embedding_dropout = keras.layers.Dropout(emb_dropout, dtype=policy)
        self._transformer_given = transformer is not None
        self.transformer = (
            transformer
            if transformer is not None
            else Transformer(
                dim, depth, heads, dim_head, mlp_dim, dropout, dtype=policy, name="transformer"
            )
        )
        self.pooling = TokenPool(pool, dtype=policy, name="pool")
        self.head = keras.layers.Dense(num_classes, dtype=policy, name="head")

    def get_config(self):
        config = super().get_config()
        # the argument as given: None for the built-in encoder, else the serialized layer
        config["transformer"] = (
            plain(keras.saving.serialize_keras_object(self.transformer))
            if self._transformer_given
            else None
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("transformer"), dict):
            config["transformer"] = keras.saving.deserialize_keras_object(config["transformer"])
        return cls(**config)

    def check_spatial(self, height, width):
        (ih, iw), layers = self.image_hw, self.t2t_layers
        tokens = min(soft_split_size(height, layers), soft_split_size(width, layers))
        if height > ih or width > iw or tokens < 1:
            self.bad_input(
                f"height <= {ih} and width <= {iw}, large enough for `t2t_layers` {layers}",
                f"{height}x{width} images",
            )

    def call(self, images, training=None):
        x = self.patch_embed(self.check_images(images), training=training)  # (b, n, dim)
        x = self.pos_embedding(self.cls_token(x))  # (b, 1 + n, dim)
        x = self.transformer(self.embedding_dropout(x, training=training), training=training)
        if x.shape[-1] is not None and x.shape[-1] != self.dim:
            raise ValueError(
                f"T2TViT: `transformer` must keep the token width `dim`={self.dim}; it "
                f"returned tokens of width {x.shape[-1]}."
            )
        return self.head(self.pooling(x))  # (b, num_classes)

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.t2t.T2TViT`'s state dict (a custom
        `transformer` maps through its own `vit_pytorch_state_map`, or a Keras leaf rule)."""
        return {
            "to_patch_embedding": self.patch_embed.vit_pytorch_state_map(),
            "cls_token": Reshaped(self.cls_token.token, (1, 1, self.dim)),
            "pos_embedding": Reshaped(
                self.pos_embedding.embedding, (1, self.pos_embedding.length, self.dim)
            ),
            "transformer": self.transformer,
            "mlp_head": self.head,
        }
