"""Multi-head self-attention, pre-norm (Vaswani et al. 2017, arXiv:1706.03762; as used by ViT,
Dosovitskiy et al. 2021, arXiv:2010.11929, eq. 2-3)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.layers.backend_quirks import call_sublayer, dot_product_attention, softmax
from vitkit.layers.base import VitkitLayer
from vitkit.layers.utils import integer, optional, rate

LN_EPSILON = 1e-5  # torch.nn.LayerNorm's default, so numbers match vit-pytorch
# Score of a masked key: vit-pytorch fills with -finfo(float32).max, so a row with every key
# masked comes out uniform there and here.
MASKED_SCORE = -3.4028234663852886e38


def layer_norm(name: str, dtype, enabled: bool = True):
    """torch's `nn.LayerNorm` (epsilon 1e-5) as a Keras layer; None when not `enabled`."""
    if not enabled:
        return None
    return keras.layers.LayerNormalization(epsilon=LN_EPSILON, dtype=dtype, name=name)


@keras.saving.register_keras_serializable(package="vitkit")
class Attention(VitkitLayer):
    """Pre-norm multi-head attention over tokens `(batch, n, dim)`.

    `LayerNorm -> one projection to q, k, v -> softmax(q k^T / sqrt(dim_head)) v -> output
    projection`. The product goes through `keras.ops.dot_product_attention`, so each backend
    runs its fused kernel. Variants that must see the attention matrix set `fusable = False`
    and override `transform_scores` (before the softmax), `transform_attention` (after it and
    its dropout) or `score_scale` (the factor on `q k^T`); dropout on the attention weights
    also takes that explicit path, in training only. `vitkit.layers.attention_variants` holds
    the variants more than one paper uses.

    `call(x, key_mask=...)` takes a key-padding mask `(b, n_k)`, True where a token may be
    attended to (vit-pytorch's `masked_fill` with `-finfo.max` on the scores): for sequences
    padded to a static length, as ATS makes them. (Not Keras' implicit `mask`: nothing
    propagates it.)

    With `separate_kv=True` the queries and the keys/values have their own projections
    (`to_q`, `to_kv`), and `call(x, context=...)` attends from `x` to `[x, context]`: the keys
    and values come from the normed `x` followed by the (un-normed) `context` tokens, as in
    CaiT's class attention and CrossViT's cross attention.

    `call(x, bias=...)` adds an attention bias (relative or dynamic position biases),
    broadcastable to `(b, heads, n_q, n_k)`, to the scaled scores before the softmax; the
    fused kernel takes it too. Subclasses may build their projections differently (a strided
    convolution for the keys and values, say) by overriding `make_projection`.

    Args:
        dim: token width.
        heads: number of attention heads.
        dim_head: width of each head; the inner width is `heads * dim_head`.
        dropout: dropout on the attention weights and on the output projection.
        project_out: whether to project heads back to `dim`; `None` projects unless
            `heads == 1 and dim_head == dim` (vit-pytorch's rule).
        out_bias: whether the output projection has a bias.
        qkv_bias: whether the q, k, v projection has a bias.
        norm: whether to LayerNorm the input first (pre-norm).
        separate_kv: separate query and key/value projections; required for `context`.
        attention_dropout: dropout on the attention weights alone, if it differs from
            `dropout`; `None` uses `dropout`.
        dim_value: width of each value head (Keras' `value_dim`); `None` is `dim_head`.
        output_dropout: dropout on the output projection alone, if it differs from `dropout`;
            `None` uses `dropout`.

    Subclasses with other projections (convolutional, batch-normed, ...) override
    `make_projection(name, units)` (one Dense layer by default), or `make_projections` and
    `build_projections` (which create and build `to_qkv`, or `to_q` and `to_kv`) together
    with `queries_keys_values`.
    """

    fusable = True

    def __init__(
        self,
        dim,
        heads=8,
        dim_head=64,
        dropout=0.0,
        project_out=None,
        out_bias=True,
        qkv_bias=False,
        norm=True,
        separate_kv=False,
        attention_dropout=None,
        dim_value=None,
        output_dropout=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.keep_args(
            locals(),
            attention_dropout=optional(rate),
            dim_value=optional(integer()),
            output_dropout=optional(rate),
        )
        attention_rate = self.dropout if attention_dropout is None else self.attention_dropout

        self.inner_dim = heads * dim_head  # queries and keys
        self.value_dim_head = dim_head if dim_value is None else dim_value
        self.value_dim = heads * self.value_dim_head
        self.scale = dim_head**-0.5
        self.projects_out = (
            not (heads == 1 and self.value_dim == dim) if project_out is None else bool(project_out)
        )
        policy = self.dtype_policy
        self.norm_layer = layer_norm("norm", policy, norm)
        self.make_projections()
        self.attn_dropout = keras.layers.Dropout(attention_rate, dtype=policy)
        self.to_out = (
            keras.layers.Dense(dim, use_bias=out_bias, dtype=policy, name="to_out")
            if self.projects_out
            else None
        )
        self.out_dropout = keras.layers.Dropout(
            dropout if output_dropout is None else output_dropout, dtype=policy
        )

    def make_projection(self, name, units):
        """The layer that computes `name` (`"to_qkv"`, `"to_q"` or `"to_kv"`) with `units`
        outputs: a Dense layer; variants may return a convolution."""
        return keras.layers.Dense(units, use_bias=self.qkv_bias, dtype=self.dtype_policy, name=name)

    def make_projections(self):
        """Create the input projections: `to_qkv`, or `to_q` and `to_kv`."""
        if self.separate_kv:
            self.to_q = self.make_projection("to_q", self.inner_dim)
            self.to_kv = self.make_projection("to_kv", self.inner_dim + self.value_dim)
        else:
            self.to_qkv = self.make_projection("to_qkv", 2 * self.inner_dim + self.value_dim)

    def build_projections(self, input_shape):
        if self.separate_kv:
            self.to_q.build(input_shape)
            self.to_kv.build(input_shape)
        else:
            self.to_qkv.build(input_shape)

    def build(self, input_shape):
        if self.norm_layer is not None:
            self.norm_layer.build(input_shape)
        self.build_projections(input_shape)
        if self.to_out is not None:
            self.to_out.build((*input_shape[:-1], self.value_dim))

    # The pieces, in the paper's order ------------------------------------------------------

    def split_heads(self, x, parts, dim_head=None):
        """(b, n, parts * h * d) -> `parts` tensors (b, n, h, d), dot_product_attention's layout.

        Unstacked rather than indexed part by part: the gradient of an unstack is one stack,
        where each indexed part's is a zero tensor of the whole with the part written in,
        added up (TensorFlow without XLA: ViT-S/16's training step at batch 8 on a 2-core AMD
        CPU spent 178 of its 766 ms in those `StridedSliceGrad`s, and took 889 -> 694-761 ms
        unstacked; JAX, TensorFlow with XLA and torch, which fuse or view the parts, the same
        within the machine's noise)."""
        d = self.dim_head if dim_head is None else dim_head
        x = ops.reshape(x, (-1, ops.shape(x)[1], parts, self.heads, d))
        return list(ops.unstack(x, num=parts, axis=2))

    def split_with_values(self, x, parts):
        """(b, n, (parts - 1) * h * d + h * d_v) -> `parts` tensors (b, n, h, .): queries
        and/or keys first, values last (their heads may be `dim_value` wide)."""
        if self.value_dim == self.inner_dim:
            return self.split_heads(x, parts)
        cut = (parts - 1) * self.inner_dim
        return [
            *self.split_heads(x[..., :cut], parts - 1),
            *self.split_heads(x[..., cut:], 1, self.value_dim_head),
        ]

    def queries_keys_values(self, x, context=None):
        """Normed tokens (and context) -> q (b, n, h, d), k and v (b, m, h, d)."""
        if not self.separate_kv:
            if context is not None:
                raise ValueError(f"{self.name}: `context` needs `separate_kv=True`.")
            return self.split_with_values(call_sublayer(self.to_qkv, x), 3)
        source = x if context is None else ops.concatenate([x, context], axis=1)
        (q,) = self.split_heads(call_sublayer(self.to_q, x), 1)
        k, v = self.split_with_values(call_sublayer(self.to_kv, source), 2)
        return q, k, v

    def transform_scores(self, scores):
        """Hook on the scaled scores `(b, h, n_q, n_k)` before the softmax."""
        return scores

    def transform_attention(self, attn):
        """Hook on the attention weights `(b, h, n_q, n_k)` after the softmax and its dropout."""
        return attn

    def score_scale(self, dtype):
        """The factor on `q k^T`: `dim_head ** -0.5` (LSA learns it instead)."""
        return ops.cast(self.scale, dtype)

    def attention_weights(self, q, k, bias=None, training=None, key_mask=None):
        """softmax(q k^T * scale + bias) with the hooks applied: `(b, h, n_q, n_k)`. Keys
        where the `(b, n_k)` `key_mask` is False get a weight of zero.

        Dropout acts on the softmax's output, before `transform_attention`, as in every
        vit-pytorch variant that post-processes the weights (DeepViT, CaiT, ATS)."""
        scores = ops.einsum("bqhd,bkhd->bhqk", q, k) * self.score_scale(q.dtype)
        if bias is not None:
            scores = scores + ops.cast(bias, scores.dtype)
        scores = self.transform_scores(scores)
        # Softmax in float32 under mixed precision, as keras.layers.MultiHeadAttention does.
        scores = ops.cast(scores, "float32")
        if key_mask is not None:
            scores = ops.where(key_mask[:, None, None, :], scores, MASKED_SCORE)
        attn = ops.cast(softmax(scores, axis=-1), q.dtype)
        attn = call_sublayer(self.attn_dropout, attn, training=training)
        return self.transform_attention(attn)

    def attend(self, q, k, v, bias=None, training=None, key_mask=None):
        """(b, n, h, d) queries, keys, values -> (b, n, h, d_v); `bias` broadcastable to
        `(b, h, n_q, n_k)` is added to the scaled scores, `key_mask` (b, n_k) as in `call`."""
        # JAX's fused kernel wants values as wide as keys.
        fused = self.fusable and self.value_dim == self.inner_dim
        if fused and not (training and self.attn_dropout.rate > 0):
            if bias is not None:
                bias = ops.cast(bias, q.dtype)
                while len(bias.shape) < 4:  # the kernels want (b, h, n_q, n_k), 1s broadcast
                    bias = bias[None]
            return dot_product_attention(
                q,
                k,
                v,
                bias=bias,
                mask=None if key_mask is None else key_mask[:, None, None, :],
                scale=self.scale,
            )
        attn = self.attention_weights(q, k, bias=bias, training=training, key_mask=key_mask)
        return ops.einsum("bhqk,bkhd->bqhd", attn, v)

    def project(self, out, training=None):
        """(b, n, h, d) -> (b, n, dim)."""
        shape = ops.shape(out)
        out = ops.reshape(out, (-1, shape[1], self.value_dim))
        if self.to_out is None:
            return out
        return call_sublayer(self.out_dropout, call_sublayer(self.to_out, out), training=training)

    def call(self, x, context=None, bias=None, training=None, key_mask=None):
        if self.norm_layer is not None:
            x = call_sublayer(self.norm_layer, x)
        q, k, v = self.queries_keys_values(x, context)
        out = self.attend(q, k, v, bias=bias, training=training, key_mask=key_mask)
        return self.project(out, training=training)

    def vit_pytorch_state_map(self, out="to_out.0"):
        """Our weights under vit-pytorch's names (`out`: where its output Linear sits)."""
        if self.separate_kv:
            names = {"to_q": self.to_q, "to_kv": self.to_kv}
        else:
            names = {"to_qkv": self.to_qkv}
        if self.norm_layer is not None:
            names["norm"] = self.norm_layer
        if self.to_out is not None:
            names[out] = self.to_out
        return names
