"""The transformer's position-wise feed-forward block (ViT, arXiv:2010.11929, eq. 3)."""

from __future__ import annotations

import keras

from vitkit.layers.attention import layer_norm
from vitkit.layers.backend_quirks import GELU, call_sublayer
from vitkit.layers.base import VitkitLayer
from vitkit.layers.utils import optional, rate


@keras.saving.register_keras_serializable(package="vitkit")
class FeedForward(VitkitLayer):
    """`LayerNorm -> Dense(hidden_dim) -> activation -> Dropout -> Dense(dim) -> Dropout`.

    Args:
        dim: token width, in and out.
        hidden_dim: width of the hidden layer (vit-pytorch's `mlp_dim`).
        dropout: dropout after the activation and after the output projection.
        activation: any Keras activation name; `"gelu"` is the exact (erf) GELU of torch.
        norm: whether to LayerNorm the input first (pre-norm).
        output_dropout: dropout after the output projection; `None` uses `dropout`.
    """

    def __init__(
        self,
        dim,
        hidden_dim,
        dropout=0.0,
        activation="gelu",
        norm=True,
        output_dropout=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.keep_args(locals(), output_dropout=optional(rate))

        policy = self.dtype_policy
        self.norm_layer = layer_norm("norm", policy, norm)
        # "gelu" is the exact (erf) GELU, in a form every backend can also export.
        self.hidden = keras.layers.Dense(
            hidden_dim,
            activation=GELU if activation == "gelu" else activation,
            dtype=policy,
            name="hidden",
        )
        self.hidden_dropout = keras.layers.Dropout(dropout, dtype=policy)
        self.out = keras.layers.Dense(dim, dtype=policy, name="out")
        self.out_dropout = keras.layers.Dropout(
            dropout if output_dropout is None else output_dropout, dtype=policy
        )

    def build(self, input_shape):
        if self.norm_layer is not None:
            self.norm_layer.build(input_shape)
        self.hidden.build(input_shape)
        self.out.build((*input_shape[:-1], self.hidden_dim))

    def call(self, x, training=None):
        if self.norm_layer is not None:
            x = call_sublayer(self.norm_layer, x)
        x = call_sublayer(self.hidden_dropout, call_sublayer(self.hidden, x), training=training)
        return call_sublayer(self.out_dropout, call_sublayer(self.out, x), training=training)

    def vit_pytorch_state_map(self, hidden="net.1", out="net.4", norm="net.0"):
        """Our weights under vit-pytorch's names (indices inside its `nn.Sequential`)."""
        names = {hidden: self.hidden, out: self.out}
        if self.norm_layer is not None:
            names[norm] = self.norm_layer
        return names
