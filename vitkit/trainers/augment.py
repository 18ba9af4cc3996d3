"""Image augmentations that Keras 3 lacks, written with `keras.ops` so they run inside a compiled
train step (JAX `jit`, `tf.function`, torch) on a whole batch, each image drawn on its own.

- `RandomResizedCrop`: torchvision's crop of random area and aspect ratio, resized to a fixed
  size, for self-supervised views (DINO's local and global crops).
- `RandomApply`: a layer applied to each image with some probability (torchvision's
  `RandomApply`, drawn per image rather than per batch).
"""

from __future__ import annotations

import math

import keras
from keras import ops

from vitkit.layers.base import VitkitLayer
from vitkit.layers.utils import DATA_FORMATS, check_choice, check_pair

__all__ = ["RandomApply", "RandomResizedCrop", "check_range"]


def check_range(name: str, value, low: float, high: float, owner: str = "") -> tuple:
    """A pair `(min, max)` of numbers with `low < min <= max <= high`."""
    where = f"{owner}: " if owner else ""
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not low < value[0] <= value[1] <= high:
        raise ValueError(
            f"{where}`{name}` must be a pair (min, max) with {low} < min <= max <= {high}; "
            f"got {value!r}."
        )
    return (float(value[0]), float(value[1]))


def check_seed(name: str, value, owner: str = ""):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        where = f"{owner}: " if owner else ""
        raise ValueError(f"{where}`{name}` must be None or an integer; got {value!r}.")
    return value


def interpolation_matrix(start, length, size: int, out: int):
    """Bilinear resampling along one axis as a matrix: `(b, out, size)`, row `i` of sample `k`
    holding the weights of the input pixels at output pixel `i` of the window
    `[start[k], start[k] + length[k])` (pixel edges; pixel `j` covers `[j, j + 1)`), sampled at
    the output pixels' centres. Positions past the border take the border pixel."""
    centres = (ops.arange(out, dtype="float32") + 0.5) / out  # (out,) in (0, 1)
    position = start[:, None] + centres[None, :] * length[:, None] - 0.5  # (b, out)
    position = ops.clip(position, 0.0, float(size - 1))
    pixels = ops.arange(size, dtype="float32")
    return ops.relu(1.0 - ops.abs(position[:, :, None] - pixels[None, None, :]))


@keras.saving.register_keras_serializable(package="vitkit")
class RandomResizedCrop(VitkitLayer):
    """Crop each image to a random window and resize it to `size` (bilinear).

    In training, each image gets its own window: an area of `scale` times the image's (drawn
    uniformly from `scale`), an aspect ratio `width / height` drawn log-uniformly from `ratio`,
    shrunk to fit the image if it is too wide or too tall, at a uniform random position. Out of
    training, the window is the whole image: the layer is a bilinear resize (half-pixel centres,
    no antialiasing), the identity when the image already has `size`.

    torchvision's `RandomResizedCrop` draws integer windows and retries a few times when one
    does not fit; here windows are continuous (sub-pixel) and clipped, so the layer has static
    shapes and no loops. The resampling is two small matrix products per image.

    Args:
        size: output `(height, width)`, or an int for a square.
        scale: `(min, max)` fraction of the image's area that the window covers, in (0, 1].
        ratio: `(min, max)` aspect ratio (width / height) of the window, > 0.
        data_format: `"channels_last"` (b, h, w, c) or `"channels_first"` (b, c, h, w).
        seed: seed of the random windows, or None.
    """

    def __init__(
        self,
        size,
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        data_format="channels_last",
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        check_pair("size", size, owner=owner)
        self.size = size
        self.scale = check_range("scale", scale, 0.0, 1.0, owner)
        self.ratio = check_range("ratio", ratio, 0.0, math.inf, owner)
        self.data_format = check_choice("data_format", data_format, DATA_FORMATS, owner)
        self.seed = check_seed("seed", seed, owner)
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")

    @property
    def output_hw(self) -> tuple[int, int]:
        return check_pair("size", self.size)

    def _spatial_axes(self) -> tuple[int, int]:
        return (1, 2) if self.data_format == "channels_last" else (2, 3)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for axis, side in zip(self._spatial_axes(), self.output_hw):
            shape[axis] = side
        return tuple(shape)

    def windows(self, batch, height: int, width: int, training: bool):
        """`(top, left, window height, window width)`, each `(batch,)`, in pixels."""
        if not training:
            zeros = ops.zeros((batch,), "float32")
            return zeros, zeros, zeros + float(height), zeros + float(width)
        seed = self.seed_generator
        area = keras.random.uniform((batch,), *self.scale, seed=seed) * float(height * width)
        log_ratio = keras.random.uniform(
            (batch,), math.log(self.ratio[0]), math.log(self.ratio[1]), seed=seed
        )
        ratio = ops.exp(log_ratio)
        crop_w = ops.minimum(ops.sqrt(area * ratio), float(width))
        crop_h = ops.minimum(ops.sqrt(area / ratio), float(height))
        top = keras.random.uniform((batch,), seed=seed) * (float(height) - crop_h)
        left = keras.random.uniform((batch,), seed=seed) * (float(width) - crop_w)
        return top, left, crop_h, crop_w

    def call(self, images, training=None):
        h_axis, w_axis = self._spatial_axes()
        height, width = images.shape[h_axis], images.shape[w_axis]
        if height is None or width is None:
            raise ValueError(
                f"{type(self).__name__} needs images of static height and width; got shape "
                f"{tuple(images.shape)}."
            )
        out_h, out_w = self.output_hw
        top, left, crop_h, crop_w = self.windows(
            ops.shape(images)[0], height, width, bool(training)
        )
        rows = ops.cast(interpolation_matrix(top, crop_h, height, out_h), images.dtype)
        cols = ops.cast(interpolation_matrix(left, crop_w, width, out_w), images.dtype)
        if self.data_format == "channels_last":
            x = ops.einsum("bih,bhwc->biwc", rows, images)  # (b, out_h, w, c)
            return ops.einsum("bjw,biwc->bijc", cols, x)  # (b, out_h, out_w, c)
        x = ops.einsum("bih,bchw->bciw", rows, images)
        return ops.einsum("bjw,bciw->bcij", cols, x)


@keras.saving.register_keras_serializable(package="vitkit")
class RandomApply(VitkitLayer):
    """`layer` applied to each image of a batch with probability `rate` (drawn per image; the
    rest pass unchanged). Out of training the images pass unchanged.

    Args:
        layer: a Keras layer mapping a batch to a batch of the same shape.
        rate: probability in [0, 1] of applying it to an image.
        seed: seed of the draws, or None.
    """

    layer_arguments = ("layer",)

    def __init__(self, layer, rate=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(f"{owner}: `layer` must be a Keras layer; got {layer!r}.")
        ok = isinstance(rate, (int, float)) and not isinstance(rate, bool)
        if not ok or not 0 <= rate <= 1:
            raise ValueError(f"{owner}: `rate` must be a number in [0, 1]; got {rate!r}.")
        self.layer = layer
        self.rate = float(rate)
        self.seed = check_seed("seed", seed, owner)
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def call(self, images, training=None):
        if not training:
            return images
        # A copy in: some Keras layers change their input in place on torch (3.15's
        # RandomBrightness does `images += delta`), which would change the images kept here.
        changed = self.layer(ops.copy(images), training=True)
        draw = keras.random.uniform((ops.shape(images)[0],), seed=self.seed_generator)
        apply = ops.reshape(draw < self.rate, (-1,) + (1,) * (len(images.shape) - 1))
        return ops.where(apply, ops.cast(changed, images.dtype), images)
