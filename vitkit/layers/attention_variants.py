"""Attention variants that see the attention matrix: learned mixing across heads (talking heads)
and locality self-attention (learned temperature, no attention to oneself).

Each is a small subclass of `Attention` that fills its hooks; `fusable = False` because the fused
kernel never exposes the scores.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from vitkit.layers.attention import Attention


def mix_init():
    """A fresh initializer per mixing matrix (see `embedding.token_init` for why per weight):
    a standard normal, as vit-pytorch draws them (torch.randn)."""
    return keras.initializers.RandomNormal(stddev=1.0)


def mix_heads(attn, weights):
    """`(b, h, i, j)` scores or weights, `(h, g)` matrix -> `(b, g, i, j)`: each new head is a
    learned combination of the old ones."""
    return ops.einsum("bhij,hg->bgij", attn, ops.cast(weights, attn.dtype))


@keras.saving.register_keras_serializable(package="vitkit")
class TalkingHeadsAttention(Attention):
    """Talking-heads attention (Shazeer et al. 2020, arXiv:2003.02436), as CaiT uses it
    (arXiv:2103.17239, sec. 3): a learned `(heads, heads)` mixing of the scores before the
    softmax, and another of the weights after it. Takes `Attention`'s arguments.
    """

    fusable = False

    def build(self, input_shape):
        super().build(input_shape)
        heads = (self.heads, self.heads)
        self.mix_heads_pre_attn = self.add_weight(
            shape=heads, initializer=mix_init(), name="mix_heads_pre_attn"
        )
        self.mix_heads_post_attn = self.add_weight(
            shape=heads, initializer=mix_init(), name="mix_heads_post_attn"
        )

    def transform_scores(self, scores):
        return mix_heads(scores, self.mix_heads_pre_attn)

    def transform_attention(self, attn):
        return mix_heads(attn, self.mix_heads_post_attn)

    def vit_pytorch_state_map(self, out="to_out.0"):
        return {
            **super().vit_pytorch_state_map(out=out),
            "mix_heads_pre_attn": self.mix_heads_pre_attn,
            "mix_heads_post_attn": self.mix_heads_post_attn,
        }


@keras.saving.register_keras_serializable(package="vitkit")
class LocalitySelfAttention(Attention):
    """LSA, "Vision Transformer for Small-Size Datasets" (Lee, Lee, Song 2021,
    arXiv:2112.13492, sec. 3.2): the softmax temperature is learned (stored as its log,
    starting at `dim_head ** -0.5`), and each token's score with itself is masked out, so
    attention goes to the other tokens. Takes `Attention`'s arguments.
    """

    fusable = False

    def build(self, input_shape):
        super().build(input_shape)
        self.temperature = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(math.log(self.dim_head**-0.5)),
            name="temperature",
        )

    def score_scale(self, dtype):
        return ops.cast(ops.exp(self.temperature), dtype)

    def transform_scores(self, scores):
        # The largest negative float32, as vit-pytorch's masked_fill; the softmax runs in
        # float32 anyway, so a bfloat16 score cannot overflow to -inf here.
        scores = ops.cast(scores, "float32")
        n_q, n_k = ops.shape(scores)[-2:]
        diagonal = ops.cast(ops.eye(n_q, n_k), "bool")[None, None]
        return ops.where(diagonal, float(-np.finfo("float32").max), scores)

    def vit_pytorch_state_map(self, out="to_out.0"):
        return {**super().vit_pytorch_state_map(out=out), "temperature": self.temperature}
