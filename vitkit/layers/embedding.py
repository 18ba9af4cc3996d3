"""From pixels to tokens: patch embedding, class token, position embeddings, token pooling."""

from __future__ import annotations

import math

import keras
from keras import ops

from vitkit.layers.attention import layer_norm
from vitkit.layers.backend_quirks import call_sublayer
from vitkit.layers.base import VitkitLayer
from vitkit.layers.utils import (
    DATA_FORMATS,
    check_choice,
    check_int,
    check_pair,
    image_shape,
    patchify,
)


def token_init():
    """A fresh initializer for learned tokens and position tables, made per weight: one made at
    import takes its seed before `keras.utils.set_random_seed` runs, so models would not repeat
    across processes, and every weight of one shape would start from the same values."""
    return keras.initializers.TruncatedNormal(stddev=0.02)


@keras.saving.register_keras_serializable(package="vitkit")
class PatchEmbedding(VitkitLayer):
    """Images -> one token per non-overlapping patch (ViT, arXiv:2010.11929, eq. 1).

    `(b, h*p1, w*p2, c) -> patches (b, h*w, p1*p2*c) -> [LayerNorm] -> Dense(dim) -> [LayerNorm]`.
    Rectangular images and patches both work; tokens come out in row-major grid order.

    Args:
        dim: token width.
        patch_size: int or (height, width).
        data_format: layout of the images, `"channels_last"` or `"channels_first"`.
        norm_patches: LayerNorm the raw patch vectors before the projection.
        norm_tokens: LayerNorm the tokens after the projection.
    """

    def __init__(
        self,
        dim,
        patch_size,
        data_format="channels_last",
        norm_patches=True,
        norm_tokens=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_int("dim", dim, owner=owner)
        self.patch_size = patch_size
        self.data_format = check_choice("data_format", data_format, DATA_FORMATS, owner)
        self.norm_patches = norm_patches
        self.norm_tokens = norm_tokens
        self.patch_hw = check_pair("patch_size", patch_size, owner=owner)

        policy = self.dtype_policy
        self.patch_norm = layer_norm("patch_norm", policy, norm_patches)
        self.proj = keras.layers.Dense(dim, dtype=policy, name="proj")
        self.token_norm = layer_norm("token_norm", policy, norm_tokens)

    def build(self, input_shape):
        channels = input_shape[-1] if self.data_format == "channels_last" else input_shape[1]
        patch_dim = self.patch_hw[0] * self.patch_hw[1] * channels
        if self.patch_norm is not None:
            self.patch_norm.build((None, None, patch_dim))
        self.proj.build((None, None, patch_dim))
        if self.token_norm is not None:
            self.token_norm.build((None, None, self.dim))

    def grid_size(self, images) -> tuple:
        """(rows, cols) of the patch grid for a batch of images."""
        h, w, _ = image_shape(images, self.data_format)
        return (h // self.patch_hw[0], w // self.patch_hw[1])

    def patchify(self, images):
        """Images -> raw patch vectors `(b, n, p1*p2*c)`, in (p1 p2 c) order."""
        return patchify(images, self.patch_hw, self.data_format)

    def embed_patches(self, patches):
        """Raw patch vectors `(b, n, p1*p2*c)` -> tokens `(b, n, dim)` (the masked-image
        trainers edit the patches in between)."""
        if self.patch_norm is not None:
            patches = call_sublayer(self.patch_norm, patches)
        x = call_sublayer(self.proj, patches)
        return call_sublayer(self.token_norm, x) if self.token_norm is not None else x

    def call(self, images):
        return self.embed_patches(self.patchify(images))

    def vit_pytorch_state_map(self):
        """vit-pytorch's `to_patch_embedding`: Rearrange, LayerNorm, Linear, LayerNorm."""
        names = {"2": self.proj}
        if self.patch_norm is not None:
            names["1"] = self.patch_norm
        if self.token_norm is not None:
            names["3"] = self.token_norm
        return names


@keras.saving.register_keras_serializable(package="vitkit")
class ClassToken(VitkitLayer):
    """Prepends `num_tokens` learned tokens to a sequence: `(b, n, d) -> (b, num_tokens + n, d)`."""

    def __init__(self, num_tokens=1, **kwargs):
        super().__init__(**kwargs)
        self.num_tokens = check_int("num_tokens", num_tokens, owner=type(self).__name__)

    def build(self, input_shape):
        self.token = self.add_weight(
            shape=(self.num_tokens, input_shape[-1]), initializer=token_init(), name="token"
        )

    def call(self, x):
        batch = ops.shape(x)[0]
        tokens = ops.cast(self.token, x.dtype)
        tokens = ops.broadcast_to(tokens[None], (batch, self.num_tokens, ops.shape(x)[-1]))
        return ops.concatenate([tokens, x], axis=1)


@keras.saving.register_keras_serializable(package="vitkit")
class LearnedPositionEmbedding(VitkitLayer):
    """Adds a learned embedding per position: `x + table[:n]` for a sequence of length n.

    A sequence shorter than `length` uses the first rows of the table, as vit-pytorch does for
    images smaller than `image_size`; a longer one is a ValueError.
    """

    def __init__(self, length, **kwargs):
        super().__init__(**kwargs)
        self.length = check_int("length", length, owner=type(self).__name__)

    def build(self, input_shape):
        self.embedding = self.add_weight(
            shape=(self.length, input_shape[-1]), initializer=token_init(), name="embedding"
        )

    def call(self, x):
        n = x.shape[1]
        if n is not None and n > self.length:
            raise ValueError(
                f"{self.name}: a sequence of {n} tokens is longer than the {self.length} "
                "positions this embedding was built for (is the image larger than `image_size`?)."
            )
        table = self.embedding if n == self.length else self.embedding[: ops.shape(x)[1]]
        return x + ops.cast(table, x.dtype)[None]


def sincos_2d_table(height: int, width: int, dim: int, temperature: float = 10000.0):
    """Fixed 2-D sin-cos position table `(height * width, dim)`, row-major (Beyer et al. 2022,
    "Better plain ViT baselines", arXiv:2205.01580): a quarter of the channels each for
    sin(x), cos(x), sin(y), cos(y) at geometrically spaced frequencies.

    Built from `keras.ops`, so it traces under jit and torch.compile (constant-folded there).
    """
    if dim % 4 or dim < 8:
        raise ValueError(f"`dim` must be a multiple of 4 and at least 8 for sin-cos; got {dim}.")
    quarter = dim // 4
    omega = ops.arange(quarter, dtype="float32") / (quarter - 1)
    omega = ops.exp(-math.log(temperature) * omega)  # 1 / temperature**omega
    y, x = ops.meshgrid(
        ops.arange(height, dtype="float32"), ops.arange(width, dtype="float32"), indexing="ij"
    )
    y = ops.reshape(y, (-1, 1)) * omega[None, :]
    x = ops.reshape(x, (-1, 1)) * omega[None, :]
    return ops.concatenate([ops.sin(x), ops.cos(x), ops.sin(y), ops.cos(y)], axis=1)


@keras.saving.register_keras_serializable(package="vitkit")
class SinCosPositionEmbedding2D(VitkitLayer):
    """Adds the fixed 2-D sin-cos table of the token grid: `(b, h*w, d) -> (b, h*w, d)`.

    The table is computed for whatever grid the call names, so any image size works.
    """

    def __init__(self, temperature=10000.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature

    def call(self, x, grid_size):
        table = sincos_2d_table(grid_size[0], grid_size[1], x.shape[-1], self.temperature)
        return x + ops.cast(table, x.dtype)[None]


@keras.saving.register_keras_serializable(package="vitkit")
class TokenPool(VitkitLayer):
    """`(b, n, d) -> (b, d)`: the first (class) token for `"cls"`, the mean for `"mean"`."""

    def __init__(self, pool="cls", **kwargs):
        super().__init__(**kwargs)
        self.pool = check_choice("pool", pool, ("cls", "mean"), type(self).__name__)

    def call(self, x):
        return x[:, 0] if self.pool == "cls" else ops.mean(x, axis=1)
