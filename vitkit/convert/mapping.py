"""How a vit-pytorch state dict maps onto a vitkit model's weights.

Every model declares `vit_pytorch_state_map()`: a nested dict from vit-pytorch module names to
our layers, variables, or further dicts (a block whose weights are exactly one inner layer's may
return that layer instead of a dict). `flatten` turns that into one entry per state-dict key
with the shape the reference stores and the transform into our layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import keras
import numpy as np


@dataclass(frozen=True)
class Empty:
    """A reference key that holds an empty tensor of `shape` and has no counterpart here
    (vit-pytorch's `(0, dim)` class token when `pool="mean"`)."""

    shape: tuple


@dataclass(frozen=True)
class Ignored:
    """A reference key of `shape` whose value cannot change any output, so nothing here holds
    it: e.g. the output bias of CrossFormer's dynamic position bias, one constant added to
    every score that a softmax then cancels (it has no gradient either)."""

    shape: tuple


@dataclass(frozen=True)
class Reshaped:
    """A variable the reference stores in another shape with the same elements, e.g. a
    channel LayerNorm's gain kept as `(1, C, 1, 1)` where ours is `(C,)`."""

    variable: object
    shape: tuple


@dataclass(frozen=True)
class Transformed:
    """A variable the reference stores as `shape` in another layout: `to_keras(array)` turns
    the reference's array into ours (e.g. PiT's `Unfold` + `Linear` patch projection, which
    is our `Conv2D` kernel)."""

    variable: object
    shape: tuple
    to_keras: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Pointwise:
    """A Dense layer that the reference writes as a 1x1 `nn.Conv2d` over feature maps
    (weight `(out, in, 1, 1)`): the same map, applied to the channels of every pixel."""

    layer: object


@dataclass(frozen=True)
class OutputSlice:
    """Output units `[start, stop)` of one of our layers (Dense, convolution, `Pointwise`)
    that the reference keeps as a layer of its own, e.g. its separate `to_k` and `to_v` where
    we project keys and values at once."""

    layer: object
    start: int
    stop: int


@dataclass(frozen=True)
class Target:
    """Where one state-dict entry goes: `variable` (None for `Empty` and `Ignored`), the shape
    vit-pytorch stores, the transform from that layout to ours, and `part`: `(start, stop)` on
    the last axis of `variable` when the entry fills only that slice of it."""

    variable: object
    torch_shape: tuple
    to_keras: Callable[[np.ndarray], np.ndarray]
    part: tuple | None = None


def _same(array):
    return array


def _reshape(array, shape):
    return array.reshape(shape)


def _dense_kernel(array):  # torch Linear weight (out, in) -> Keras kernel (in, out)
    return array.T


def _conv_kernel(
    array,
):  # torch Conv2d (out, in / groups, kh, kw) -> Keras (kh, kw, in / groups, out)
    return array.transpose(2, 3, 1, 0)


def _conv1d_kernel(array):  # torch Conv1d (out, in / groups, k) -> Keras (k, in / groups, out)
    return array.transpose(2, 1, 0)


def _depthwise_kernel(multiplier):
    """torch Conv2d(groups=in) weight (in * mult, 1, kh, kw), output channel i * mult + m
    -> Keras DepthwiseConv2D kernel (kh, kw, in, mult)."""

    def transform(array):
        out, _, kh, kw = array.shape
        return array.reshape(out // multiplier, multiplier, kh, kw).transpose(2, 3, 0, 1)

    return transform


def _pointwise_kernel(array):  # torch Conv2d 1x1 (out, in, 1, 1) -> Keras Dense (in, out)
    return array.reshape(array.shape[:2]).T


def channel_norm(norm) -> dict:
    """Names of a Keras `LayerNormalization` that stands for vit-pytorch's channel LayerNorm
    (gain `g` and bias `b`, stored as `(1, C, 1, 1)`)."""
    (channels,) = norm.gamma.shape
    return {
        "g": Reshaped(norm.gamma, (1, channels, 1, 1)),
        "b": Reshaped(norm.beta, (1, channels, 1, 1)),
    }


def _leaves(layer) -> dict[str, tuple]:
    """State-dict names of one Keras layer's weights: {name: (variable, transform, torch shape)}."""
    if isinstance(layer, keras.layers.Dense):
        leaves = {"weight": (layer.kernel, _dense_kernel, tuple(layer.kernel.shape)[::-1])}
        if layer.use_bias:
            leaves["bias"] = (layer.bias, _same, tuple(layer.bias.shape))
        return leaves
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw, c, m = layer.kernel.shape
        leaves = {"weight": (layer.kernel, _depthwise_kernel(m), (c * m, 1, kh, kw))}
        if layer.use_bias:
            leaves["bias"] = (layer.bias, _same, tuple(layer.bias.shape))
        return leaves
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv1D)):
        shape = tuple(layer.kernel.shape)
        if isinstance(layer, keras.layers.Conv2D):
            leaves = {"weight": (layer.kernel, _conv_kernel, (shape[3], shape[2], *shape[:2]))}
        else:
            leaves = {"weight": (layer.kernel, _conv1d_kernel, (shape[2], shape[1], shape[0]))}
        if layer.use_bias:
            leaves["bias"] = (layer.bias, _same, tuple(layer.bias.shape))
        return leaves
    if isinstance(layer, keras.layers.BatchNormalization):
        leaves = {
            "running_mean": (layer.moving_mean, _same, tuple(layer.moving_mean.shape)),
            "running_var": (layer.moving_variance, _same, tuple(layer.moving_variance.shape)),
            "num_batches_tracked": (None, _same, ()),  # torch's step counter: nothing here
        }
        if layer.scale:
            leaves["weight"] = (layer.gamma, _same, tuple(layer.gamma.shape))
        if layer.center:
            leaves["bias"] = (layer.beta, _same, tuple(layer.beta.shape))
        return leaves
    if isinstance(layer, keras.layers.LayerNormalization):
        leaves = {}
        if layer.scale:
            leaves["weight"] = (layer.gamma, _same, tuple(layer.gamma.shape))
        if layer.center:
            leaves["bias"] = (layer.beta, _same, tuple(layer.beta.shape))
        return leaves
    raise TypeError(
        f"no vit-pytorch mapping for layer {layer.name!r} of type {type(layer).__name__}; "
        "give it a `vit_pytorch_state_map()` method or map its variables directly."
    )


def as_feature_map(names):
    """A state map for blocks that vit-pytorch writes over (b, c, h, w) feature maps and we
    over tokens or channels-last maps: each Dense layer is its 1x1 convolution (`Pointwise`),
    each LayerNormalization its channel LayerNorm (`g`, `b`). Other entries stay as they are;
    dicts, `OutputSlice`s and blocks with a state map of their own are converted inside."""
    if isinstance(names, dict):
        return {key: as_feature_map(value) for key, value in names.items()}
    if isinstance(names, OutputSlice):
        return OutputSlice(as_feature_map(names.layer), names.start, names.stop)
    if isinstance(names, keras.layers.Dense):
        return Pointwise(names)
    if isinstance(names, keras.layers.LayerNormalization):
        return channel_norm(names)
    if isinstance(names, keras.layers.Layer) and hasattr(names, "vit_pytorch_state_map"):
        return as_feature_map(names.vit_pytorch_state_map())
    return names


def flatten(names: dict, prefix: str = "") -> dict[str, Target]:
    """`{"transformer": {"norm": <LayerNorm>}}` -> `{"transformer.norm.weight": Target, ...}`."""
    flat: dict[str, Target] = {}
    for key, value in names.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        elif isinstance(value, (Empty, Ignored)):
            flat[path] = Target(None, tuple(value.shape), _same)
        elif isinstance(value, Transformed):
            flat[path] = Target(value.variable, tuple(value.shape), value.to_keras)
        elif isinstance(value, Reshaped):
            shape = tuple(value.variable.shape)
            flat[path] = Target(value.variable, tuple(value.shape), partial(_reshape, shape=shape))
        elif isinstance(value, keras.Variable):
            flat[path] = Target(value, tuple(value.shape), _same)
        elif isinstance(value, Pointwise):
            for leaf, (variable, transform, shape) in _leaves(value.layer).items():
                if leaf == "weight":
                    transform, shape = _pointwise_kernel, (*shape, 1, 1)
                flat[f"{path}.{leaf}"] = Target(variable, shape, transform)
        elif isinstance(value, OutputSlice):
            # torch keeps output units on the first axis of weights and biases, we on the last
            width = value.stop - value.start
            for name, t in flatten({key: value.layer}, prefix).items():
                shape = (width, *t.torch_shape[1:])
                flat[name] = Target(t.variable, shape, t.to_keras, (value.start, value.stop))
        elif hasattr(value, "vit_pytorch_state_map"):
            # a dict of names, or one entry that stands for the whole block (a wrapped layer)
            flat.update(flatten({key: value.vit_pytorch_state_map()}, prefix))
        elif isinstance(value, keras.layers.Layer):
            for leaf, (variable, transform, shape) in _leaves(value).items():
                flat[f"{path}.{leaf}"] = Target(variable, shape, transform)
        else:
            raise TypeError(f"cannot map {path!r} to {type(value).__name__}")
    return flat
