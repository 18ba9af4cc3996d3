"""The ViT layout that several of vit-pytorch's variants keep and change in one or two places:
DeepViT (re-attention), Parallel ViT (parallel branches) and the ViT for small datasets (shifted
patch tokens, locality self-attention). Not an architecture of its own: nothing registers it.
"""

from __future__ import annotations

import keras

from vitkit.convert.mapping import Reshaped
from vitkit.layers import ClassToken, LearnedPositionEmbedding, PatchEmbedding, TokenPool
from vitkit.layers.attention import LN_EPSILON
from vitkit.layers.utils import check_choice, check_divisible, check_int, check_pair, check_rate
from vitkit.models.base import VitkitModel
from vitkit.models.vit import ViT


class ClassicViT(VitkitModel):
    """Patch tokens, a class token always prepended, learned position embeddings, dropout, a
    transformer without a closing LayerNorm, then pooling, LayerNorm and a linear head.

    Subclasses say how images become tokens (`make_patch_embedding`) and which transformer
    runs over them (`make_transformer`); everything else, the constructor included, is here.

    Args:
        image_size: int or (height, width). Smaller images work too, if both sides are
            divisible by the patch; they use the first rows of the position table.
        patch_size: int or (height, width); must divide `image_size`.
        num_classes: number of outputs (>= 1).
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads per block.
        mlp_dim: hidden width of each feed-forward block.
        pool: `"cls"` (class token) or `"mean"` (mean of all tokens, class token included).
        channels: image channels.
        dim_head: width of each attention head.
        dropout: dropout inside the transformer.
        emb_dropout: dropout on the embedded tokens.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).
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
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
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

        policy = self.dtype_policy
        self.patch_embed = self.make_patch_embedding()
        self.cls_token = ClassToken(dtype=policy, name="cls_token")
        self.pos_embedding = LearnedPositionEmbedding(
            rows * cols + 1, dtype=policy, name="pos_embedding"
        )
        self.embedding_dropout = keras.layers.Dropout(emb_dropout, dtype=policy)
        self.transformer = self.make_transformer()
        self.pooling = TokenPool(pool, dtype=policy, name="pool")
        self.head_norm = keras.layers.LayerNormalization(
            epsilon=LN_EPSILON, dtype=policy, name="head_norm"
        )
        self.head = keras.layers.Dense(num_classes, dtype=policy, name="head")

    def make_patch_embedding(self):
        """Images -> (b, n, dim); by default LayerNorm, Linear, LayerNorm on each patch."""
        return PatchEmbedding(
            self.dim,
            self.patch_hw,
            data_format=self.data_format,
            dtype=self.dtype_policy,
            name="patch_embed",
        )

    def make_transformer(self):
        """The encoder, `(b, n, dim) -> (b, n, dim)`; subclasses use `make_stack`."""
        raise NotImplementedError(f"{type(self).__name__} must define make_transformer()")

    def make_stack(self, cls, **options):
        """A `Transformer` class `cls` with this model's sizes and dropout and no closing
        LayerNorm (the head has it); `options` add constructor arguments."""
        return cls(
            self.dim,
            self.depth,
            self.heads,
            self.dim_head,
            self.mlp_dim,
            dropout=self.dropout,
            final_norm=False,
            dtype=self.dtype_policy,
            name="transformer",
            **options,
        )

    # The same sizes as ViT: at most `image_size`, divisible by the patch.
    check_spatial = ViT.check_spatial

    def call(self, images, training=None):
        x = self.patch_embed(self.check_images(images))  # (b, n, dim)
        x = self.pos_embedding(self.cls_token(x))  # (b, 1 + n, dim)
        x = self.transformer(self.embedding_dropout(x, training=training), training=training)
        return self.head(self.head_norm(self.pooling(x)))  # (b, num_classes)

    def vit_pytorch_state_map(self):
        """Our weights under vit-pytorch's names; the transformer names its own."""
        return {
            "to_patch_embedding": self.patch_embed.vit_pytorch_state_map(),
            "cls_token": Reshaped(self.cls_token.token, (1, 1, self.dim)),
            "pos_embedding": Reshaped(
                self.pos_embedding.embedding, (1, self.pos_embedding.length, self.dim)
            ),
            "transformer": self.transformer.vit_pytorch_state_map(),
            "mlp_head": {"0": self.head_norm, "1": self.head},
        }
