"""The transformer encoder: `depth` pre-norm residual blocks, then a LayerNorm."""

from __future__ import annotations

import keras

from vitkit.layers.attention import LN_EPSILON, Attention
from vitkit.layers.base import VitkitLayer
from vitkit.layers.feed_forward import FeedForward
from vitkit.layers.utils import check_int, check_rate


@keras.saving.register_keras_serializable(package="vitkit")
class Transformer(VitkitLayer):
    """`x = x + attention(x); x = x + feed_forward(x)`, `depth` times, then LayerNorm.

    Variants subclass this and override `make_attention(index)` or `make_feed_forward(index)`
    (which build block `index`) or `residual_block(index, x)` (which wires it).

    Args:
        dim, depth, heads, dim_head, mlp_dim, dropout: as in ViT.
        project_out, out_bias: passed to every `Attention`.
        final_norm: whether a LayerNorm closes the stack.
    """

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
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.depth = check_int("depth", depth, owner=owner)
        self.heads = check_int("heads", heads, owner=owner)
        self.dim_head = check_int("dim_head", dim_head, owner=owner)
        self.mlp_dim = check_int("mlp_dim", mlp_dim, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner=owner)
        self.project_out = project_out
        self.out_bias = out_bias
        self.final_norm = final_norm

        self.attentions = [self.make_attention(i) for i in range(depth)]
        self.feed_forwards = [self.make_feed_forward(i) for i in range(depth)]
        self.norm = (
            keras.layers.LayerNormalization(
                epsilon=LN_EPSILON, dtype=self.dtype_policy, name="norm"
            )
            if final_norm
            else None
        )

    def make_attention(self, index):
        return Attention(
            self.dim,
            heads=self.heads,
            dim_head=self.dim_head,
            dropout=self.dropout,
            project_out=self.project_out,
            out_bias=self.out_bias,
            dtype=self.dtype_policy,
            name=f"attention_{index}",
        )

    def make_feed_forward(self, index):
        return FeedForward(
            self.dim,
            self.mlp_dim,
            dropout=self.dropout,
            dtype=self.dtype_policy,
            name=f"feed_forward_{index}",
        )

    def build(self, input_shape):
        for attention, feed_forward in zip(self.attentions, self.feed_forwards):
            attention.build(input_shape)
            feed_forward.build(input_shape)
        if self.norm is not None:
            self.norm.build(input_shape)

    def residual_block(self, index, x, context=None, training=None):
        x = self.attentions[index](x, context=context, training=training) + x
        return self.feed_forwards[index](x, training=training) + x

    def call(self, x, context=None, training=None):
        for index in range(self.depth):
            x = self.residual_block(index, x, context=context, training=training)
        return self.norm(x) if self.norm is not None else x

    def vit_pytorch_state_map(self, attention_out="to_out.0", ff_hidden="net.1", ff_out="net.4"):
        """Our weights under the names of vit-pytorch's `Transformer` (`layers.i.0` is the
        attention of block i, `layers.i.1` its feed-forward)."""
        names = {}
        for i, (attention, feed_forward) in enumerate(zip(self.attentions, self.feed_forwards)):
            names[f"layers.{i}.0"] = attention.vit_pytorch_state_map(out=attention_out)
            names[f"layers.{i}.1"] = feed_forward.vit_pytorch_state_map(
                hidden=ff_hidden, out=ff_out
            )
        if self.norm is not None:
            names["norm"] = self.norm
        return names
