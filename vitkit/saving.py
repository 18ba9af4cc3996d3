"""Opening files from anywhere without trusting them.

`load_model` reads a `.keras` file with Keras' `safe_mode=True` (no `Lambda` layer, no pickled
code is ever run) and turns the many ways a file can be broken into one `CheckpointError` that
names the file. `read_state_dict` reads a vit-pytorch checkpoint as tensors only: safetensors,
or `torch.load(..., weights_only=True)`, never a pickle that can run code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path


class CheckpointError(ValueError):
    """A file that is missing, not a checkpoint, broken, or refused as unsafe."""


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_model(path, *, compile=True):
    """Load a `.keras` file safely.

    Args:
        path: the `.keras` file.
        compile: as in `keras.saving.load_model`.

    Returns:
        The model, its classes resolved among those registered with Keras (every vitkit model
        and layer is).

    Raises:
        CheckpointError (a `ValueError`): naming the file, when it does not exist, is not a
            `.keras` zip archive, is truncated or corrupted, or holds something `safe_mode`
            refuses (a `Lambda` layer: code that would run on loading).
    """
    import keras

    import vitkit  # noqa: F401  (registers every class a vitkit file names)

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a .keras file (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()  # reads every member: a truncated file fails here
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupted: {_first_line(err)}") from None
    if broken is not None:
        raise CheckpointError(f"{path} is corrupted: its member {broken} fails its checksum")
    if "config.json" not in names:
        raise CheckpointError(f"{path} is not a .keras file (it has no config.json)")
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as err:  # Keras raises many types for a bad file
        message = _first_line(err)
        if "Lambda" in str(err) or "safe_mode" in str(err):
            message = (
                "it holds code that would run on loading (a Lambda layer or a pickled "
                f"function), which safe mode refuses: {message}"
            )
        raise CheckpointError(f"cannot load {path}: {message}") from None


def read_state_dict(path) -> dict:
    """A vit-pytorch checkpoint file as `{name: array or tensor}`, without running any code in
    it: `.safetensors` files through `safetensors`, anything else through
    `torch.load(..., weights_only=True)` (a plain state dict, or a dict holding one under
    `"state_dict"` or `"model"`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise CheckpointError(
                f"reading {path} needs the `safetensors` package: pip install safetensors"
            ) from None
        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"cannot read {path}: {_first_line(err)}") from None
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler refuses anything but tensors and containers
        raise CheckpointError(
            f"cannot read {path} as tensors only (torch.load weights_only=True): {_first_line(err)}"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state
