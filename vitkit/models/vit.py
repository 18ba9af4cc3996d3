"""ViT: "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"
(Dosovitskiy et al., ICLR 2021, arXiv:2010.11929)."""

from __future__ import annotations

import keras

from vitkit.convert.mapping import Empty
from vitkit.layers import (
    ClassToken,
    LearnedPositionEmbedding,
    PatchEmbedding,
    TokenPool,
    Transformer,
)
from vitkit.layers.utils import check_choice, check_divisible, check_int, check_pair, check_rate
from vitkit.models.base import VitkitModel
from vitkit.registry import register_model

VIT_SIZES = {  # Table 1 of the paper, plus DeiT's tiny and small
    "tiny": dict(dim=192, depth=12, heads=3, mlp_dim=768),
    "small": dict(dim=384, depth=12, heads=6, mlp_dim=1536),
    "base": dict(dim=768, depth=12, heads=12, mlp_dim=3072),
    "large": dict(dim=1024, depth=24, heads=16, mlp_dim=4096),
}


# fmt: off
@register_model(
    tiny=dict(
        image_size=(24, 20), patch_size=(4, 5), num_classes=7, dim=18, depth=2, heads=3,
        dim_head=5, mlp_dim=26,
    ),
    parity=[
        dict(image_size=(24, 20), patch_size=(4, 5), num_classes=7, dim=18, depth=2, heads=3,
             dim_head=5, mlp_dim=26),
        dict(image_size=32, patch_size=8, num_classes=5, dim=24, depth=3, heads=2, mlp_dim=40,
             pool="mean", channels=1, dim_head=7, dropout=0.1, emb_dropout=0.1),
        dict(image_size=(18, 30), patch_size=(6, 10), num_classes=0, dim=12, depth=1, heads=1,
             dim_head=12, mlp_dim=9, channels=2),
    ],
    presets={
        f"vit_{size}_patch16_224": dict(image_size=224, patch_size=16, num_classes=1000, **dims)
        for size, dims in VIT_SIZES.items()
    },
    invalid=[
        (dict(pool="max"), "pool"),
        (dict(heads=0), "heads"),
        (dict(image_size=(24, 21)), "image_size"),
        (dict(patch_size=(4, 0)), "patch_size"),
        (dict(dropout=1.5), "dropout"),
        (dict(num_classes=-1), "num_classes"),
    ],
    digits=dict(image_size=16, patch_size=4, num_classes=10, dim=64, depth=4, heads=4,
                dim_head=16, mlp_dim=128, channels=1),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class ViT(VitkitModel):
    """The Vision Transformer: split the image into patches, embed each as a token, prepend a
    class token, add learned position embeddings, run a transformer encoder, classify.

    Args:
        image_size: int or (height, width). Smaller images work too, if both sides are
            divisible by the patch; they use the first rows of the position table.
        patch_size: int or (height, width); must divide `image_size`.
        num_classes: number of outputs; `0` returns the encoder's tokens `(b, n, dim)`.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads per block.
        mlp_dim: hidden width of each feed-forward block.
        pool: `"cls"` (class token) or `"mean"` (mean of all tokens).
        channels: image channels.
        dim_head: width of each attention head.
        dropout: dropout inside the transformer.
        emb_dropout: dropout on the embedded tokens.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    Example:
        >>> model = ViT(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6,
        ...             heads=16, mlp_dim=2048, dropout=0.1, emb_dropout=0.1)
        >>> model(np.zeros((1, 256, 256, 3))).shape
        (1, 1000)
    """

    min_classes = 0  # `num_classes=0`: no head, the encoder's tokens come out

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
        channels=3,
        dim_head=64,
        dropout=0.0,
        emb_dropout=0.0,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        owner = type(self).__name__
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = check_int(
            "num_classes", num_classes, minimum=self.min_classes, owner=owner
        )
        self.dim = check_int("dim", dim, owner=owner)
        self.depth = check_int("depth", depth, owner=owner)
        self.heads = check_int("heads", heads, owner=owner)
        self.mlp_dim = check_int("mlp_dim", mlp_dim, owner=owner)
        self.pool = check_choice("pool", pool, ("cls", "mean"), owner)
        self.channels = check_int("channels", channels, owner=owner)
        self.dim_head = check_int("dim_head", dim_head, owner=owner)
        self.dropout = check_rate("dropout", dropout, owner=owner)
        self.emb_dropout = check_rate("emb_dropout", emb_dropout, owner=owner)

        self.image_hw = check_pair("image_size", image_size, owner=owner)
        self.patch_hw = check_pair("patch_size", patch_size, owner=owner)
        rows, cols = check_divisible(self.image_hw, self.patch_hw, owner)
        num_cls_tokens = 1 if pool == "cls" else 0

        policy = self.dtype_policy
        self.patch_embed = PatchEmbedding(
            dim, self.patch_hw, data_format=data_format, dtype=policy, name="patch_embed"
        )
        self.cls_token = ClassToken(dtype=policy, name="cls_token") if num_cls_tokens else None
        self.pos_embedding = LearnedPositionEmbedding(
            rows * cols + num_cls_tokens, dtype=policy, name="pos_embedding"
        )
        self.embedding_dropout = keras.layers.Dropout(emb_dropout, dtype=policy)
        self.transformer = Transformer(
            dim, depth, heads, dim_head, mlp_dim, dropout, dtype=policy, name="transformer"
        )
        self.pooling = TokenPool(pool, dtype=policy, name="pool")
        self.head = (
            keras.layers.Dense(num_classes, dtype=policy, name="head") if num_classes else None
        )

    def check_spatial(self, height, width):
        self.check_patch_grid(height, width)

    def call(self, images, training=None):
        x = self.encode(self.embed(images), training=training)
        return x if self.head is None else self.classify(x)

    # The pieces of `call`, for variants that add tokens (DistillableViT) -------------------

    def embed(self, images):
        """Images -> patch tokens, class token first, positions added: `(b, [1 +] n, dim)`."""
        x = self.patch_embed(self.check_images(images))  # (b, n, dim)
        if self.cls_token is not None:
            x = self.cls_token(x)  # (b, 1 + n, dim)
        return self.pos_embedding(x)

    def encode(self, x, training=None):
        """Embedding dropout, then the transformer: `(b, m, dim) -> (b, m, dim)`."""
        x = self.embedding_dropout(x, training=training)
        return self.transformer(x, training=training)

    def classify(self, x):
        """Encoded tokens -> `(b, num_classes)`: class token or mean, then the head."""
        return self.head(self.pooling(x))

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.vit.ViT`'s state dict."""
        return {
            "to_patch_embedding": self.patch_embed.vit_pytorch_state_map(),
            # vit-pytorch keeps a (0, dim) class token when pool="mean"
            "cls_token": self.cls_token.token if self.cls_token else Empty((0, self.dim)),
            "pos_embedding": self.pos_embedding.embedding,
            "transformer": self.transformer.vit_pytorch_state_map(),
            **({"mlp_head": self.head} if self.head is not None else {}),
        }
