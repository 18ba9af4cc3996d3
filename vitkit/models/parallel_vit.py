"""Parallel ViT: "Three things everyone should know about Vision Transformers" (Touvron et al.,
ECCV 2022, arXiv:2203.09795), sec. 2: parallel blocks."""

from __future__ import annotations

import keras

from vitkit.layers import PatchEmbedding, Transformer
from vitkit.layers.utils import check_int, reject_unknown_kwargs
from vitkit.models.classic_vit import ClassicViT
from vitkit.registry import register_model


@keras.saving.register_keras_serializable(package="vitkit")
class ParallelTransformer(Transformer):
    """A transformer whose every block runs `num_parallel_branches` attention layers side by
    side and adds their outputs to the residual, then as many feed-forward layers the same way:
    `x = x + sum_i attention_i(x); x = x + sum_i feed_forward_i(x)`. A wider, shallower stack
    with the same number of parameters as a sequential one of `depth * branches` blocks.

    Args:
        dim, depth, heads, dim_head, mlp_dim, dropout: as in `Transformer`.
        num_parallel_branches: attention (and feed-forward) layers per block.
        final_norm: whether a LayerNorm closes the stack.
    """

    def __init__(
        self,
        dim,
        depth,
        heads,
        dim_head,
        mlp_dim,
        num_parallel_branches=2,
        dropout=0.0,
        final_norm=True,
        **kwargs,
    ):
        # Transformer's other options (layer_scale, ...) are not this stack's: a TypeError.
        reject_unknown_kwargs(type(self).__name__, kwargs)
        # Set first: the base constructor builds the blocks, which need it.
        self.num_parallel_branches = check_int(
            "num_parallel_branches", num_parallel_branches, owner=type(self).__name__
        )
        super().__init__(
            dim, depth, heads, dim_head, mlp_dim, dropout=dropout, final_norm=final_norm, **kwargs
        )

    def make_attention(self, index, **options):
        make = super().make_attention  # one layer per branch
        return [
            make(index, name=f"attention_{index}_{branch}", **options)
            for branch in range(self.num_parallel_branches)
        ]

    def make_feed_forward(self, index, **options):
        make = super().make_feed_forward
        return [
            make(index, name=f"feed_forward_{index}_{branch}", **options)
            for branch in range(self.num_parallel_branches)
        ]

    def residual_block(self, index, x, context=None, training=None):
        x = sum(a(x, context=context, training=training) for a in self.attentions[index]) + x
        return sum(f(x, training=training) for f in self.feed_forwards[index]) + x

    def vit_pytorch_state_map(self):
        """vit-pytorch's `Parallel` modules: `layers.i.0.fns.k`, `layers.i.1.fns.k`."""
        names = {}
        for i, (attentions, feed_forwards) in enumerate(zip(self.attentions, self.feed_forwards)):
            for k, (attention, feed_forward) in enumerate(zip(attentions, feed_forwards)):
                names[f"layers.{i}.0.fns.{k}"] = attention.vit_pytorch_state_map()
                names[f"layers.{i}.1.fns.{k}"] = feed_forward.vit_pytorch_state_map()
        if self.norm is not None:
            names["norm"] = self.norm
        return names


# fmt: off
@register_model(
    tiny=dict(
        image_size=(24, 20), patch_size=(4, 5), num_classes=7, dim=18, depth=2, heads=3,
        dim_head=5, mlp_dim=26,
    ),
    parity=[
        dict(image_size=(24, 20), patch_size=(4, 5), num_classes=7, dim=18, depth=2, heads=3,
             dim_head=5, mlp_dim=26),
        dict(image_size=32, patch_size=8, num_classes=5, dim=24, depth=1, heads=2, mlp_dim=40,
             pool="mean", num_parallel_branches=3, channels=1, dim_head=7, dropout=0.1,
             emb_dropout=0.1),
        dict(image_size=(18, 30), patch_size=(6, 10), num_classes=3, dim=12, depth=2, heads=1,
             dim_head=12, mlp_dim=9, num_parallel_branches=1, channels=2),
    ],
    invalid=[
        (dict(num_parallel_branches=0), "num_parallel_branches"),
        (dict(pool="max"), "pool"),
        (dict(image_size=(24, 21)), "image_size"),
        (dict(dropout=-0.1), "dropout"),
    ],
    digits=dict(image_size=8, patch_size=2, num_classes=10, dim=64, depth=2, heads=4,
                dim_head=16, mlp_dim=128, channels=1),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit", name="parallel_vit.ViT")
class ViT(ClassicViT):
    """ViT with parallel blocks (sec. 2): each block runs `num_parallel_branches` attention
    layers, then as many feed-forward layers, side by side, each group summed into the residual.
    Patches are embedded by a single linear layer; the head is LayerNorm and Linear after
    pooling.

    Args:
        num_parallel_branches: attention (and feed-forward) layers per block; the paper finds
            2 best.
        Everything else as `ClassicViT`: `image_size`, `patch_size`, `num_classes`, `dim`,
        `depth`, `heads`, `mlp_dim`, `pool="cls"`, `channels=3`, `dim_head=64`,
        `dropout=0.0`, `emb_dropout=0.0`, `data_format="channels_last"`.

    Example:
        >>> model = ViT(image_size=256, patch_size=16, num_classes=1000, dim=1024, depth=6,
        ...             heads=8, mlp_dim=2048, num_parallel_branches=2)
        >>> model(np.zeros((1, 256, 256, 3))).shape
        (1, 1000)
    """

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
        pool="cls",
        num_parallel_branches=2,
        channels=3,
        dim_head=64,
        dropout=0.0,
        emb_dropout=0.0,
        data_format="channels_last",
        **kwargs,
    ):
        # Set first: the base constructor builds the transformer, which needs it.
        self.num_parallel_branches = check_int(
            "num_parallel_branches", num_parallel_branches, owner=type(self).__name__
        )
        super().__init__(
            image_size=image_size,
            patch_size=patch_size,
            num_classes=num_classes,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_dim=mlp_dim,
            pool=pool,
            channels=channels,
            dim_head=dim_head,
            dropout=dropout,
            emb_dropout=emb_dropout,
            data_format=data_format,
            **kwargs,
        )

    def make_patch_embedding(self):
        # A single Linear on each flattened patch: no LayerNorms.
        return PatchEmbedding(
            self.dim,
            self.patch_hw,
            data_format=self.data_format,
            norm_patches=False,
            norm_tokens=False,
            dtype=self.dtype_policy,
            name="patch_embed",
        )

    def make_transformer(self):
        return self.make_stack(
            ParallelTransformer, num_parallel_branches=self.num_parallel_branches
        )

    def vit_pytorch_state_map(self):
        names = super().vit_pytorch_state_map()
        names["to_patch_embedding"] = {"1": self.patch_embed.proj}  # Rearrange, Linear
        return names
