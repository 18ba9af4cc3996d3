"""Where a ViT looks: attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in
Transformers", arXiv:2005.00928, section 3) over the maps a `Recorder` returns, turned into a
heat map over the image.

Rollout treats each layer's attention, averaged over heads, as a flow between tokens. The
residual connection carries every token to itself as well, so each layer's matrix is
`A + I` with its rows renormalized (`0.5 A + 0.5 I`), and the flow from the input tokens to the
last layer is the product of those matrices, last layer on the left. The class token's row of
the product says how much each patch fed the class token, so it reshapes to the patch grid.

    heat = attention_heatmap(vit, images)          # (b, rows, cols)
    save_overlay(images[0], heat[0], "attn.png")
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from vitkit.introspect import Recorder
from vitkit.layers.utils import image_shape


def attention_rollout(attns):
    """Attention rollout: `(b, layers, heads, n, n)` maps (or a list of `(b, heads, n, n)`,
    first layer first) -> `(b, n, n)`, row `i` the share of each input token in token `i`
    after the last layer. Heads are averaged; each layer adds the identity (the residual
    path) and renormalizes its rows; the layers multiply, the last on the left."""
    if isinstance(attns, (list, tuple)):
        maps = list(attns)
    else:
        if len(attns.shape) != 5:
            raise ValueError(
                "attention_rollout takes maps (batch, layers, heads, n, n) or a list of "
                f"(batch, heads, n, n); got shape {tuple(attns.shape)}."
            )
        maps = [attns[:, i] for i in range(attns.shape[1])]
    shapes = {tuple(m.shape) for m in maps}
    if not maps or len(shapes) != 1:
        raise ValueError(
            "attention rollout needs one or more maps of one shape, a single sequence of "
            f"tokens through every layer; got shapes {sorted(shapes, key=str)}."
        )
    (shape,) = shapes
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise ValueError(
            f"attention rollout needs square self-attention maps (batch, heads, n, n); got {shape}."
        )
    eye = ops.eye(shape[-1], dtype="float32")
    flow = None
    for attn in maps:
        attn = ops.mean(ops.cast(attn, "float32"), axis=1) + eye  # (b, n, n)
        attn = attn / ops.sum(attn, axis=-1, keepdims=True)
        flow = attn if flow is None else ops.matmul(attn, flow)
    return flow


def class_token_map(rollout, grid, class_token=True):
    """A rollout `(b, n, n)` -> `(b, rows, cols)` over the patch grid `grid = (rows, cols)`.

    With a class token (token 0, the patches after it in row-major order) this is the class
    token's row over the patches. A model without one (`pool="mean"`, SimpleViT) classifies
    the mean of its tokens, so the map is the mean of every token's row."""
    rows, cols = grid
    n = rollout.shape[-1]
    if n != rows * cols + int(class_token):
        extra = " plus a class token" if class_token else ""
        raise ValueError(
            f"a rollout over {n} tokens does not fit a {rows}x{cols} patch grid{extra} "
            f"({rows * cols + int(class_token)} tokens)."
        )
    weights = rollout[:, 0, 1:] if class_token else ops.mean(rollout, axis=1)
    return ops.reshape(weights, (-1, rows, cols))


def attention_heatmap(model, images):
    """Where `model` looks in each image: the class token's attention rollout over the patch
    grid, `(b, rows, cols)` in numpy.

    Only ViT-like models can be pictured: one sequence of tokens through every layer, `[class
    token] + patches` of a known grid (`model.patch_hw`), one map per image. Others (windowed
    or hierarchical attention, token merging or sampling, extra tokens such as DeiT's
    distillation token) raise a ValueError saying why."""
    name = type(model).__name__
    patch_hw = getattr(model, "patch_hw", None)
    if patch_hw is None:
        raise ValueError(
            f"{name} has no single grid of patch tokens (no `patch_hw`), so its attention "
            "cannot be drawn over the image: attention maps are for ViT-like models."
        )
    height, width, _ = image_shape(images, model.data_format)
    grid = (height // patch_hw[0], width // patch_hw[1])
    recorder = Recorder(model)
    try:
        _, attns = recorder(images)
    finally:
        recorder.eject()
    if attns is None or isinstance(attns, list):
        raise ValueError(
            f"{name}'s attention maps change shape from layer to layer (hierarchical stages, "
            "or tokens merged, sampled or added), so no single rollout over the image exists."
        )
    batch = images.shape[0]
    if attns.shape[0] != batch:
        raise ValueError(
            f"{name} attends within windows or sub-sequences ({attns.shape[0]} maps for "
            f"{batch} images), so no single rollout over the image exists."
        )
    class_token = getattr(model, "cls_token", None) is not None
    tokens = grid[0] * grid[1] + int(class_token)
    if attns.shape[-1] != tokens:
        extra = " plus the class token" if class_token else ""
        raise ValueError(
            f"{name}'s attention runs over {attns.shape[-1]} tokens, not the "
            f"{grid[0]}x{grid[1]} patch grid{extra} ({tokens}), so it cannot be drawn over the "
            "image."
        )
    heat = class_token_map(attention_rollout(attns), grid, class_token)
    return keras.ops.convert_to_numpy(heat)


def upsample(heat, size):
    """A `(rows, cols)` map -> `(height, width)`, bilinear."""
    from vitkit.data import resize

    heat = np.asarray(heat, "float32")
    return resize(heat[None, ..., None], size)[0, ..., 0]


def save_overlay(image, heat, path, title="attention rollout", alpha=0.5, cmap="jet"):
    """Save a picture of `image` beside it with `heat` overlaid as a heat map.

    Args:
        image: `(h, w, channels)` or `(h, w)`, floats in [0, 1] or integers in [0, 255].
        heat: `(rows, cols)` (or already `(h, w)`): scaled to [0, 1] and upsampled
            bilinearly to the image's size.
        path: the file to write (PNG, or any format matplotlib writes).
        title: the title over the overlay.
        alpha: opacity of the heat map.
        cmap: matplotlib colour map of the heat map.

    Returns the path."""
    from matplotlib.figure import Figure  # no pyplot: leaves matplotlib's backend alone

    image = np.asarray(image, "float32")
    if image.max() > 1.0:
        image = image / 255.0
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    heat = np.asarray(keras.ops.convert_to_numpy(heat), "float32")
    if heat.ndim != 2:
        raise ValueError(f"`heat` must be one map (rows, cols); got shape {heat.shape}.")
    low, high = float(heat.min()), float(heat.max())
    heat = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    heat = np.clip(upsample(heat, image.shape[:2]), 0.0, 1.0)

    gray = "gray" if image.ndim == 2 else None
    figure = Figure(figsize=(8, 4.2))
    left, right = figure.subplots(1, 2)
    left.imshow(image, cmap=gray, vmin=0, vmax=1)
    left.set_title("image")
    right.imshow(image, cmap=gray, vmin=0, vmax=1)
    shown = right.imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    right.set_title(title)
    for axis in (left, right):
        axis.set_axis_off()
    figure.colorbar(shown, ax=right, fraction=0.046, pad=0.04)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path


def read_picture(path, max_side=512):
    """An image file as `(h, w, 3)` floats in [0, 1] at its own size, shrunk so that its
    longer side is at most `max_side` pixels: the background of `save_overlay`."""
    from PIL import Image

    from vitkit.data import read_image

    with Image.open(path) as image:
        width, height = image.size
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return read_image(path, size, 3)
