"""ViT with a Patch Merger: "Learning to Merge Tokens in Vision Transformers" (Renggli et al.,
2022, arXiv:2202.12015)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.layers import Transformer, VitkitLayer
from vitkit.layers.attention import layer_norm
from vitkit.layers.backend_quirks import softmax
from vitkit.layers.utils import check_int, integer, optional
from vitkit.models.base import ViTLayout
from vitkit.registry import register_model


@keras.saving.register_keras_serializable(package="vitkit")
class PatchMerger(VitkitLayer):
    """Merges any number of tokens into `num_tokens_out` (the paper's section 3).

    `(b, n, dim) -> (b, num_tokens_out, dim)`: each of `num_tokens_out` learned queries takes
    a softmax-weighted mean of the LayerNormed tokens, with weights `softmax(q x^T / sqrt(dim))`.
    Works alone on any sequence of `dim`-wide tokens.

    Args:
        dim: token width.
        num_tokens_out: how many tokens come out.

    Example:
        >>> merger = PatchMerger(dim=1024, num_tokens_out=8)
        >>> merger(np.zeros((4, 256, 1024))).shape
        (4, 8, 1024)
    """

    def __init__(self, dim, num_tokens_out, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.num_tokens_out = check_int("num_tokens_out", num_tokens_out, owner=owner)
        self.scale = dim**-0.5
        self.norm_layer = layer_norm("norm", self.dtype_policy)

    def build(self, input_shape):
        if input_shape[-1] != self.dim:
            raise ValueError(
                f"{self.name}: tokens must be `dim` = {self.dim} wide; got shape {input_shape}."
            )
        self.norm_layer.build(input_shape)
        # vit-pytorch draws the queries from N(0, 1): with the 1/sqrt(dim) scale, the merge
        # starts out as a soft, not a uniform, average.
        self.queries = self.add_weight(
            shape=(self.num_tokens_out, self.dim),
            initializer=keras.initializers.RandomNormal(stddev=1.0),
            name="queries",
        )

    def call(self, x):
        x = self.norm_layer(x)
        queries = ops.cast(self.queries, x.dtype)
        scores = ops.einsum("md,bnd->bmn", queries, x) * ops.cast(self.scale, x.dtype)
        weights = ops.cast(softmax(ops.cast(scores, "float32"), axis=-1), x.dtype)
        return ops.einsum("bmn,bnd->bmd", weights, x)  # (b, num_tokens_out, dim)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_tokens_out, input_shape[-1])

    def vit_pytorch_state_map(self):
        return {"norm": self.norm_layer, "queries": self.queries}


@keras.saving.register_keras_serializable(package="vitkit")
class PatchMergerTransformer(Transformer):
    """The ViT encoder with a `PatchMerger` after block `patch_merge_layer` (1-based)."""

    def __init__(
        self,
        dim,
        depth,
        heads,
        dim_head,
        mlp_dim,
        dropout=0.0,
        patch_merge_layer=None,
        patch_merge_num_tokens=8,
        **kwargs,
    ):
        super().__init__(dim, depth, heads, dim_head, mlp_dim, dropout, **kwargs)
        self.patch_merge_layer = patch_merge_layer
        self.patch_merge_num_tokens = patch_merge_num_tokens
        # vit-pytorch's default merges half-way, as the paper does; with depth 1 that is
        # after block 0, which never comes: the merger is then unused.
        self.merge_after = (depth // 2 if patch_merge_layer is None else patch_merge_layer) - 1
        self.patch_merger = PatchMerger(
            dim, patch_merge_num_tokens, dtype=self.dtype_policy, name="patch_merger"
        )

    def build(self, input_shape):
        super().build(input_shape)
        self.patch_merger.build(input_shape)

    def residual_block(self, index, x, context=None, training=None):
        x = super().residual_block(index, x, context=context, training=training)
        return self.patch_merger(x) if index == self.merge_after else x

    def vit_pytorch_state_map(self, **names):
        return {
            **super().vit_pytorch_state_map(**names),
            "patch_merger": self.patch_merger.vit_pytorch_state_map(),
        }


# fmt: off
@register_model(
    tiny=dict(
        image_size=(24, 20), patch_size=(4, 5), num_classes=7, dim=18, depth=3, heads=3,
        dim_head=5, mlp_dim=26, patch_merge_layer=2, patch_merge_num_tokens=6,
    ),
    parity=[
        dict(image_size=(24, 20), patch_size=(4, 5), num_classes=7, dim=18, depth=3, heads=3,
             dim_head=5, mlp_dim=26, patch_merge_layer=2, patch_merge_num_tokens=6),
        dict(image_size=32, patch_size=8, num_classes=5, dim=24, depth=4, heads=2, mlp_dim=40,
             channels=1, dim_head=7, dropout=0.1, emb_dropout=0.1),
        dict(image_size=(18, 30), patch_size=(6, 10), num_classes=3, dim=12, depth=2, heads=1,
             dim_head=12, mlp_dim=9, channels=2, patch_merge_layer=1, patch_merge_num_tokens=11),
    ],
    invalid=[
        (dict(patch_merge_layer=0), "patch_merge_layer"),
        (dict(patch_merge_layer=4), "patch_merge_layer"),
        (dict(patch_merge_num_tokens=0), "patch_merge_num_tokens"),
        (dict(image_size=(24, 21)), "image_size"),
        (dict(heads=0), "heads"),
        (dict(emb_dropout=-0.1), "emb_dropout"),
    ],
    digits=dict(image_size=8, patch_size=2, num_classes=10, dim=64, depth=4, heads=4,
                dim_head=16, mlp_dim=128, channels=1, patch_merge_layer=2,
                patch_merge_num_tokens=4),
)
# fmt: on
# vit-pytorch has many `ViT`s: the package tells Keras which one this is.
@keras.saving.register_keras_serializable(package="vitkit.vit_with_patch_merger")
class ViT(ViTLayout):
    """ViT whose encoder merges its tokens into a few half-way through: after block
    `patch_merge_layer`, a `PatchMerger` turns the `n` patch tokens into
    `patch_merge_num_tokens`, so later blocks cost less. No class token: the encoded tokens are
    averaged for the head.

    Args:
        patch_merge_layer: the block (1 to `depth`) after which tokens are merged; `None`
            means `depth // 2` (with `depth=1`: no merge, as in vit-pytorch).
        patch_merge_num_tokens: tokens after the merge.
        Everything else as `vitkit.models.vit.ViT` (no `pool`: the tokens are averaged;
        `num_classes` >= 1): `image_size`, `patch_size`, `num_classes`, `dim`, `depth`,
        `heads`, `mlp_dim`, `channels=3`, `dim_head=64`, `dropout=0.0`, `emb_dropout=0.0`,
        `data_format="channels_last"`.

    Example:
        >>> v = ViT(image_size=256, patch_size=16, num_classes=1000, dim=1024, depth=12,
        ...         heads=8, patch_merge_layer=6, patch_merge_num_tokens=8, mlp_dim=2048)
        >>> v(np.zeros((4, 256, 256, 3))).shape
        (4, 1000)
    """

    pool = "mean"  # no class token: the merged tokens are averaged

    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes,
        dim,
        depth,
        heads,
        mlp_dim,
        patch_merge_layer=None,
        patch_merge_num_tokens=8,
        channels=3,
        dim_head=64,
        dropout=0.0,
        emb_dropout=0.0,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        self.keep_args(
            locals(), patch_merge_layer=optional(integer()), patch_merge_num_tokens=integer()
        )
        if patch_merge_layer is not None and patch_merge_layer > depth:
            raise ValueError(
                f"{type(self).__name__}: `patch_merge_layer` must be a block of the "
                f"transformer, 1 to `depth` = {depth}; got {patch_merge_layer}."
            )
        rows, cols = self.patch_grid()
        self.make_layers(rows * cols)

    def position_count(self):
        # vit-pytorch's table has a row for a class token this model does not have.
        return self.num_patches + 1

    def make_transformer(self):
        return PatchMergerTransformer(
            self.dim, self.depth, self.heads, self.dim_head, self.mlp_dim, self.dropout,
            self.patch_merge_layer, self.patch_merge_num_tokens, dtype=self.dtype_policy,
            name="transformer",
        )  # fmt: skip

    def head_state_map(self):
        return {"mlp_head.1": self.head}  # after vit-pytorch's Reduce (mean)
