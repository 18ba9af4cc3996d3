"""CrossViT: "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image
Classification" (Chen, Fan, Panda, ICCV 2021, arXiv:2103.14899)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.convert import Reshaped
from vitkit.layers import (
    Attention,
    ClassToken,
    LearnedPositionEmbedding,
    PatchEmbedding,
    Transformer,
    VitkitLayer,
)
from vitkit.layers.attention import LN_EPSILON
from vitkit.layers.utils import check_divisible, check_int, check_pair, check_rate
from vitkit.models.base import VitkitModel
from vitkit.registry import register_model


@keras.saving.register_keras_serializable(package="vitkit")
class CrossViTTransformer(Transformer):
    """A branch's encoder: CrossViT's attention projects queries and keys/values separately
    (`to_q`, `to_kv`) and always has an output projection."""

    def make_attention(self, index, **options):
        return super().make_attention(index, project_out=True, separate_kv=True, **options)


@keras.saving.register_keras_serializable(package="vitkit")
class CrossAttentionBlocks(VitkitLayer):
    """Sec. 3.3, cross-attention fusion, `depth` rounds: the small branch's class token
    queries the large branch's patch tokens (and itself), then the large branch's class token
    queries the small branch's patch tokens (and itself). Each class token is projected to the
    other branch's width and back around its attention when the widths differ.

    `call(sm_tokens, lg_tokens)` takes and returns both branches' tokens, class token first.
    """

    def __init__(self, sm_dim, lg_dim, depth, heads, dim_head, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.sm_dim = check_int("sm_dim", sm_dim, owner=owner)
        self.lg_dim = check_int("lg_dim", lg_dim, owner=owner)
        self.depth = check_int("depth", depth, owner=owner)
        self.heads = check_int("heads", heads, owner=owner)
        self.dim_head = check_int("dim_head", dim_head, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner=owner)

        policy = self.dtype_policy
        project = sm_dim != lg_dim

        def dense(width, name):
            return keras.layers.Dense(width, dtype=policy, name=name) if project else None

        def attention(width, name):
            return Attention(
                width,
                heads=heads,
                dim_head=dim_head,
                dropout=dropout,
                project_out=True,
                separate_kv=True,
                dtype=policy,
                name=name,
            )

        # sm class token -> lg width -> attend to lg patches -> back to sm width; and mirrored
        self.sm_in = [dense(lg_dim, f"sm_in_{i}") for i in range(depth)]
        self.sm_attend_lg = [attention(lg_dim, f"sm_attend_lg_{i}") for i in range(depth)]
        self.sm_out = [dense(sm_dim, f"sm_out_{i}") for i in range(depth)]
        self.lg_in = [dense(sm_dim, f"lg_in_{i}") for i in range(depth)]
        self.lg_attend_sm = [attention(sm_dim, f"lg_attend_sm_{i}") for i in range(depth)]
        self.lg_out = [dense(lg_dim, f"lg_out_{i}") for i in range(depth)]

    def build(self, sm_tokens_shape, lg_tokens_shape):
        sm, lg = (None, 1, self.sm_dim), (None, 1, self.lg_dim)
        for i in range(self.depth):
            self.sm_attend_lg[i].build(lg)
            self.lg_attend_sm[i].build(sm)
            if self.sm_in[i] is not None:
                self.sm_in[i].build(sm)
                self.sm_out[i].build(lg)
                self.lg_in[i].build(lg)
                self.lg_out[i].build(sm)

    @staticmethod
    def _through(layer, x):
        return x if layer is None else layer(x)

    def call(self, sm_tokens, lg_tokens, training=None):
        sm_cls, sm_patches = sm_tokens[:, :1], sm_tokens[:, 1:]
        lg_cls, lg_patches = lg_tokens[:, :1], lg_tokens[:, 1:]
        for i in range(self.depth):
            x = self._through(self.sm_in[i], sm_cls)
            x = self.sm_attend_lg[i](x, context=lg_patches, training=training)
            sm_cls = self._through(self.sm_out[i], x) + sm_cls
            x = self._through(self.lg_in[i], lg_cls)
            x = self.lg_attend_sm[i](x, context=sm_patches, training=training)
            lg_cls = self._through(self.lg_out[i], x) + lg_cls
        return (
            ops.concatenate([sm_cls, sm_patches], axis=1),
            ops.concatenate([lg_cls, lg_patches], axis=1),
        )

    def vit_pytorch_state_map(self):
        """vit-pytorch's `CrossTransformer`: `layers.i.0` (small attends to large) and
        `layers.i.1`, each a `ProjectInOut` around an attention (`fn`)."""
        names = {}
        for i in range(self.depth):
            for j, (to, attention, back) in enumerate(
                [
                    (self.sm_in[i], self.sm_attend_lg[i], self.sm_out[i]),
                    (self.lg_in[i], self.lg_attend_sm[i], self.lg_out[i]),
                ]
            ):
                block = {"fn": attention.vit_pytorch_state_map()}
                if to is not None:
                    block.update(project_in=to, project_out=back)
                names[f"layers.{i}.{j}"] = block
        return names


@keras.saving.register_keras_serializable(package="vitkit")
class ImageEmbedder(VitkitLayer):
    """One branch's tokens: patches (LayerNorm, Dense, LayerNorm), a class token, learned
    position embeddings, dropout: `(b, h, w, c) -> (b, 1 + n, dim)`."""

    def __init__(
        self, dim, patch_size, num_patches, dropout=0.0, data_format="channels_last", **kwargs
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.patch_size = patch_size
        self.num_patches = check_int("num_patches", num_patches, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner=owner)
        self.data_format = data_format
        policy = self.dtype_policy
        self.patch_embed = PatchEmbedding(
            dim, patch_size, data_format=data_format, dtype=policy, name="patch_embed"
        )
        self.cls_token = ClassToken(dtype=policy, name="cls_token")
        self.pos_embedding = LearnedPositionEmbedding(
            num_patches + 1, dtype=policy, name="pos_embedding"
        )
        self.embedding_dropout = keras.layers.Dropout(dropout, dtype=policy)

    def call(self, images, training=None):
        x = self.cls_token(self.patch_embed(images))
        return self.embedding_dropout(self.pos_embedding(x), training=training)

    def vit_pytorch_state_map(self):
        return {
            "to_patch_embedding": self.patch_embed.vit_pytorch_state_map(),
            "cls_token": Reshaped(self.cls_token.token, (1, 1, self.dim)),
            "pos_embedding": Reshaped(
                self.pos_embedding.embedding, (1, self.num_patches + 1, self.dim)
            ),
        }


# fmt: off
@register_model(
    tiny=dict(
        image_size=(24, 16), num_classes=5, sm_dim=12, lg_dim=16, sm_patch_size=4,
        sm_enc_depth=1, sm_enc_heads=2, sm_enc_mlp_dim=20, sm_enc_dim_head=6, lg_patch_size=8,
        lg_enc_depth=1, lg_enc_heads=3, lg_enc_mlp_dim=18, lg_enc_dim_head=5,
        cross_attn_depth=1, cross_attn_heads=2, cross_attn_dim_head=7, depth=1, dropout=0.0,
        emb_dropout=0.0,
    ),
    parity=[
        dict(image_size=24, num_classes=5, sm_dim=12, lg_dim=16, sm_patch_size=4,
             sm_enc_depth=1, sm_enc_heads=2, sm_enc_mlp_dim=20, sm_enc_dim_head=6,
             lg_patch_size=8, lg_enc_depth=2, lg_enc_heads=3, lg_enc_mlp_dim=18,
             lg_enc_dim_head=5, cross_attn_depth=1, cross_attn_heads=2, cross_attn_dim_head=7,
             depth=2),
        dict(image_size=32, num_classes=3, sm_dim=16, lg_dim=16, sm_patch_size=8,
             sm_enc_depth=2, sm_enc_heads=1, sm_enc_mlp_dim=24, sm_enc_dim_head=16,
             lg_patch_size=16, lg_enc_depth=1, lg_enc_heads=2, lg_enc_mlp_dim=9,
             lg_enc_dim_head=4, cross_attn_depth=1, cross_attn_heads=3, cross_attn_dim_head=5,
             depth=1, channels=1, dropout=0.2, emb_dropout=0.3),
        dict(image_size=20, num_classes=7, sm_dim=8, lg_dim=20, sm_patch_size=5,
             sm_enc_depth=1, sm_enc_heads=2, sm_enc_mlp_dim=11, sm_enc_dim_head=3,
             lg_patch_size=10, lg_enc_depth=1, lg_enc_heads=1, lg_enc_mlp_dim=13,
             lg_enc_dim_head=20, cross_attn_depth=2, cross_attn_heads=1, cross_attn_dim_head=9,
             depth=1, channels=2),
    ],
    presets={
        # Table 1 of the paper: CrossViT-Ti, -S, -B (r = 4 feed-forward ratio, 3 stages)
        "cross_vit_tiny_240": dict(
            image_size=240, num_classes=1000, sm_dim=96, lg_dim=192, sm_patch_size=12,
            sm_enc_depth=1, sm_enc_heads=3, sm_enc_mlp_dim=384, sm_enc_dim_head=32,
            lg_patch_size=16, lg_enc_depth=4, lg_enc_heads=3, lg_enc_mlp_dim=768,
            lg_enc_dim_head=64, cross_attn_depth=1, cross_attn_heads=3, depth=3,
        ),
        "cross_vit_small_240": dict(
            image_size=240, num_classes=1000, sm_dim=192, lg_dim=384, sm_patch_size=12,
            sm_enc_depth=1, sm_enc_heads=6, sm_enc_mlp_dim=768, sm_enc_dim_head=32,
            lg_patch_size=16, lg_enc_depth=4, lg_enc_heads=6, lg_enc_mlp_dim=1536,
            lg_enc_dim_head=64, cross_attn_depth=1, cross_attn_heads=6, depth=3,
        ),
        "cross_vit_base_240": dict(
            image_size=240, num_classes=1000, sm_dim=384, lg_dim=768, sm_patch_size=12,
            sm_enc_depth=1, sm_enc_heads=12, sm_enc_mlp_dim=1536, sm_enc_dim_head=32,
            lg_patch_size=16, lg_enc_depth=4, lg_enc_heads=12, lg_enc_mlp_dim=3072,
            lg_enc_dim_head=64, cross_attn_depth=1, cross_attn_heads=12, depth=3,
        ),
    },
    invalid=[
        (dict(sm_patch_size=5), "image_size"),
        (dict(sm_patch_size=5), "sm_patch_size"),
        (dict(lg_patch_size=0), "lg_patch_size"),
        (dict(sm_dim=0), "sm_dim"),
        (dict(cross_attn_heads=0), "cross_attn_heads"),
        (dict(depth=0), "depth"),
        (dict(emb_dropout=1.0), "emb_dropout"),
        (dict(num_classes=0), "num_classes"),
    ],
    digits=dict(
        image_size=8, num_classes=10, sm_dim=32, lg_dim=64, sm_patch_size=2, sm_enc_depth=1,
        sm_enc_heads=4, sm_enc_mlp_dim=64, sm_enc_dim_head=8, lg_patch_size=4, lg_enc_depth=2,
        lg_enc_heads=4, lg_enc_mlp_dim=128, lg_enc_dim_head=16, cross_attn_depth=1,
        cross_attn_heads=4, cross_attn_dim_head=16, depth=2, channels=1,
    ),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class CrossViT(VitkitModel):
    """Two ViT branches over the same image: a small-patch branch (fine, `sm_*`) and a
    large-patch branch (coarse, `lg_*`). Each of the `depth` multi-scale blocks runs both
    branches' encoders, then fuses them by cross-attention between their class tokens: each
    class token queries the other branch's patch tokens. The logits are the sum of a
    LayerNorm + linear head on each class token.

    Args:
        image_size: int or (height, width); smaller images work if both sides stay
            divisible by both patch sizes.
        num_classes: number of outputs.
        sm_dim, lg_dim: token widths of the small- and large-patch branches.
        sm_patch_size, lg_patch_size: int or (height, width); each must divide `image_size`.
        sm_enc_depth, sm_enc_heads, sm_enc_mlp_dim, sm_enc_dim_head: the small branch's
            encoder in each block (blocks, heads, feed-forward width, head width); `lg_enc_*`
            the same for the large branch.
        cross_attn_depth: cross-attention rounds in each block.
        cross_attn_heads, cross_attn_dim_head: heads and head width of cross-attention.
        depth: number of multi-scale blocks.
        dropout: dropout inside the encoders and cross-attention.
        emb_dropout: dropout on the embedded tokens.
        channels: image channels.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    Example:
        >>> model = CrossViT(image_size=256, num_classes=1000, depth=4, sm_dim=192,
        ...                  sm_patch_size=16, sm_enc_depth=2, sm_enc_heads=8,
        ...                  sm_enc_mlp_dim=2048, lg_dim=384, lg_patch_size=64,
        ...                  lg_enc_depth=3, lg_enc_heads=8, lg_enc_mlp_dim=2048,
        ...                  cross_attn_depth=2, cross_attn_heads=8)
        >>> model(np.zeros((1, 256, 256, 3))).shape
        (1, 1000)
    """

    def __init__(
        self,
        *,
        image_size,
        num_classes,
        sm_dim,
        lg_dim,
        sm_patch_size=12,
        sm_enc_depth=1,
        sm_enc_heads=8,
        sm_enc_mlp_dim=2048,
        sm_enc_dim_head=64,
        lg_patch_size=16,
        lg_enc_depth=4,
        lg_enc_heads=8,
        lg_enc_mlp_dim=2048,
        lg_enc_dim_head=64,
        cross_attn_depth=2,
        cross_attn_heads=8,
        cross_attn_dim_head=64,
        depth=3,
        dropout=0.1,
        emb_dropout=0.1,
        channels=3,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        owner = type(self).__name__
        self.image_size = image_size
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.sm_dim = check_int("sm_dim", sm_dim, owner=owner)
        self.lg_dim = check_int("lg_dim", lg_dim, owner=owner)
        self.sm_patch_size = sm_patch_size
        self.lg_patch_size = lg_patch_size
        for branch in ("sm", "lg"):
            for part in ("depth", "heads", "mlp_dim", "dim_head"):
                arg = f"{branch}_enc_{part}"
                setattr(self, arg, check_int(arg, locals()[arg], owner=owner))
        self.cross_attn_depth = check_int("cross_attn_depth", cross_attn_depth, owner=owner)
        self.cross_attn_heads = check_int("cross_attn_heads", cross_attn_heads, owner=owner)
        self.cross_attn_dim_head = check_int(
            "cross_attn_dim_head", cross_attn_dim_head, owner=owner
        )
        self.depth = check_int("depth", depth, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner=owner)
        self.emb_dropout = check_rate("emb_dropout", emb_dropout, owner=owner)
        self.channels = check_int("channels", channels, owner=owner)

        self.image_hw = check_pair("image_size", image_size, owner=owner)
        self.patch_hws = (
            check_pair("sm_patch_size", sm_patch_size, owner=owner),
            check_pair("lg_patch_size", lg_patch_size, owner=owner),
        )
        grids = [
            check_divisible(self.image_hw, p, owner, patch_name=f"{branch}_patch_size")
            for branch, p in zip(("sm", "lg"), self.patch_hws)
        ]

        policy = self.dtype_policy
        self.sm_embedder, self.lg_embedder = (
            ImageEmbedder(
                dim, patch, rows * cols, dropout=emb_dropout, data_format=data_format,
                dtype=policy, name=f"{branch}_embedder",
            )
            for dim, patch, (rows, cols), branch in zip(
                (sm_dim, lg_dim), self.patch_hws, grids, ("sm", "lg")
            )
        )
        self.sm_encoders, self.lg_encoders, self.cross_blocks = [], [], []
        for i in range(depth):
            for branch, dim, encoders in (
                ("sm", sm_dim, self.sm_encoders),
                ("lg", lg_dim, self.lg_encoders),
            ):
                encoders.append(
                    CrossViTTransformer(
                        dim,
                        getattr(self, f"{branch}_enc_depth"),
                        getattr(self, f"{branch}_enc_heads"),
                        getattr(self, f"{branch}_enc_dim_head"),
                        getattr(self, f"{branch}_enc_mlp_dim"),
                        dropout,
                        dtype=policy,
                        name=f"{branch}_encoder_{i}",
                    )
                )
            self.cross_blocks.append(
                CrossAttentionBlocks(
                    sm_dim, lg_dim, cross_attn_depth, cross_attn_heads, cross_attn_dim_head,
                    dropout, dtype=policy, name=f"cross_attention_{i}",
                )
            )
        self.sm_head_norm, self.lg_head_norm = (
            keras.layers.LayerNormalization(epsilon=LN_EPSILON, dtype=policy, name=f"{b}_head_norm")
            for b in ("sm", "lg")
        )
        self.sm_head, self.lg_head = (
            keras.layers.Dense(num_classes, dtype=policy, name=f"{b}_head") for b in ("sm", "lg")
        )

    def check_spatial(self, height, width):
        (ih, iw) = self.image_hw
        if height > ih or width > iw or any(
            height % ph or width % pw for ph, pw in self.patch_hws
        ):
            self.bad_input(
                f"height <= {ih} and width <= {iw}, both divisible by `sm_patch_size` "
                f"{self.patch_hws[0]} and `lg_patch_size` {self.patch_hws[1]}",
                f"{height}x{width} images",
            )

    def call(self, images, training=None):
        images = self.check_images(images)
        sm = self.sm_embedder(images, training=training)  # (b, 1 + n_sm, sm_dim)
        lg = self.lg_embedder(images, training=training)  # (b, 1 + n_lg, lg_dim)
        for sm_encoder, lg_encoder, cross in zip(
            self.sm_encoders, self.lg_encoders, self.cross_blocks
        ):
            sm = sm_encoder(sm, training=training)
            lg = lg_encoder(lg, training=training)
            sm, lg = cross(sm, lg, training=training)
        sm_logits = self.sm_head(self.sm_head_norm(sm[:, 0]))
        lg_logits = self.lg_head(self.lg_head_norm(lg[:, 0]))
        return sm_logits + lg_logits

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.cross_vit.CrossViT`'s state dict."""
        encoder = {}
        for i, (sm, lg, cross) in enumerate(
            zip(self.sm_encoders, self.lg_encoders, self.cross_blocks)
        ):
            encoder[f"layers.{i}.0"] = sm.vit_pytorch_state_map()
            encoder[f"layers.{i}.1"] = lg.vit_pytorch_state_map()
            encoder[f"layers.{i}.2"] = cross
        return {
            "sm_image_embedder": self.sm_embedder,
            "lg_image_embedder": self.lg_embedder,
            "multi_scale_encoder": encoder,
            "sm_mlp_head": {"0": self.sm_head_norm, "1": self.sm_head},
            "lg_mlp_head": {"0": self.lg_head_norm, "1": self.lg_head},
        }
