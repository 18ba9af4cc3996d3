"""`VitkitModel`: what every image model shares: config, data format, input checks."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from vitkit.layers.base import ConfigMixin
from vitkit.layers.utils import DATA_FORMATS, check_choice, image_shape, reject_unknown_kwargs


class VitkitModel(ConfigMixin, keras.Model):
    """Base of every vitkit image model.

    Subclasses set `self.image_hw` (the configured `(height, width)`) and `self.channels` (the
    image channels; a model whose `channels` argument means something else overrides the
    `input_channels` property instead), and may override `check_spatial(height, width)` for the
    sizes they accept. `get_config()` returns
    exactly the constructor's arguments; unknown keyword arguments are a `TypeError`.
    """

    def __init__(self, *, data_format="channels_last", **kwargs):
        reject_unknown_kwargs(type(self).__name__, kwargs)
        super().__init__(**kwargs)
        self.data_format = check_choice(
            "data_format", data_format, DATA_FORMATS, type(self).__name__
        )

    # Inputs -----------------------------------------------------------------------------

    @property
    def input_channels(self) -> int:
        """Channels of the images this model takes."""
        return self.channels

    def expected_shape(self, height="height", width="width") -> tuple:
        """The input shape as text, in this model's data format."""
        if self.data_format == "channels_last":
            return ("batch", height, width, self.input_channels)
        return ("batch", self.input_channels, height, width)

    def check_spatial(self, height: int, width: int) -> None:
        """Raise a ValueError if this model cannot take images of this size (static sizes only)."""
        if (height, width) != tuple(self.image_hw):
            self.bad_input(f"images of exactly {tuple(self.image_hw)} pixels", (height, width))

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

    def check_images(self, images):
        """Validate a batch of images against this model (every static dimension is checked,
        also while tracing under jit) and cast it to the compute dtype."""
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
        return ops.cast(images, self.compute_dtype)

    def default_input_shape(self, batch: int = 1) -> tuple:
        """Shape of a batch of images of the configured size, in this model's data format."""
        h, w = self.image_hw
        if self.data_format == "channels_last":
            return (batch, h, w, self.input_channels)
        return (batch, self.input_channels, h, w)

    def build(self, input_shape):
        # One symbolic forward pass: every sublayer is built with the shapes it will see.
        self.compute_output_spec(keras.KerasTensor(tuple(input_shape), dtype=self.compute_dtype))

    def build_default(self):
        """Create the weights by running one batch of zeros of the configured size."""
        if not self.built:
            self(np.zeros(self.default_input_shape(), dtype="float32"))
        return self
