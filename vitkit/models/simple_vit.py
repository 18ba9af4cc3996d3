"""SimpleViT: "Better plain ViT baselines for ImageNet-1k" (Beyer, Zhai, Kolesnikov, 2022,
arXiv:2205.01580)."""

from __future__ import annotations

import keras

from vitkit.layers import PatchEmbedding, SinCosPositionEmbedding2D, TokenPool, Transformer
from vitkit.layers.utils import check_divisible, check_int, check_pair
from vitkit.models.base import VitkitModel
from vitkit.models.vit import VIT_SIZES
from vitkit.registry import register_model


# fmt: off
@register_model(
    tiny=dict(
        image_size=(24, 20), patch_size=(4, 5), num_classes=7, dim=20, depth=2, heads=3,
        dim_head=6, mlp_dim=26,
    ),
    parity=[
        dict(image_size=(24, 20), patch_size=(4, 5), num_classes=7, dim=20, depth=2, heads=3,
             dim_head=6, mlp_dim=26),
        dict(image_size=32, patch_size=8, num_classes=5, dim=16, depth=3, heads=2, mlp_dim=40,
             channels=1, dim_head=7),
        dict(image_size=(30, 18), patch_size=(10, 6), num_classes=3, dim=8, depth=1, heads=1,
             dim_head=8, mlp_dim=9, channels=2),
    ],
    presets={
        f"simple_vit_{size}_patch16_224": dict(
            image_size=224, patch_size=16, num_classes=1000, **dims
        )
        for size, dims in VIT_SIZES.items()
    },
    invalid=[
        (dict(dim=18), "dim"),
        (dict(heads=0), "heads"),
        (dict(image_size=(25, 20)), "image_size"),
        (dict(num_classes=0), "num_classes"),
    ],
    digits=dict(image_size=16, patch_size=4, num_classes=10, dim=64, depth=4, heads=4,
                dim_head=16, mlp_dim=128, channels=1),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit")
class SimpleViT(VitkitModel):
    """ViT made simpler and faster to train: fixed 2-D sin-cos position embeddings instead of
    learned ones, global average pooling instead of a class token, no dropout, and bias-free
    attention projections.

    Images of any size divisible by the patch work: the sin-cos table is computed for the
    input's grid.

    Args:
        image_size: int or (height, width).
        patch_size: int or (height, width); must divide `image_size`.
        num_classes: number of outputs (>= 1).
        dim: token width; a multiple of 4 (the sin-cos table splits it in four), at least 8.
        depth: number of transformer blocks.
        heads: attention heads per block.
        mlp_dim: hidden width of each feed-forward block.
        channels: image channels.
        dim_head: width of each attention head.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    Example:
        >>> model = SimpleViT(image_size=256, patch_size=32, num_classes=1000, dim=1024,
        ...                   depth=6, heads=16, mlp_dim=2048)
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
        heads,
        mlp_dim,
        channels=3,
        dim_head=64,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(data_format=data_format, **kwargs)
        owner = type(self).__name__
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = check_int("num_classes", num_classes, owner=owner)
        self.dim = check_int("dim", dim, minimum=8, owner=owner)
        if dim % 4:
            raise ValueError(f"{owner}: `dim` must be a multiple of 4 for the sin-cos position "
                             f"embedding; got {dim}.")
        self.depth = check_int("depth", depth, owner=owner)
        self.heads = check_int("heads", heads, owner=owner)
        self.mlp_dim = check_int("mlp_dim", mlp_dim, owner=owner)
        self.channels = check_int("channels", channels, owner=owner)
        self.dim_head = check_int("dim_head", dim_head, owner=owner)

        self.image_hw = check_pair("image_size", image_size, owner=owner)
        self.patch_hw = check_pair("patch_size", patch_size, owner=owner)
        check_divisible(self.image_hw, self.patch_hw, owner)

        policy = self.dtype_policy
        self.patch_embed = PatchEmbedding(
            dim, self.patch_hw, data_format=data_format, dtype=policy, name="patch_embed"
        )
        self.pos_embedding = SinCosPositionEmbedding2D(dtype=policy, name="pos_embedding")
        self.transformer = Transformer(
            dim, depth, heads, dim_head, mlp_dim, project_out=True, out_bias=False,
            dtype=policy, name="transformer",
        )
        self.pooling = TokenPool("mean", dtype=policy, name="pool")
        self.head = keras.layers.Dense(num_classes, dtype=policy, name="head")

    def check_spatial(self, height, width):
        ph, pw = self.patch_hw
        if height % ph or width % pw:
            self.bad_input(f"height and width divisible by `patch_size` {(ph, pw)}",
                           f"{height}x{width} images")

    def call(self, images, training=None):
        images = self.check_images(images)
        x = self.patch_embed(images)  # (b, h*w, dim)
        grid = self.patch_embed.grid_size(images)
        if None in grid:  # size unknown while tracing: assume the configured one
            grid = (self.image_hw[0] // self.patch_hw[0], self.image_hw[1] // self.patch_hw[1])
        x = self.pos_embedding(x, grid_size=grid)
        x = self.transformer(x, training=training)
        return self.head(self.pooling(x))  # mean over tokens -> (b, num_classes)

    def vit_pytorch_state_map(self):
        """Our weights under the names of `vit_pytorch.simple_vit.SimpleViT`'s state dict."""
        return {
            "to_patch_embedding": self.patch_embed.vit_pytorch_state_map(),
            "transformer": self.transformer.vit_pytorch_state_map(
                attention_out="to_out", ff_out="net.3"
            ),
            "linear_head": self.head,
        }
