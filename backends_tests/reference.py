"""How to build and run a reference model where a plain `Class(**config)(images)` does not do.

- A config value that is a serialized vitkit layer (`efficient.ViT(transformer=...)`) becomes the
  vit-pytorch module it stands for (`REFERENCE_LAYERS`).
- A reference whose forward pass is random even in eval mode (`ats_vit`) is run by the function
  `REFERENCE_FORWARDS` names for it, which controls its randomness the way the vitkit model does.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect

import keras
import numpy as np

from backends_tests.helpers import plain_kwargs

# registered vitkit layer -> "module.Class" under vit_pytorch with the same weights and names
REFERENCE_LAYERS = {"vitkit>Transformer": "vit.Transformer"}


def _reference(path):
    module, cls = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"vit_pytorch.{module}"), cls)


def reference_value(value):
    """A serialized vitkit layer -> its vit-pytorch module; anything else as it is."""
    if isinstance(value, dict) and value.get("class_name") in REFERENCE_LAYERS:
        cls = _reference(REFERENCE_LAYERS[value["class_name"]])
        accepted = inspect.signature(cls).parameters
        config = value["config"]
        return cls(**{k: v for k, v in plain_kwargs(config).items() if k in accepted})
    return value


def reference_kwargs(config: dict) -> dict:
    """The reference's constructor arguments for a vitkit config."""
    return {k: reference_value(v) for k, v in plain_kwargs(config).items()}


def ats_inference_noise(ours) -> dict:
    """{block index: its fixed uniform noise (1, K, n)} of a vitkit `ats_vit.ViT`."""
    return {
        index: keras.ops.convert_to_numpy(attention.sampler.inference_noise)[None]
        for index, attention in enumerate(ours.transformer.attentions)
        if attention.sampler is not None
    }


@contextlib.contextmanager
def ats_noise(ref, noise: dict):
    """Inside, block `i` of the reference `ats_vit.ViT` samples with the uniform noise
    `noise[i]` (an array (b or 1, K, n), cut to the size it asks for) instead of drawing it."""
    import torch
    from vit_pytorch import ats_vit

    layer = {}

    def fixed_gumbel(shape, device, dtype, eps=1e-6):
        batch, k, n = shape
        u = torch.from_numpy(noise[layer["index"]][:, :k, :n]).to(device, dtype)
        return -ats_vit.log(-ats_vit.log(u.expand(batch, k, n), eps), eps)

    def tracking(index, forward):
        def wrapped(*args, **kwargs):
            layer["index"] = index
            return forward(*args, **kwargs)

        return wrapped

    samplers = [(i, attn.ats) for i, (attn, _) in enumerate(ref.transformer.layers) if attn.ats]
    original = ats_vit.sample_gumbel
    try:
        ats_vit.sample_gumbel = fixed_gumbel
        for index, sampler in samplers:
            sampler.forward = tracking(index, sampler.forward)
        yield
    finally:
        ats_vit.sample_gumbel = original
        for _, sampler in samplers:
            del sampler.forward


def ats_forward(ref, ours, images, **kwargs):
    """`ats_vit.ViT`: the sampling's only randomness is the uniform noise under its Gumbel
    noise. Here each sampling block of the reference draws the fixed noise that the same block
    of our model uses in inference (one draw, the same for every image), and the reference runs
    one image at a time: it decides whether a block samples from the longest sequence in the
    batch, ours from each image's own tokens (the two agree on a batch of one)."""
    import torch

    with ats_noise(ref, ats_inference_noise(ours)):
        return [ref(torch.from_numpy(image[None]), **kwargs) for image in images]


def _ats_logits(ref, ours, images):
    return np.concatenate([y.numpy() for y in ats_forward(ref, ours, images)])


REFERENCE_FORWARDS = {"ats_vit": _ats_logits}


def reference_forward(name, ref, ours, images: np.ndarray) -> np.ndarray:
    """The reference's output for `images` (its layout, numpy), as `ours` computes it."""
    import torch

    if name in REFERENCE_FORWARDS:
        with torch.no_grad():
            return REFERENCE_FORWARDS[name](ref, ours, images)
    with torch.no_grad():
        return ref(torch.from_numpy(images)).numpy()
