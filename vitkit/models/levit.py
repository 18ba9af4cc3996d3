"""LeViT: "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference" (Graham et
al., 2021, arXiv:2104.01136)."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from vitkit.convert.mapping import as_feature_map
from vitkit.layers import Attention, ConvStem, FeedForward, Transformer, map_to_tokens
from vitkit.layers.backend_quirks import GELU
from vitkit.layers.conv import BN_EPSILON, BN_MOMENTUM
from vitkit.layers.utils import check_int, check_int_tuple, check_pair, check_rate
from vitkit.models.base import VitkitModel
from vitkit.registry import register_model

STEM_CHANNELS = (32, 64, 128)  # then dim[0]: four 3x3 convolutions of stride 2


def relative_position_indices(fmap_size, downsample: bool) -> np.ndarray:
    """`(queries, keys)` indices into LeViT's bias table: `|dy| * w + |dx|` between each query
    position (every other row and column when downsampling) and each key position of an
    `(h, w)` map, both in row-major order."""
    h, w = fmap_size
    step = 2 if downsample else 1
    q = np.stack(np.meshgrid(np.arange(0, h, step), np.arange(0, w, step), indexing="ij"), -1)
    k = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1)
    rel = np.abs(q.reshape(-1, 1, 2) - k.reshape(1, -1, 2))
    return (rel[..., 0] * w + rel[..., 1]).astype("float32")


def _batch_norm(name, policy):
    return keras.layers.BatchNormalization(
        epsilon=BN_EPSILON, momentum=BN_MOMENTUM, dtype=policy, name=name
    )


@keras.saving.register_keras_serializable(package="vitkit")
class LeViTAttention(Attention):
    """LeViT's attention block (Sec. 4.2) over the tokens of an `(h, w)` map: queries, keys
    and values each from a point-wise projection and a BatchNorm (keys `dim_key` wide per head,
    values `dim_value`); a learned bias per head for every 2-D offset `(|dy|, |dx|)`, added to
    the scores; GELU, a projection and a BatchNorm on the way out. With
    `downsample`, the queries come from every other row and column (a "shrink attention"),
    which halves the map.

    Args:
        dim: input width.
        fmap_size: int or (h, w), the map the tokens come from.
        heads: attention heads.
        dim_key: width of each query / key head.
        dim_value: width of each value head.
        dropout: dropout on the attention weights and the output.
        dim_out: output width (`dim` if `None`).
        downsample: subsample the queries with stride 2.
    """

    fusable = False  # the bias enters the scores

    def __init__(
        self,
        dim,
        fmap_size,
        heads=8,
        dim_key=32,
        dim_value=64,
        dropout=0.0,
        dim_out=None,
        downsample=False,
        **kwargs,
    ):
        owner = type(self).__name__
        self.fmap_size = fmap_size
        self.fmap_hw = check_pair("fmap_size", fmap_size, owner=owner)
        self.dim_key = check_int("dim_key", dim_key, owner=owner)
        self.dim_value = check_int("dim_value", dim_value, owner=owner)
        self.dim_out = dim_out
        self.downsample = downsample
        super().__init__(
            dim,
            heads,
            dim_key,
            dropout,
            project_out=False,
            norm=False,
            dim_value=dim_value,
            **kwargs,
        )
        policy = self.dtype_policy
        self.out_proj = keras.layers.Dense(dim_out or dim, dtype=policy, name="out_proj")
        self.out_norm = _batch_norm("out_norm", policy)
        self.indices = relative_position_indices(self.fmap_hw, downsample)

    def make_projections(self):
        policy, h = self.dtype_policy, self.heads
        self.to_q = keras.layers.Dense(h * self.dim_key, use_bias=False, dtype=policy, name="to_q")
        self.to_k = keras.layers.Dense(h * self.dim_key, use_bias=False, dtype=policy, name="to_k")
        self.to_v = keras.layers.Dense(
            h * self.dim_value, use_bias=False, dtype=policy, name="to_v"
        )
        self.q_norm = _batch_norm("q_norm", policy)
        self.k_norm = _batch_norm("k_norm", policy)
        self.v_norm = _batch_norm("v_norm", policy)

    def build_projections(self, input_shape):
        for proj, norm in (
            (self.to_q, self.q_norm),
            (self.to_k, self.k_norm),
            (self.to_v, self.v_norm),
        ):
            proj.build(input_shape)
            norm.build((*input_shape[:-1], proj.units))
        h, w = self.fmap_hw
        self.pos_bias = self.add_weight(
            shape=(h * w, self.heads), initializer="zeros", name="pos_bias"
        )
        # vit-pytorch keeps the indices as a buffer; kept here as a weight so that a state dict
        # loads whole. Float32 holds them exactly, and `autocast=False` keeps them so.
        indices = self.indices
        self.pos_indices = self.add_weight(
            shape=indices.shape,
            initializer=lambda shape, dtype=None: ops.cast(indices, dtype),
            trainable=False,
            autocast=False,
            name="pos_indices",
        )

    def build(self, input_shape):
        self.build_projections(input_shape)
        self.out_proj.build((*input_shape[:-1], self.heads * self.dim_value))
        self.out_norm.build((*input_shape[:-1], self.out_proj.units))

    def queries_keys_values(self, x, context=None):
        q = x
        if self.downsample:  # every other row and column of the map
            h, w = self.fmap_hw
            q = ops.reshape(x, (-1, h, w, x.shape[-1]))[:, ::2, ::2]
            q = ops.reshape(q, (-1, q.shape[1] * q.shape[2], x.shape[-1]))
        q = self.q_norm(self.to_q(q))
        k = self.k_norm(self.to_k(x))
        v = self.v_norm(self.to_v(x))
        (q,), (k,) = self.split_heads(q, 1), self.split_heads(k, 1)
        v = ops.reshape(v, (-1, v.shape[1], self.heads, self.dim_value))
        return q, k, v

    def transform_scores(self, scores):
        """Adds the 2-D relative position bias (scaled up by 1 / scale, as vit-pytorch does)."""
        indices = ops.cast(self.pos_indices, "int32")
        bias = ops.take(self.pos_bias, indices, axis=0)  # (queries, keys, heads)
        bias = ops.transpose(bias, (2, 0, 1))[None] / self.scale
        return scores + ops.cast(bias, scores.dtype)

    def project(self, out, training=None):
        out = ops.reshape(out, (-1, out.shape[1], self.heads * self.dim_value))
        out = self.out_norm(self.out_proj(GELU(out)), training=training)
        return self.out_dropout(out, training=training)

    def vit_pytorch_state_map(self, out=None):
        """vit-pytorch's LeViT `Attention`: 1x1 convolutions and BatchNorms."""
        return {
            "to_q.0": self.to_q,
            "to_q.1": self.q_norm,
            "to_k.0": self.to_k,
            "to_k.1": self.k_norm,
            "to_v.0": self.to_v,
            "to_v.1": self.v_norm,
            "pos_bias.weight": self.pos_bias,
            "pos_indices": self.pos_indices,
            "to_out.1": self.out_proj,
            "to_out.2": self.out_norm,
        }


@keras.saving.register_keras_serializable(package="vitkit")
class LeViTTransformer(Transformer):
    """LeViT's blocks over the tokens of an `(h, w)` map: `x = attention(x) + x` (no residual
    when the block downsamples or changes the width), then `x = feed_forward(x) + x`, the
    feed-forward point-wise with hard-swish and no norm (BatchNorms are in the attention).

    Args:
        dim, fmap_size, heads, dim_key, dim_value, dropout, dim_out, downsample: as in
            `LeViTAttention`.
        depth: blocks.
        mlp_mult: feed-forward width over `dim_out`.
    """

    def __init__(
        self,
        dim,
        fmap_size,
        depth,
        heads,
        dim_key,
        dim_value,
        mlp_mult=2,
        dropout=0.0,
        dim_out=None,
        downsample=False,
        **kwargs,
    ):
        owner = type(self).__name__
        self.fmap_size = fmap_size
        self.dim_key = dim_key
        self.dim_value = dim_value
        self.mlp_mult = check_int("mlp_mult", mlp_mult, owner=owner)
        self.dim_out = dim_out
        self.downsample = downsample
        self.width_out = dim_out or dim
        self.attention_residual = not downsample and self.width_out == dim
        super().__init__(
            dim,
            depth,
            heads,
            dim_key,
            self.width_out * mlp_mult,
            dropout,
            final_norm=False,
            **kwargs,
        )

    def make_attention(self, index):
        return LeViTAttention(
            self.dim,
            self.fmap_size,
            self.heads,
            self.dim_key,
            self.dim_value,
            self.dropout,
            self.dim_out,
            self.downsample,
            dtype=self.dtype_policy,
            name=f"attention_{index}",
        )

    def make_feed_forward(self, index):
        return FeedForward(
            self.width_out,
            self.mlp_dim,
            dropout=self.dropout,
            activation="hard_swish",
            norm=False,
            dtype=self.dtype_policy,
            name=f"feed_forward_{index}",
        )

    def build(self, input_shape):
        shape_out = (*input_shape[:-1], self.width_out)
        for attention, feed_forward in zip(self.attentions, self.feed_forwards):
            attention.build(input_shape)
            feed_forward.build(shape_out)

    def residual_block(self, index, x, context=None, training=None):
        out = self.attentions[index](x, training=training)
        x = out + x if self.attention_residual else out
        return self.feed_forwards[index](x, training=training) + x

    def vit_pytorch_state_map(self):
        return as_feature_map(super().vit_pytorch_state_map(ff_hidden="net.0", ff_out="net.3"))


def _per_stage(name, value, stages, owner):
    """vit-pytorch's `cast_tuple`: an int for every stage, or a tuple padded with its last."""
    if isinstance(value, (tuple, list)):
        value = check_int_tuple(
            name, value, owner=owner, length=range(1, stages + 1), counted_by="stages"
        )
        return (*value, *(value[-1],) * (stages - len(value)))
    return (check_int(name, value, owner=owner),) * stages


LEVIT_SIZES = {  # Table 1 of the paper: widths, heads, depths, key width D (values 2 D)
    "128s": dict(dim=(128, 256, 384), heads=(4, 6, 8), depth=(2, 3, 4), dim_key=16),
    "128": dict(dim=(128, 256, 384), heads=(4, 8, 12), depth=(4, 4, 4), dim_key=16),
    "192": dict(dim=(192, 288, 384), heads=(3, 5, 6), depth=(4, 4, 4), dim_key=32),
    "256": dict(dim=(256, 384, 512), heads=(4, 6, 8), depth=(4, 4, 4), dim_key=32),
    "384": dict(dim=(384, 512, 768), heads=(6, 9, 12), depth=(4, 4, 4), dim_key=32),
}


# fmt: off
@register_model(
    tiny=dict(
        # Two stages: a third would see a 1x1 map, where a single key leaves the attention
        # bias without a gradient.
        image_size=(32, 48), num_classes=7, dim=(8, 12), depth=1, heads=(1, 2), stages=2,
        mlp_mult=2, dim_key=4, dim_value=6, num_distill_classes=5,
    ),
    parity=[
        # vit-pytorch's index buffers are randomized too (ints in [0, 10)): every map has
        # at least 10 positions, so a 4x4 map at the last stage.
        dict(image_size=64, num_classes=7, dim=16, depth=2, heads=2, mlp_mult=2, stages=1,
             dim_key=8, dim_value=12),
        dict(image_size=128, num_classes=5, dim=(16, 24), depth=(1, 2), heads=(2, 3),
             mlp_mult=1, stages=2, dim_key=6, dim_value=5, dropout=0.1,
             num_distill_classes=4),
        dict(image_size=256, num_classes=3, dim=(8, 12, 16), depth=1, heads=(1, 2),
             mlp_mult=3, dim_key=4, dim_value=4),
    ],
    presets={
        f"levit_{size}": dict(image_size=224, num_classes=1000, mlp_mult=2,
                              dim_value=2 * dims["dim_key"], **dims)
        for size, dims in LEVIT_SIZES.items()
    },
    invalid=[
        (dict(image_size=(32, 40)), "image_size"),
        (dict(dim=(8, 12, 16, 20)), "dim"),
        (dict(stages=0), "stages"),
        (dict(stages=1), "stages"),  # two `dim`s given
        (dict(num_distill_classes=0), "num_distill_classes"),
        (dict(dim_key=0), "dim_key"),
        (dict(dropout=2.0), "dropout"),
    ],
    digits=dict(image_size=16, num_classes=10, dim=(32, 48), depth=2, heads=(2, 3),
                mlp_mult=2, stages=2, dim_key=16, dim_value=16),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class LeViT(VitkitModel):
    """LeViT: a convolutional stem (four 3x3 convolutions of stride 2), then stages of
    attention and feed-forward blocks over the map's positions, with BatchNorm in place of
    LayerNorm, hard-swish, a learned attention bias for each 2-D offset instead of position
    embeddings, and a downsampling ("shrink") attention between stages; global average pooling
    and a linear head (plus a distillation head when `num_distill_classes` is given).

    Args:
        image_size: int or (height, width), multiples of 16. The position biases are built
            for this size: images must have it.
        num_classes: outputs of the head.
        dim, depth, heads: per stage, an int for all or a tuple (padded with its last value).
        mlp_mult: feed-forward width over the stage's width.
        stages: number of stages.
        dim_key: width of each query / key head.
        dim_value: width of each value head.
        dropout: dropout in the stages' blocks.
        num_distill_classes: if given, a second linear head; the model then returns
            `(logits, distill_logits)`.
        data_format: `"channels_last"` (b, h, w, 3) or `"channels_first"` (b, 3, h, w).

    Images have 3 channels (vit-pytorch's stem takes 3).

    Example:
        >>> model = LeViT(image_size=64, num_classes=10, dim=(32, 48), depth=1, heads=(2, 3),
        ...               mlp_mult=2, stages=2)
        >>> model(np.zeros((1, 64, 64, 3))).shape
        (1, 10)
    """

    def __init__(
        self,
        *,
        image_size,
        num_classes,
        dim,
        depth,
        heads,
        mlp_mult,
        stages=3,
        dim_key=32,
        dim_value=64,
        dropout=0.0,
        num_distill_classes=None,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        owner = type(self).__name__
        self.image_size = image_size
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.stages = check_int("stages", stages, owner=owner)
        self.dim = dim
        self.depth = depth
        self.heads = heads
        dims = _per_stage("dim", dim, stages, owner)
        depths = _per_stage("depth", depth, stages, owner)
        stage_heads = _per_stage("heads", heads, stages, owner)
        self.mlp_mult = check_int("mlp_mult", mlp_mult, owner=owner)
        self.dim_key = check_int("dim_key", dim_key, owner=owner)
        self.dim_value = check_int("dim_value", dim_value, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner)
        self.num_distill_classes = (
            None if num_distill_classes is None
            else check_int("num_distill_classes", num_distill_classes, owner=owner)
        )
        self.image_hw = check_pair("image_size", image_size, minimum=16, owner=owner)
        if self.image_hw[0] % 16 or self.image_hw[1] % 16:
            raise ValueError(f"{owner}: `image_size` {self.image_hw} must be a multiple of 16 "
                             "(the stem's total stride) in height and width.")
        self.channels = 3

        policy = self.dtype_policy
        self.stem = ConvStem(
            [*STEM_CHANNELS, dims[0]], 3, 2, 1, data_format=data_format, dtype=policy,
            name="conv_embedding",
        )
        fmap = (self.image_hw[0] // 16, self.image_hw[1] // 16)
        self.backbone = []
        for i, (width, stage_depth, n_heads) in enumerate(zip(dims, depths, stage_heads)):
            self.backbone.append(LeViTTransformer(
                width, fmap, stage_depth, n_heads, dim_key, dim_value, mlp_mult, dropout,
                dtype=policy, name=f"stage_{i}",
            ))
            if i < stages - 1:
                self.backbone.append(LeViTTransformer(
                    width, fmap, 1, n_heads * 2, dim_key, dim_value, dim_out=dims[i + 1],
                    downsample=True, dtype=policy, name=f"shrink_{i}",
                ))
                fmap = (math.ceil(fmap[0] / 2), math.ceil(fmap[1] / 2))
        self.head = keras.layers.Dense(num_classes, dtype=policy, name="head")
        self.distill_head = (
            keras.layers.Dense(num_distill_classes, dtype=policy, name="distill_head")
            if num_distill_classes is not None
            else None
        )

    def call(self, images, training=None):
        x = self.stem(self.check_images(images), training=training)
        x = map_to_tokens(x, self.data_format)  # (b, h/16 * w/16, dim[0])
        for transformer in self.backbone:
            x = transformer(x, training=training)
        x = ops.mean(x, axis=1)
        if self.distill_head is None:
            return self.head(x)
        return self.head(x), self.distill_head(x)

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.levit.LeViT`'s state dict."""
        names = {
            "conv_embedding": self.stem.vit_pytorch_state_map(conv="{i}"),
            "backbone": {f"{i}": t for i, t in enumerate(self.backbone)},
            "mlp_head": self.head,
        }
        if self.distill_head is not None:
            names["distill_head"] = self.distill_head
        return names
