"""CaiT: "Going deeper with Image Transformers" (Touvron et al., ICCV 2021, arXiv:2103.17239)."""

from __future__ import annotations

import keras

from vitkit.convert.mapping import Reshaped
from vitkit.layers import (
    ClassToken,
    LearnedPositionEmbedding,
    PatchEmbedding,
    TalkingHeadsAttention,
    Transformer,
)
from vitkit.layers.attention import LN_EPSILON
from vitkit.layers.utils import check_divisible, check_int, check_pair, check_rate
from vitkit.models.base import VitkitModel
from vitkit.models.vit import ViT
from vitkit.registry import register_model

CAIT_SIZES = {  # Table 1 of the paper: width, heads (width / 48); 2 class-attention layers
    "xxs": dict(dim=192, heads=4),
    "xs": dict(dim=288, heads=6),
    "s": dict(dim=384, heads=8),
}


@keras.saving.register_keras_serializable(package="vitkit")
class CaiTTransformer(Transformer):
    """`Transformer` with talking-heads attention whose queries and keys/values have their own
    projections, so that `call(x, context=...)` attends from `x` to `[x, context]`: the patch
    layers run without context, the class-attention layers with the patches as context."""

    attention_class = TalkingHeadsAttention

    def make_attention(self, index, **options):
        return super().make_attention(index, separate_kv=True, **options)


# fmt: off
@register_model(
    tiny=dict(
        image_size=24, patch_size=8, num_classes=7, dim=20, depth=2, cls_depth=1, heads=2,
        dim_head=6, mlp_dim=28,
    ),
    parity=[
        dict(image_size=24, patch_size=8, num_classes=7, dim=20, depth=2, cls_depth=1,
             heads=2, dim_head=6, mlp_dim=28),
        dict(image_size=32, patch_size=4, num_classes=5, dim=16, depth=3, cls_depth=2,
             heads=4, dim_head=5, mlp_dim=24, dropout=0.1, emb_dropout=0.1),
        dict(image_size=20, patch_size=5, num_classes=3, dim=12, depth=1, cls_depth=1,
             heads=1, dim_head=12, mlp_dim=9),
    ],
    presets={
        f"cait_{size}{depth}_224": dict(
            image_size=224, patch_size=16, num_classes=1000, depth=depth, cls_depth=2,
            dim_head=48, mlp_dim=4 * dims["dim"], **dims,
        )
        for size, dims in CAIT_SIZES.items()
        for depth in (24, 36)
    },
    invalid=[
        (dict(cls_depth=0), "cls_depth"),
        (dict(layer_dropout=1.0), "layer_dropout"),
        (dict(image_size=25), "image_size"),
        (dict(heads=0), "heads"),
    ],
    digits=dict(image_size=8, patch_size=2, num_classes=10, dim=64, depth=4, cls_depth=2,
                heads=4, dim_head=16, mlp_dim=128),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class CaiT(VitkitModel):
    """Class-attention in image transformers. Two changes let ViTs go deeper (sec. 3):

    - LayerScale: each residual branch is multiplied by a learned per-channel gain that
      starts small, and every attention uses talking heads (learned mixing across heads
      before and after the softmax);
    - class attention: the patches attend to each other for `depth` layers without a class
      token; then `cls_depth` layers update only a class token, which attends to itself and
      to the (fixed) patch tokens. Its final state, LayerNormed, goes to a linear head.

    `layer_dropout` drops whole layers at random in training (at least one stays), as
    vit-pytorch does; at inference every layer runs (vit-pytorch keeps dropping them in
    `eval()` too; we do not).

    Args:
        image_size: int or (height, width). Smaller images work too, if both sides are
            divisible by the patch; they use the first rows of the position table.
        patch_size: int or (height, width); must divide `image_size`.
        num_classes: number of outputs (>= 1).
        dim: token width.
        depth: patch-attention layers.
        cls_depth: class-attention layers.
        heads: attention heads per layer.
        mlp_dim: hidden width of each feed-forward block.
        dim_head: width of each attention head.
        dropout: dropout inside the transformers.
        emb_dropout: dropout on the embedded patches.
        layer_dropout: probability of dropping each layer in training.
        data_format: `"channels_last"` (b, h, w, 3) or `"channels_first"` (b, 3, h, w).

    Images have 3 channels (vit-pytorch's CaiT takes no `channels`). vit-pytorch takes
    square images only; here `image_size` and `patch_size` may be `(height, width)` pairs.

    Example:
        >>> model = CaiT(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=12,
        ...              cls_depth=2, heads=16, mlp_dim=2048, layer_dropout=0.05)
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
        cls_depth,
        heads,
        mlp_dim,
        dim_head=64,
        dropout=0.0,
        emb_dropout=0.0,
        layer_dropout=0.0,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        owner = type(self).__name__
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.dim = check_int("dim", dim, owner=owner)
        self.depth = check_int("depth", depth, owner=owner)
        self.cls_depth = check_int("cls_depth", cls_depth, owner=owner)
        self.heads = check_int("heads", heads, owner=owner)
        self.mlp_dim = check_int("mlp_dim", mlp_dim, owner=owner)
        self.dim_head = check_int("dim_head", dim_head, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner=owner)
        self.emb_dropout = check_rate("emb_dropout", emb_dropout, owner=owner)
        self.layer_dropout = check_rate("layer_dropout", layer_dropout, owner=owner)
        self.channels = 3

        self.image_hw = check_pair("image_size", image_size, owner=owner)
        self.patch_hw = check_pair("patch_size", patch_size, owner=owner)
        rows, cols = check_divisible(self.image_hw, self.patch_hw, owner)

        policy = self.dtype_policy
        self.patch_embed = PatchEmbedding(
            dim, self.patch_hw, data_format=data_format, dtype=policy, name="patch_embed"
        )
        self.pos_embedding = LearnedPositionEmbedding(rows * cols, dtype=policy, name="pos")
        self.embedding_dropout = keras.layers.Dropout(emb_dropout, dtype=policy)

        def stack(layers, name):  # LayerScale, talking heads, layer dropout; no closing norm
            return CaiTTransformer(
                dim,
                layers,
                heads,
                dim_head,
                mlp_dim,
                dropout=dropout,
                project_out=True,
                final_norm=False,
                layer_scale=True,
                layer_dropout=layer_dropout,
                dtype=policy,
                name=name,
            )

        self.patch_transformer = stack(depth, "patch_transformer")
        self.cls_transformer = stack(cls_depth, "cls_transformer")
        self.cls_token = ClassToken(dtype=policy, name="cls_token")
        self.head_norm = keras.layers.LayerNormalization(
            epsilon=LN_EPSILON, dtype=policy, name="head_norm"
        )
        self.head = keras.layers.Dense(num_classes, dtype=policy, name="head")

    # The same sizes as ViT: at most `image_size`, divisible by the patch.
    check_spatial = ViT.check_spatial

    def call(self, images, training=None):
        x = self.patch_embed(self.check_images(images))  # (b, n, dim)
        x = self.embedding_dropout(self.pos_embedding(x), training=training)
        x = self.patch_transformer(x, training=training)  # patches attend to patches
        cls = self.cls_token(x[:, :0])  # the class token alone: (b, 1, dim)
        cls = self.cls_transformer(cls, context=x, training=training)  # cls attends to all
        return self.head(self.head_norm(cls[:, 0]))  # (b, num_classes)

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.cait.CaiT`'s state dict."""
        return {
            "to_patch_embedding": self.patch_embed.vit_pytorch_state_map(),
            "pos_embedding": Reshaped(
                self.pos_embedding.embedding, (1, self.pos_embedding.length, self.dim)
            ),
            "cls_token": Reshaped(self.cls_token.token, (1, 1, self.dim)),
            "patch_transformer": self.patch_transformer.vit_pytorch_state_map(),
            "cls_transformer": self.cls_transformer.vit_pytorch_state_map(),
            "mlp_head": {"0": self.head_norm, "1": self.head},
        }
