"""ViT: "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"
(Dosovitskiy et al., ICLR 2021, arXiv:2010.11929)."""

from __future__ import annotations

import keras

from vitkit.convert.mapping import Empty
from vitkit.layers import Transformer
from vitkit.models.base import ViTLayout
from vitkit.registry import register_model

VIT_SIZES = {  # Table 1 of the paper, plus DeiT's tiny and small
    "tiny": dict(dim=192, depth=12, heads=3, mlp_dim=768),
    "small": dict(dim=384, depth=12, heads=6, mlp_dim=1536),
    "base": dict(dim=768, depth=12, heads=12, mlp_dim=3072),
    "large": dict(dim=1024, depth=24, heads=16, mlp_dim=4096),
}


# Test configurations; `DistillableViT`, which takes the same arguments, is checked on them too.
# fmt: off
VIT_TINY = dict(
    image_size=(24, 20), patch_size=(4, 5), num_classes=7, dim=18, depth=2, heads=3, dim_head=5,
    mlp_dim=26,
)
VIT_PARITY = [
    VIT_TINY,
    dict(image_size=32, patch_size=8, num_classes=5, dim=24, depth=3, heads=2, mlp_dim=40,
         pool="mean", channels=1, dim_head=7, dropout=0.1, emb_dropout=0.1),
    dict(image_size=(18, 30), patch_size=(6, 10), num_classes=0, dim=12, depth=1, heads=1,
         dim_head=12, mlp_dim=9, channels=2),
]


@register_model(
    tiny=VIT_TINY,
    parity=VIT_PARITY,
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
class ViT(ViTLayout):
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
    batched_reference_tables = False  # vit-pytorch's `vit.ViT` keeps (n, dim) tables

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
        self.keep_args(locals())
        rows, cols = self.patch_grid()
        self.make_layers(rows * cols)

    def make_transformer(self):
        return Transformer(
            self.dim,
            self.depth,
            self.heads,
            self.dim_head,
            self.mlp_dim,
            self.dropout,
            dtype=self.dtype_policy,
            name="transformer",
        )

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.vit.ViT`'s state dict."""
        names = super().vit_pytorch_state_map()
        if self.cls_token is None:  # vit-pytorch keeps a (0, dim) class token when pool="mean"
            names["cls_token"] = Empty((0, self.dim))
        return names
