"""Look inside a model while it runs: `Recorder` returns every attention map, `Extractor` the
tokens of one layer (vit-pytorch's `recorder.Recorder` and `extractor.Extractor`).

Both wrap a model without changing it: while a wrapper runs the model, taps (`vitkit.taps`)
replace a method or attribute of a few layer *instances*; when the call returns, the model is
exactly as it was, and `eject()` hands it back. The wrappers are Keras models themselves, so
they run eagerly, under `jax.jit` (through `stateless_call`), in a `tf.function` with
`jit_compile=True`, under `torch.compile`, and in `predict`.

    recorder = Recorder(vit)
    preds, attns = recorder(images)  # attns: (batch, layers, heads, n, n)
    vit = recorder.eject()
"""

from __future__ import annotations

import contextlib

import keras
from keras import ops

from vitkit.layers.attention import Attention
from vitkit.taps import LayerTap, find_layer, instance_attribute, wrapped_method


def attention_layers(model) -> list:
    """Every `vitkit.layers.Attention` (subclasses included) inside `model`, in the order
    Keras tracks them (usually the order of the forward pass)."""
    return [
        layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, Attention)
    ]


def stack_maps(maps: list):
    """Attention maps `(b, heads, n_q, n_k)`, one per attention call, as one tensor
    `(b, calls, heads, n_q, n_k)` when they all have one shape; as the list otherwise (models
    whose token count or windows change from stage to stage); `None` for no maps."""
    if not maps:
        return None
    first = tuple(maps[0].shape)
    if all(tuple(m.shape) == first for m in maps[1:]):
        return ops.stack(maps, axis=1)
    return list(maps)


class ModelWrapper(keras.Model):
    """A Keras model that runs `vit` and returns what it saw; `eject()` returns `vit`.

    `device` is accepted for vit-pytorch compatibility and ignored: Keras keeps every tensor
    on the backend's device."""

    def __init__(self, vit, device=None, **kwargs):
        if not isinstance(vit, keras.layers.Layer):
            raise TypeError(f"{type(self).__name__} wraps a Keras model; got {type(vit).__name__}.")
        kwargs.setdefault("dtype", vit.dtype_policy)
        super().__init__(**kwargs)
        self.vit = vit
        self.device = device
        self.ejected = False
        if vit.built:  # nothing of its own to build: `stateless_call` works at once
            self.built = True

    def build(self, input_shape):
        if not self.vit.built:
            self.vit.build(input_shape)

    def check_attached(self) -> None:
        """Refuse to run once ejected."""
        if self.ejected:
            raise RuntimeError(
                f"this {type(self).__name__} has been ejected and cannot be used any more: "
                f"wrap the model again, `{type(self).__name__}(model)`."
            )

    def __call__(self, *args, **kwargs):
        self.check_attached()  # here too, so Keras does not wrap the message
        return super().__call__(*args, **kwargs)

    def clear(self) -> None:
        """Forget what the last call recorded."""

    def eject(self):
        """Stop this wrapper for good and return the model, unchanged."""
        self.ejected = True
        self.clear()
        # Compiled `predict`/`evaluate` functions would run the traced call without asking:
        # drop them, so a later one traces `call` again and is refused there.
        self.train_function = self.test_function = self.predict_function = None
        return self.vit


class Recorder(ModelWrapper):
    """Runs `vit` and returns `(preds, attns)`: its predictions and the post-softmax attention
    weights of every `vitkit.layers.Attention` (and subclass) inside it, in call order.

    While the recorder runs, each of those layers takes its explicit path (softmax of the
    scores, then a product with the values) instead of the fused kernel, so the weights exist;
    the predictions are the model's own, to float rounding. What is recorded is the softmax's
    output, before attention dropout and before a variant's post-softmax transform (CaiT's
    talking heads, DeepViT's re-attention), as vit-pytorch's `Recorder` records it: every
    row sums to 1. The maps are detached (`stop_gradient`).

    `attns` is `(batch, layers, heads, n_q, n_k)` when every map has one shape (ViT and the
    other single-sequence models); for a model whose maps differ (hierarchical stages, token
    sampling or merging, class-attention layers) it is the list of maps
    `(batch', heads, n_q, n_k)`, one per attention call. Windowed attention computes one map
    per window: its batch is `batch * windows`. `None` if no attention layer ran.

    Args:
        vit: a Keras model containing `vitkit.layers.Attention` layers (anywhere inside it,
            not only under `vit.transformer`).
        device: accepted for vit-pytorch compatibility; ignored.

    After a call, `recordings` holds that call's maps (a list); `clear()` empties it.
    `eject()` returns `vit` and refuses further calls.

    Example:
        >>> recorder = Recorder(vit)
        >>> preds, attns = recorder(images)  # (b, num_classes), (b, depth, heads, n, n)
        >>> vit = recorder.eject()
    """

    def __init__(self, vit, device=None, **kwargs):
        layers = attention_layers(vit) if isinstance(vit, keras.layers.Layer) else None
        if layers == []:
            raise ValueError(
                f"{type(vit).__name__} contains no vitkit.layers.Attention layer, so there is "
                "no attention map to record."
            )
        super().__init__(vit, device=device, **kwargs)
        # Plain attributes, past Keras' tracking: these layers belong to `vit`.
        object.__setattr__(self, "attention_layers", tuple(layers))
        object.__setattr__(self, "recordings", [])

    def clear(self) -> None:
        object.__setattr__(self, "recordings", [])

    def call(self, images, training=None):
        self.check_attached()  # `predict` and `stateless_call` come here directly
        maps = []

        def record(original, weights, *args, **kwargs):
            # `attention_weights` hands the softmax's output to its dropout layer.
            maps.append(ops.stop_gradient(weights))
            return original(weights, *args, **kwargs)

        with contextlib.ExitStack() as taps:
            for layer in self.attention_layers:
                taps.enter_context(instance_attribute(layer, "fusable", False))
                taps.enter_context(wrapped_method(layer.attn_dropout, "call", record))
            preds = self.vit(images, training=training)
        object.__setattr__(self, "recordings", maps)
        return preds, stack_maps(maps)


class Extractor(ModelWrapper):
    """Runs `vit` and returns `(preds, embeddings)`, or the embeddings alone: the output (or
    the input) of one layer of `vit`, by default `vit.transformer`'s tokens `(b, n, dim)`.

    Args:
        vit: a Keras model.
        device: accepted for vit-pytorch compatibility; ignored.
        layer: the layer to read (a layer of `vit`, an attribute path such as
            `"transformer.norm"`, a layer name or an index into `vit.layers`); `None` reads
            `layer_name`.
        layer_name: the attribute of `vit` to read when `layer` is None.
        layer_save_input: read the layer's (first) input instead of its output.
        return_embeddings_only: return the embeddings alone (also a keyword of the call).
        detach: stop gradients through the embeddings (`stop_gradient`).

    A layer that does not exist is a ValueError at construction; one that does not run
    during the call, a ValueError at the call. After a call, `latents` holds the embeddings.

    Example:
        >>> extractor = Extractor(vit)
        >>> preds, tokens = extractor(images)  # (b, num_classes), (b, n, dim)
        >>> vit = extractor.eject()
    """

    def __init__(
        self,
        vit,
        device=None,
        layer=None,
        layer_name="transformer",
        layer_save_input=False,
        return_embeddings_only=False,
        detach=True,
        **kwargs,
    ):
        target = (
            find_layer(vit, layer if layer is not None else layer_name)
            if isinstance(vit, keras.layers.Layer)
            else None
        )
        super().__init__(vit, device=device, **kwargs)
        object.__setattr__(self, "layer", target)  # a layer of `vit`: not tracked twice
        self.layer_name = layer_name
        self.layer_save_input = layer_save_input
        self.return_embeddings_only = return_embeddings_only
        self.detach = detach
        object.__setattr__(self, "latents", None)

    def clear(self) -> None:
        object.__setattr__(self, "latents", None)

    def call(self, images, return_embeddings_only=False, training=None):
        self.check_attached()
        with LayerTap(self.layer, save_input=self.layer_save_input) as tap:
            preds = self.vit(images, training=training)
        latents = tap.last
        if self.detach:
            latents = keras.tree.map_structure(ops.stop_gradient, latents)
        object.__setattr__(self, "latents", latents)
        if return_embeddings_only or self.return_embeddings_only:
            return latents
        return preds, latents
