"""The transformer encoder: `depth` pre-norm residual blocks, then a LayerNorm."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.convert.mapping import Reshaped
from vitkit.layers.attention import Attention, layer_norm
from vitkit.layers.backend_quirks import call_sublayer, stored_gradient
from vitkit.layers.base import VitkitLayer
from vitkit.layers.feed_forward import FeedForward
from vitkit.layers.layer_scale import LayerScale, layer_scale_init


@keras.saving.register_keras_serializable(package="vitkit")
class Transformer(VitkitLayer):
    """`x = x + attention(x); x = x + feed_forward(x)`, `depth` times, then LayerNorm.

    Variants subclass this: set `attention_class` (an `Attention` subclass), or override
    `make_attention(index)` or `make_feed_forward(index)` (which build block `index`; either
    may return a list of layers if `residual_block` and `build` expect it) or
    `residual_block(index, x)` (which wires it).

    Args:
        dim, depth, heads, dim_head, mlp_dim, dropout: as in ViT.
        project_out, out_bias: passed to every `Attention`.
        final_norm: whether a LayerNorm closes the stack.
        layer_scale: scale each residual branch by a learned per-channel gain (CaiT's
            LayerScale), starting at `layer_scale_init(index + 1)` as vit-pytorch does.
        layer_dropout: in training only, drop each whole block (attention and feed-forward)
            with this probability, keeping at least one (CaiT in vit-pytorch). Every block
            still runs (no data-dependent shapes); a dropped one leaves `x` unchanged.
    """

    attention_class = Attention

    def __init__(
        self,
        dim,
        depth,
        heads,
        dim_head,
        mlp_dim,
        dropout=0.0,
        project_out=None,
        out_bias=True,
        final_norm=True,
        layer_scale=False,
        layer_dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.keep_args(locals())

        self.attentions = [self.make_attention(i) for i in range(depth)]
        self.feed_forwards = [self.make_feed_forward(i) for i in range(depth)]
        self.branch_scales = (
            [
                [
                    LayerScale(layer_scale_init(i + 1), dtype=self.dtype_policy, name=name)
                    for name in (f"attention_scale_{i}", f"feed_forward_scale_{i}")
                ]
                for i in range(depth)
            ]
            if layer_scale
            else None
        )
        self.seed_generator = keras.random.SeedGenerator() if self.layer_dropout else None
        self.norm = layer_norm("norm", self.dtype_policy, final_norm)

    def make_attention(self, index, **options):
        """Block `index`'s attention: `attention_class` with this stack's sizes; `options`
        add or replace constructor arguments."""
        args = dict(
            heads=self.heads,
            dim_head=self.dim_head,
            dropout=self.dropout,
            project_out=self.project_out,
            out_bias=self.out_bias,
            dtype=self.dtype_policy,
            name=f"attention_{index}",
        )
        return self.attention_class(self.dim, **{**args, **options})

    def make_feed_forward(self, index, **options):
        """Block `index`'s feed-forward; `options` add or replace constructor arguments."""
        args = dict(dropout=self.dropout, dtype=self.dtype_policy, name=f"feed_forward_{index}")
        return FeedForward(self.dim, self.mlp_dim, **{**args, **options})

    def build(self, input_shape):
        # Blocks may be lists of layers (parallel branches): build every one of them.
        for layer in keras.tree.flatten([self.attentions, self.feed_forwards]):
            layer.build(input_shape)
        for scale in keras.tree.flatten(self.branch_scales or []):
            scale.build(input_shape)
        if self.norm is not None:
            self.norm.build(input_shape)

    def scale_branch(self, index, branch, y):
        """LayerScale on residual branch `branch` (0 attention, 1 feed-forward) of block
        `index`, if this stack has it."""
        return y if self.branch_scales is None else self.branch_scales[index][branch](y)

    def residual_block(self, index, x, context=None, training=None):
        y = call_sublayer(self.attentions[index], x, context=context, training=training)
        x = self.scale_branch(index, 0, y) + x
        y = call_sublayer(self.feed_forwards[index], x, training=training)
        return self.scale_branch(index, 1, y) + x

    def kept_blocks(self, training=None):
        """A `(depth,)` boolean mask of the blocks this forward pass keeps, or None for all.

        Each block is dropped with probability `layer_dropout`; if all are, one chosen
        uniformly at random comes back (vit-pytorch's `dropout_layers`)."""
        if not (training and self.layer_dropout):
            return None
        dropped = keras.random.uniform((self.depth,), seed=self.seed_generator)
        dropped = dropped < self.layer_dropout
        rescued = keras.random.randint((), 0, self.depth, seed=self.seed_generator)
        rescued = ops.equal(ops.arange(self.depth), rescued)
        return ops.logical_or(ops.logical_not(dropped), ops.logical_and(ops.all(dropped), rescued))

    def call(self, x, context=None, training=None):
        kept = self.kept_blocks(training)
        for index in range(self.depth):
            # each block's input gradient computed once (see `stored_gradient`)
            x = stored_gradient(x)
            y = self.residual_block(index, x, context=context, training=training)
            x = y if kept is None else ops.where(kept[index], y, x)
        return call_sublayer(self.norm, x) if self.norm is not None else x

    def vit_pytorch_state_map(self, attention_out="to_out.0", ff_hidden="net.1", ff_out="net.4"):
        """Our weights under the names of vit-pytorch's `Transformer` (`layers.i.0` is the
        attention of block i, `layers.i.1` its feed-forward)."""
        names = {}
        for i, (attention, feed_forward) in enumerate(zip(self.attentions, self.feed_forwards)):
            names[f"layers.{i}.0"] = attention.vit_pytorch_state_map(out=attention_out)
            names[f"layers.{i}.1"] = feed_forward.vit_pytorch_state_map(
                hidden=ff_hidden, out=ff_out
            )
            if self.branch_scales is not None:  # vit-pytorch's LayerScale(fn): scale, fn.*
                for branch, scale in enumerate(self.branch_scales[i]):
                    key = f"layers.{i}.{branch}"
                    names[key] = {
                        "scale": Reshaped(scale.gain, (1, 1, self.dim)),
                        "fn": names[key],
                    }
        if self.norm is not None:
            names["norm"] = self.norm
        return names
