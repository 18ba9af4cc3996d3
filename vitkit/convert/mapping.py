"""How a vit-pytorch state dict maps onto a vitkit model's weights.

Every model declares `vit_pytorch_state_map()`: a nested dict from vit-pytorch module names to
our layers, variables, or further dicts. `flatten` turns that into one entry per state-dict key
with the shape the reference stores and the transform into our layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np


@dataclass(frozen=True)
class Empty:
    """A reference key that holds an empty tensor of `shape` and has no counterpart here
    (vit-pytorch's `(0, dim)` class token when `pool="mean"`)."""

    shape: tuple


@dataclass(frozen=True)
class Target:
    """Where one state-dict entry goes: `variable` (None for `Empty`), the shape vit-pytorch
    stores, and the transform from that layout to ours."""

    variable: object
    torch_shape: tuple
    to_keras: Callable[[np.ndarray], np.ndarray]


def _same(array):
    return array


def _dense_kernel(array):  # torch Linear weight (out, in) -> Keras kernel (in, out)
    return array.T


def _leaves(layer) -> dict[str, tuple]:
    """State-dict names of one Keras layer's weights: {name: (variable, transform, torch shape)}."""
    if isinstance(layer, keras.layers.Dense):
        leaves = {"weight": (layer.kernel, _dense_kernel, tuple(layer.kernel.shape)[::-1])}
        if layer.use_bias:
            leaves["bias"] = (layer.bias, _same, tuple(layer.bias.shape))
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


def flatten(names: dict, prefix: str = "") -> dict[str, Target]:
    """`{"transformer": {"norm": <LayerNorm>}}` -> `{"transformer.norm.weight": Target, ...}`."""
    flat: dict[str, Target] = {}
    for key, value in names.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        elif isinstance(value, Empty):
            flat[path] = Target(None, tuple(value.shape), _same)
        elif isinstance(value, keras.Variable):
            flat[path] = Target(value, tuple(value.shape), _same)
        elif hasattr(value, "vit_pytorch_state_map"):
            flat.update(flatten(value.vit_pytorch_state_map(), path + "."))
        elif isinstance(value, keras.layers.Layer):
            for leaf, (variable, transform, shape) in _leaves(value).items():
                flat[f"{path}.{leaf}"] = Target(variable, shape, transform)
        else:
            raise TypeError(f"cannot map {path!r} to {type(value).__name__}")
    return flat
