"""DeepViT: "DeepViT: Towards Deeper Vision Transformer" (Zhou et al., 2021, arXiv:2103.11886)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.layers import Attention, Transformer, mix_heads
from vitkit.layers.attention import LN_EPSILON
from vitkit.models.classic_vit import ClassicViT
from vitkit.registry import register_model


@keras.saving.register_keras_serializable(package="vitkit")
class ReAttention(Attention):
    """Re-attention (sec. 4.2): after the softmax, a learned `(heads, heads)` matrix mixes the
    heads' attention maps, and a LayerNorm across the heads renormalizes them, so deep layers
    stop producing the same map. Takes `Attention`'s arguments.
    """

    fusable = False

    def build(self, input_shape):
        super().build(input_shape)
        self.reattn_weights = self.add_weight(
            shape=(self.heads, self.heads),
            initializer=keras.initializers.RandomNormal(stddev=1.0),
            name="reattn_weights",
        )
        # Made here, not in __init__: ReAttention keeps Attention's constructor (and config).
        self.reattn_norm = keras.layers.LayerNormalization(
            epsilon=LN_EPSILON, dtype=self.dtype_policy, name="reattn_norm"
        )
        self.reattn_norm.build((None, None, None, self.heads))

    def transform_attention(self, attn):
        attn = mix_heads(attn, self.reattn_weights)  # (b, h, i, j)
        # LayerNorm over the heads: moved last (Keras' torch backend normalizes the last axis
        # whatever `axis` says)
        attn = self.reattn_norm(ops.transpose(attn, (0, 2, 3, 1)))  # (b, i, j, h)
        return ops.transpose(attn, (0, 3, 1, 2))

    def vit_pytorch_state_map(self, out="to_out.0"):
        return {
            **super().vit_pytorch_state_map(out=out),
            "reattn_weights": self.reattn_weights,
            "reattn_norm.1": self.reattn_norm,  # between two Rearranges in vit-pytorch
        }


@keras.saving.register_keras_serializable(package="vitkit")
class ReAttentionTransformer(Transformer):
    """`Transformer` whose blocks use `ReAttention`."""

    attention_class = ReAttention


# fmt: off
@register_model(
    tiny=dict(
        image_size=24, patch_size=4, num_classes=7, dim=18, depth=2, heads=3, dim_head=5,
        mlp_dim=26,
    ),
    parity=[
        dict(image_size=24, patch_size=4, num_classes=7, dim=18, depth=2, heads=3, dim_head=5,
             mlp_dim=26),
        dict(image_size=32, patch_size=8, num_classes=5, dim=24, depth=3, heads=2, mlp_dim=40,
             pool="mean", channels=1, dim_head=7, dropout=0.1, emb_dropout=0.1),
        dict(image_size=30, patch_size=10, num_classes=3, dim=12, depth=1, heads=1,
             dim_head=12, mlp_dim=9, channels=2),
    ],
    invalid=[
        (dict(pool="max"), "pool"),
        (dict(heads=0), "heads"),
        (dict(image_size=25), "image_size"),
        (dict(num_classes=0), "num_classes"),
        (dict(emb_dropout=1.0), "emb_dropout"),
    ],
    digits=dict(image_size=8, patch_size=2, num_classes=10, dim=64, depth=4, heads=4,
                dim_head=16, mlp_dim=128, channels=1),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class DeepViT(ClassicViT):
    """ViT with re-attention in every block, so that attention maps keep changing with depth
    (sec. 4). Otherwise vit-pytorch's classic layout: a class token always, learned positions,
    LayerNorm and a linear head after pooling.

    Takes `ClassicViT`'s arguments: `image_size`, `patch_size`, `num_classes`, `dim`, `depth`,
    `heads`, `mlp_dim`, `pool="cls"`, `channels=3`, `dim_head=64`, `dropout=0.0`,
    `emb_dropout=0.0`, `data_format="channels_last"`. vit-pytorch takes square images only;
    here `image_size` and `patch_size` may also be `(height, width)` pairs.

    Example:
        >>> model = DeepViT(image_size=256, patch_size=32, num_classes=1000, dim=1024,
        ...                 depth=6, heads=16, mlp_dim=2048, dropout=0.1, emb_dropout=0.1)
        >>> model(np.zeros((1, 256, 256, 3))).shape
        (1, 1000)
    """

    def make_transformer(self):
        return self.make_stack(ReAttentionTransformer, project_out=True)
