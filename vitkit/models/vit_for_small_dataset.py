"""ViT for small datasets: "Vision Transformer for Small-Size Datasets" (Lee, Lee, Song, 2021,
arXiv:2112.13492): shifted patch tokenization (SPT) and locality self-attention (LSA)."""

from __future__ import annotations

import keras
from keras import ops

from vitkit.layers import LocalitySelfAttention, PatchEmbedding, Transformer, VitkitLayer
from vitkit.layers.utils import (
    DATA_FORMATS,
    check_choice,
    check_int,
    check_pair,
    to_channels_last,
    zero_pad,
)
from vitkit.models.classic_vit import ClassicViT
from vitkit.registry import register_model


def shifted_copies(images):
    """Channels-last images and four copies shifted by one pixel, right, left, down and up
    (zeros fill the gap), stacked on the channel axis in vit-pytorch's order:
    `(b, h, w, c) -> (b, h, w, 5 c)`."""

    return ops.concatenate(
        [
            images,
            zero_pad(images[:, :, :-1], axis=2, before=1),  # shifted right
            zero_pad(images[:, :, 1:], axis=2, after=1),  # shifted left
            zero_pad(images[:, :-1], axis=1, before=1),  # shifted down
            zero_pad(images[:, 1:], axis=1, after=1),  # shifted up
        ],
        axis=-1,
    )


@keras.saving.register_keras_serializable(package="vitkit")
class SPT(VitkitLayer):
    """Shifted patch tokenization (sec. 3.1): the image and four copies shifted by one pixel
    (right, left, down, up) are stacked on the channel axis, so each patch also sees a rim of
    its neighbours; then patches are cut, flattened, LayerNormed and projected.

    `(b, h, w, channels) -> (b, (h / p) * (w / p), dim)`. Usable on its own.

    Args:
        dim: token width.
        patch_size: int or (height, width); must divide the image.
        channels: image channels.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).

    Example:
        >>> spt = SPT(dim=1024, patch_size=16, channels=3)
        >>> spt(np.zeros((4, 256, 256, 3))).shape
        (4, 256, 1024)
    """

    def __init__(self, *, dim, patch_size, channels=3, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.patch_size = patch_size
        self.channels = check_int("channels", channels, owner=owner)
        self.data_format = check_choice("data_format", data_format, DATA_FORMATS, owner)
        self.patch_hw = check_pair("patch_size", patch_size, owner=owner)
        # LayerNorm over each flattened patch of the 5 stacked images, then Linear
        self.to_patch_tokens = PatchEmbedding(
            dim, self.patch_hw, norm_tokens=False, dtype=self.dtype_policy, name="to_patch_tokens"
        )

    def build(self, input_shape):
        channels = input_shape[-1] if self.data_format == "channels_last" else input_shape[1]
        if channels is not None and channels != self.channels:
            raise ValueError(
                f"SPT expects images with `channels`={self.channels} channels "
                f"({self.data_format}); got shape {tuple(input_shape)}."
            )
        self.to_patch_tokens.build((None, None, None, 5 * self.channels))

    def call(self, images):
        images = to_channels_last(images, self.data_format)
        return self.to_patch_tokens(shifted_copies(images))

    def vit_pytorch_state_map(self):
        """vit-pytorch's `to_patch_tokens`: Rearrange, LayerNorm, Linear."""
        return {"to_patch_tokens": self.to_patch_tokens.vit_pytorch_state_map()}


@keras.saving.register_keras_serializable(package="vitkit")
class LSATransformer(Transformer):
    """`Transformer` whose blocks use locality self-attention."""

    attention_class = LocalitySelfAttention


# fmt: off
@register_model(
    tiny=dict(
        image_size=(24, 16), patch_size=4, num_classes=7, dim=18, depth=2, heads=3,
        dim_head=5, mlp_dim=26,
    ),
    parity=[
        dict(image_size=(24, 16), patch_size=4, num_classes=7, dim=18, depth=2, heads=3,
             dim_head=5, mlp_dim=26),
        dict(image_size=32, patch_size=8, num_classes=5, dim=24, depth=3, heads=2, mlp_dim=40,
             pool="mean", channels=1, dim_head=7, dropout=0.1, emb_dropout=0.1),
        dict(image_size=(15, 25), patch_size=5, num_classes=3, dim=12, depth=1, heads=1,
             dim_head=12, mlp_dim=9, channels=2),
    ],
    invalid=[
        (dict(pool="max"), "pool"),
        (dict(dim_head=0), "dim_head"),
        (dict(image_size=(24, 18)), "image_size"),
        (dict(channels=0), "channels"),
    ],
    digits=dict(image_size=8, patch_size=2, num_classes=10, dim=64, depth=4, heads=4,
                dim_head=16, mlp_dim=128, channels=1),
)
# fmt: on
@keras.saving.register_keras_serializable(package="vitkit", name="vit_for_small_dataset.ViT")
class ViT(ClassicViT):
    """ViT with shifted patch tokens (`SPT`) and locality self-attention (sec. 3): each
    attention layer learns its softmax temperature and masks out each token's attention to
    itself. Both give ViTs a locality bias that helps when data are few. The head is LayerNorm
    and Linear after pooling.

    Takes `ClassicViT`'s arguments: `image_size`, `patch_size`, `num_classes`, `dim`, `depth`,
    `heads`, `mlp_dim`, `pool="cls"`, `channels=3`, `dim_head=64`, `dropout=0.0`,
    `emb_dropout=0.0`, `data_format="channels_last"`. vit-pytorch's SPT takes square patches
    only; here `patch_size` may also be a `(height, width)` pair.

    Example:
        >>> model = ViT(image_size=256, patch_size=16, num_classes=1000, dim=1024, depth=6,
        ...             heads=16, mlp_dim=2048, dropout=0.1, emb_dropout=0.1)
        >>> model(np.zeros((1, 256, 256, 3))).shape
        (1, 1000)
    """

    def make_patch_embedding(self):
        return SPT(
            dim=self.dim,
            patch_size=self.patch_hw,
            channels=self.channels,
            data_format=self.data_format,
            dtype=self.dtype_policy,
            name="patch_embed",
        )

    def make_transformer(self):
        return self.make_stack(LSATransformer, project_out=True)
