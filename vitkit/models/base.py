"""`VitkitModel`: what every image model shares: config, data format, input checks.
`ViTLayout`: the ViT pipeline that the plain-token variants keep and change in a part or two."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from vitkit.convert.mapping import Reshaped
from vitkit.layers import ClassToken, LearnedPositionEmbedding, PatchEmbedding, TokenPool
from vitkit.layers.attention import layer_norm
from vitkit.layers.base import ConfigMixin
from vitkit.layers.utils import (
    DATA_FORMATS,
    check_choice,
    check_divisible,
    check_pair,
    image_shape,
    integer,
    reject_unknown_kwargs,
)


class VitkitModel(ConfigMixin, keras.Model):
    """Base of every vitkit image model.

    Subclasses set `self.image_hw` (the configured `(height, width)`; `None` for a model whose
    constructor names no image size, which then overrides `default_image_hw`) and
    `self.channels` (the image channels; a model whose `channels` argument means something else
    overrides the `input_channels` property instead), and may override
    `check_spatial(height, width)` for the sizes they accept. `get_config()` returns exactly the
    constructor's arguments; unknown keyword arguments are a `TypeError`. Constructors check
    and keep their arguments with `keep_args(locals())`.
    """

    min_classes = 1  # the smallest `num_classes` the model takes

    def __init__(self, *, data_format="channels_last", **kwargs):
        reject_unknown_kwargs(type(self).__name__, kwargs)
        super().__init__(**kwargs)
        self.data_format = check_choice(
            "data_format", data_format, DATA_FORMATS, type(self).__name__
        )

    def __call__(self, *args, **kwargs):
        # The input is checked here, before Keras' `__call__`: a numpy array of strings would
        # fail inside Keras' conversion, and an error raised under `torch.compile` from within
        # Keras' call wrapper stops dynamo ("Unsupported hasattr call") instead of reaching
        # the user as our ValueError.
        if args and hasattr(args[0], "shape") and hasattr(args[0], "dtype"):
            self.check_input(args[0])
        return super().__call__(*args, **kwargs)

    def arg_rule(self, name: str):
        if name == "num_classes":
            return integer(self.min_classes)
        return super().arg_rule(name)

    def patch_grid(self) -> tuple[int, int]:
        """Check `image_size` and `patch_size` (ints or pairs; the patch must tile the image),
        keep them as `(height, width)` pairs `image_hw` and `patch_hw`, and return the patch
        grid `(rows, cols)`."""
        owner = type(self).__name__
        self.image_hw = check_pair("image_size", self.image_size, owner=owner)
        self.patch_hw = check_pair("patch_size", self.patch_size, owner=owner)
        return check_divisible(self.image_hw, self.patch_hw, owner)

    # Inputs -----------------------------------------------------------------------------

    @property
    def input_channels(self) -> int:
        """Channels of the images this model takes."""
        return self.channels

    @property
    def default_image_hw(self) -> tuple[int, int]:
        """(height, width) of the images the model is built at, exported at and fed (by the
        CLI) unless told otherwise: its configured `image_hw`."""
        return tuple(self.image_hw)

    def expected_shape(self, height="height", width="width") -> tuple:
        """The input shape as text, in this model's data format."""
        if self.data_format == "channels_last":
            return ("batch", height, width, self.input_channels)
        return ("batch", self.input_channels, height, width)

    # A model that takes several image sizes may define `accepts_side(side) -> bool` and
    # `size_rule`, that rule in words: `check_spatial` then holds height and width to it.
    size_rule: str | None = None

    def check_spatial(self, height: int, width: int) -> None:
        """Raise a ValueError if this model cannot take images of this size (static sizes only)."""
        if self.size_rule is not None:
            if not (self.accepts_side(height) and self.accepts_side(width)):
                self.bad_input(
                    f"{self.size_rule} (e.g. {tuple(self.image_hw)})", f"{height}x{width} images"
                )
        elif (height, width) != tuple(self.image_hw):
            self.bad_input(
                f"images of exactly {tuple(self.image_hw)} pixels", f"{height}x{width} images"
            )

    def check_patch_grid(self, height: int, width: int) -> None:
        """`check_spatial` of models whose learned position table is cut to the input's number
        of patches (vit-pytorch's `pos_embedding[:, :n]`): any image no larger than `image_size`
        whose sides `self.patch_hw` divides."""
        (ph, pw), (ih, iw) = self.patch_hw, self.image_hw
        if height % ph or width % pw or height > ih or width > iw:
            self.bad_input(
                f"height <= {ih} and width <= {iw}, both divisible by `patch_size` {(ph, pw)}",
                f"{height}x{width} images",
            )

    def bad_input(self, rule: str, given) -> None:
        raise ValueError(
            f"{type(self).__name__} expects inputs of shape {self.expected_shape()} "
            f"({self.data_format}) with {rule}; got {given}."
        )

    def check_input(self, images) -> None:
        """Raise a ValueError naming what is wrong with a batch of images: rank, channels,
        size or dtype (static dimensions only: it also runs while tracing under jit). Floats
        and integers (e.g. uint8 pixels) pass; booleans, complex numbers and strings do not."""
        if isinstance(images, np.ndarray) and images.dtype.kind not in "fiu":
            self.bad_input("a float or integer dtype", f"a numpy array of dtype {images.dtype}")
        dtype = keras.backend.standardize_dtype(images.dtype)
        if not dtype.startswith(("float", "int", "uint", "bfloat")):
            self.bad_input("a float or integer dtype", f"dtype {dtype}")
        shape = tuple(images.shape)
        if len(shape) != 4:
            self.bad_input("rank 4", f"an input of shape {shape} (rank {len(shape)})")
        height, width, channels = image_shape(images, self.data_format)
        if channels is not None and channels != self.input_channels:
            self.bad_input(
                f"{self.input_channels} channels", f"shape {shape} ({channels} channels)"
            )
        if height is not None and width is not None:
            self.check_spatial(height, width)

    def check_images(self, images):
        """`check_input`, then the images cast to the compute dtype."""
        self.check_input(images)
        return ops.cast(images, self.compute_dtype)

    def default_input_shape(self, batch: int = 1) -> tuple:
        """Shape of a batch of images of the configured size, in this model's data format."""
        h, w = self.default_image_hw
        if self.data_format == "channels_last":
            return (batch, h, w, self.input_channels)
        return (batch, self.input_channels, h, w)

    def build(self, input_shape):
        images = keras.KerasTensor(tuple(input_shape), dtype=self.compute_dtype)
        # Refuse a wrong input here: raised inside the symbolic pass, our message would come
        # wrapped in Keras' "Could not automatically infer the output shape".
        self.check_images(images)
        # One symbolic forward pass: every sublayer is built with the shapes it will see.
        self.compute_output_spec(images)

    def build_default(self):
        """Create the weights for images of the configured size, without computing anything
        (a symbolic pass: no per-op compiles on JAX, the meta device on torch)."""
        if not self.built:
            self.build(self.default_input_shape())
        return self


class ViTLayout(VitkitModel):
    """ViT's pipeline (Dosovitskiy et al., arXiv:2010.11929), for the models that keep it and
    change a part: images -> patch tokens -> [class token first] -> + learned positions ->
    dropout -> transformer -> class token or mean -> [LayerNorm] -> linear head.

    A subclass's constructor keeps its arguments (`keep_args(locals())`), then calls
    `make_layers(num_patches)`. It changes parts through hooks: `make_patch_embedding()`,
    `make_transformer()` (required), `position_count()`, and class attributes:
    `with_class_token` (default: when `pool="cls"`), `norm_before_head`, and `pool` and
    `emb_dropout` for models without those arguments. `call` is `embed`, `encode`, `classify`.
    """

    pool = "cls"
    emb_dropout = 0.0
    norm_before_head = False  # a LayerNorm between the pooled token and the head
    batched_reference_tables = True  # vit-pytorch stores token tables as (1, n, dim)

    @property
    def with_class_token(self) -> bool:
        return self.pool == "cls"

    def position_count(self) -> int:
        """Rows of the learned position table: one per patch, one for the class token."""
        return self.num_patches + int(self.with_class_token)

    def make_layers(self, num_patches: int) -> None:
        """Create the sublayers; `num_patches`: patch tokens of an image of `image_size`."""
        self.num_patches = num_patches
        policy = self.dtype_policy
        self.patch_embed = self.make_patch_embedding()
        self.cls_token = (
            ClassToken(dtype=policy, name="cls_token") if self.with_class_token else None
        )
        self.pos_embedding = LearnedPositionEmbedding(
            self.position_count(), dtype=policy, name="pos_embedding"
        )
        self.embedding_dropout = keras.layers.Dropout(self.emb_dropout, dtype=policy)
        self.transformer = self.make_transformer()
        self.pooling = TokenPool(self.pool, dtype=policy, name="pool")
        self.head_norm = layer_norm("head_norm", policy, self.norm_before_head)
        self.head = (
            keras.layers.Dense(self.num_classes, dtype=policy, name="head")
            if self.num_classes
            else None
        )

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
        """The encoder, `(b, n, dim) -> (b, n, dim)`."""
        raise NotImplementedError(f"{type(self).__name__} must define make_transformer()")

    def check_spatial(self, height, width):
        self.check_patch_grid(height, width)

    def call(self, images, training=None):
        x = self.encode(self.embed(images, training=training), training=training)
        return x if self.head is None else self.classify(x)

    def embed(self, images, training=None):
        """Images -> patch tokens, class token first, positions added: `(b, [1 +] n, dim)`."""
        x = self.patch_embed(self.check_images(images), training=training)  # (b, n, dim)
        if self.cls_token is not None:
            x = self.cls_token(x)  # (b, 1 + n, dim)
        return self.pos_embedding(x)

    def encode(self, x, training=None):
        """Embedding dropout, then the transformer: `(b, m, dim) -> (b, m, dim)`."""
        x = self.embedding_dropout(x, training=training)
        return self.transformer(x, training=training)

    def classify(self, x):
        """Encoded tokens -> `(b, num_classes)`: class token or mean, [LayerNorm,] the head."""
        x = self.pooling(x)
        return self.head(x if self.head_norm is None else self.head_norm(x))

    def vit_pytorch_state_map(self):
        """Our weights under vit-pytorch's names; the transformer names its own."""
        names = {
            "to_patch_embedding": self.patch_embed,
            "pos_embedding": self.reference_table(self.pos_embedding.embedding),
            "transformer": self.transformer,
        }
        if self.cls_token is not None:
            names["cls_token"] = self.reference_table(self.cls_token.token)
        return {**names, **self.head_state_map()}

    def reference_table(self, variable):
        """A class-token or position table as vit-pytorch stores it."""
        if self.batched_reference_tables:
            return Reshaped(variable, (1, *variable.shape))
        return variable

    def head_state_map(self) -> dict:
        """The head's names: vit-pytorch's `mlp_head` is the Linear, or LayerNorm and Linear."""
        if self.head is None:
            return {}
        if self.head_norm is None:
            return {"mlp_head": self.head}
        return {"mlp_head": {"0": self.head_norm, "1": self.head}}
