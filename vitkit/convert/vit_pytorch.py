"""Load a `vit-pytorch` state dict into the matching vitkit model, with one call."""

from __future__ import annotations

import os
from collections.abc import Mapping

import keras
import numpy as np

from vitkit.convert.mapping import flatten


def _to_numpy(value) -> np.ndarray:
    """A torch tensor (any device, any float dtype) or an array-like, as numpy (no torch import)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def vit_pytorch_keys(model) -> dict[str, tuple]:
    """The state-dict keys `model` expects from vit-pytorch, with the shape of each."""
    if not hasattr(model, "vit_pytorch_state_map"):
        raise TypeError(f"{type(model).__name__} has no vit-pytorch counterpart to load from.")
    if hasattr(model, "build_default"):
        model.build_default()
    return {k: t.torch_shape for k, t in flatten(model.vit_pytorch_state_map()).items()}


def from_vit_pytorch(model, state_dict):
    """Copy a vit-pytorch checkpoint into `model`, building the model first if needed.

    Args:
        model: the vitkit model, built or not, configured as the reference model was.
        state_dict: `torch_model.state_dict()` (torch tensors or numpy arrays), the torch
            module itself, or the path of a checkpoint file (`.safetensors`, or a `torch.save`d
            state dict read with `weights_only=True`: no code in the file runs).

    Returns:
        `model`, with every weight replaced.

    Raises:
        ValueError: listing every missing, unexpected and mis-shaped key at once; nothing is
            assigned then.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        from vitkit.saving import read_state_dict

        state_dict = read_state_dict(state_dict)
    if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"`state_dict` must be a mapping of names to arrays; got {type(state_dict)}."
        )
    vit_pytorch_keys(model)  # builds the model if needed
    targets = flatten(model.vit_pytorch_state_map())
    arrays = {key: _to_numpy(value) for key, value in state_dict.items()}

    missing = sorted(set(targets) - set(arrays))
    unexpected = sorted(set(arrays) - set(targets))
    misshaped = sorted(
        f"{key}: checkpoint {tuple(arrays[key].shape)}, model expects {targets[key].torch_shape}"
        for key in set(targets) & set(arrays)
        if tuple(arrays[key].shape) != targets[key].torch_shape
    )
    if missing or unexpected or misshaped:
        lines = [f"cannot load this state dict into {type(model).__name__}:"]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
        ):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise ValueError("\n".join(lines))

    for key, target in targets.items():
        if target.variable is not None:
            value = target.to_keras(arrays[key]).astype(target.variable.dtype)
            if target.part is not None:  # one slice of a variable that several entries fill
                full = np.array(keras.ops.convert_to_numpy(target.variable))
                full[..., target.part[0] : target.part[1]] = value
                value = full
            target.variable.assign(value)
    return model
