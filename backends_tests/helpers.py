"""Backend-neutral test helpers; the few backend branches live here and nowhere else."""

from __future__ import annotations

import importlib

import keras
import numpy as np
from keras import ops

BACKEND = keras.config.backend()


def as_numpy(x) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x)).astype("float32")


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, "float64"), np.asarray(ref, "float64")
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-12))


def batch_norm_layers(model) -> list:
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def batch_norm_statistics(model) -> dict:
    """{path: value} of the moving mean and variance of every BatchNorm in `model`."""
    return {
        v.path: as_numpy(v)
        for layer in batch_norm_layers(model)
        for v in (layer.moving_mean, layer.moving_variance)
    }


def random_images(model_or_config, batch, seed=0, data_format=None, size=None):
    """Random normal images for a model (or a config of one), of its configured size or
    `size=(height, width)`, in its data format or the one named."""
    model = model_or_config
    if isinstance(model_or_config, dict):
        model = model_or_config  # a config: image_size / channels keys
        h, w = size or _pair(model["image_size"])
        c = model.get("channels", 3)
        data_format = data_format or model.get("data_format", "channels_last")
    else:
        h, w = size or image_size(model)
        c = model.input_channels
        data_format = data_format or model.data_format
    x = np.random.default_rng(seed).normal(size=(batch, h, w, c)).astype("float32")
    return x if data_format == "channels_last" else x.transpose(0, 3, 1, 2)


def image_size(model) -> tuple:
    """The size of the images the tests feed `model`: its configured size, or its registry
    entry's `input_size` when its constructor names none (CvT)."""
    if model.image_hw is not None:
        return tuple(model.image_hw)
    from vitkit.registry import spec_of

    return spec_of(model).input_size


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def plain_kwargs(config: dict) -> dict:
    """Lists back to tuples: vit-pytorch's `pair()` only accepts tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def reference_class(spec):
    module, cls = spec.reference.rsplit(".", 1)
    return getattr(importlib.import_module(f"vit_pytorch.{module}"), cls)


def randomize_torch(module, seed=0, scale=0.3):
    """Every entry of the state dict (parameters and persistent buffers) drawn at random (no
    default init survives); running variances stay positive. Non-persistent buffers are no
    state (index tables the module computes from its config) and stay as they are."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                tensor.copy_(torch.randint(0, 10, tensor.shape, generator=g))
            elif "running_var" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=g) * scale)
    return module


def scalar_loss(outputs, projections):
    """sum(output * r) over every output: no symmetry lets a gradient cancel out."""
    outputs = keras.tree.flatten(outputs)
    return sum(ops.sum(ops.cast(y, "float32") * r) for y, r in zip(outputs, projections))


def gradients(model, x, weights):
    """d(scalar_loss(model(x)))/d(weights) on the current backend."""
    rng = np.random.default_rng(1)
    r = [
        rng.normal(size=tuple(y.shape)).astype("float32")
        for y in keras.tree.flatten(model(x, training=True))
    ]
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss(tv):
            y, _ = model.stateless_call(tv, non_trainable, x, training=True)
            return scalar_loss(y, r)

        grads = jax.jit(jax.grad(loss))(trainable)
        grads = dict(zip([id(v) for v in model.trainable_variables], grads))
        return [grads[id(w)] for w in weights]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = scalar_loss(model(x, training=True), r)
        return tape.gradient(loss, weights)
    import torch

    for w in weights:
        w.value.grad = None
    loss = scalar_loss(model(x, training=True), [torch.as_tensor(a) for a in r])
    loss.backward()
    return [w.value.grad for w in weights]


def compiled_forward(model, x, training=False, **kwargs):
    """The model's forward pass compiled: XLA on JAX and TensorFlow, torch.compile on torch.
    `training=True` compiles the training-mode pass (random ops included); `kwargs` go to the
    call, as constants."""
    results, _ = compiled_forward_batches(model, [x], training=training, **kwargs)
    return results[0]


def compiled_forward_batches(model, batches, training=False, **kwargs):
    """The forward pass traced once, with the batch dimension unknown, and run on each batch
    in turn: (outputs per batch, number of traces). JAX traces a shape-polymorphic export
    (a symbolic batch size, as `jax2tf` and Keras' exporter do), TensorFlow an `XLA` function
    with an input signature (what `reduce_retracing` settles on after two sizes), torch a
    graph with the batch dimension marked dynamic."""
    traces = []
    if BACKEND == "jax":
        import jax

        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]

        def forward(tv, ntv, x):
            traces.append(x.shape)
            return model.stateless_call(tv, ntv, x, training=training, **kwargs)[0]

        (batch,) = jax.export.symbolic_shape("batch")
        spec = jax.ShapeDtypeStruct((batch, *batches[0].shape[1:]), "float32")
        shaped = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in (*tv, *ntv)]
        exported = jax.export.export(jax.jit(forward))(shaped[: len(tv)], shaped[len(tv) :], spec)
        return [exported.call(tv, ntv, x) for x in batches], len(traces)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec((None, *batches[0].shape[1:]), "float32")

        @tf.function(jit_compile=True, input_signature=[spec])
        def forward(x):
            traces.append(x.shape)
            return model(x, training=training, **kwargs)

        return [forward(x) for x in batches], len(traces)
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    # aot_eager: dynamo capture + AOT autograd tracing, without a C++ toolchain. The batch
    # dimension is marked dynamic, so a second batch size reuses the first graph. In training,
    # Keras' torch seed generator is `torch.compiler.disable`d (Keras 3.15): random ops break
    # the graph there, so only the inference pass is held to fullgraph.
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(
        lambda x: model(x, training=training, **kwargs), backend=counter, fullgraph=not training
    )
    tensors = [torch.as_tensor(x) for x in batches]
    if len(tensors) > 1:
        torch._dynamo.mark_dynamic(tensors[0], 0)
    return [fn(x) for x in tensors], counter.frame_count


def template_task(model, classes, samples=96, seed=0):
    """A learnable synthetic task: class k is a fixed random image plus noise."""
    rng = np.random.default_rng(seed)
    templates = rng.normal(size=(classes, *random_images(model, 1).shape[1:]))
    labels = rng.integers(0, classes, size=samples)
    noise = rng.normal(size=(samples, *templates.shape[1:]))
    return (templates[labels] + 0.5 * noise).astype("float32"), labels.astype("int32")


def jit_forward(model):
    """The inference pass compiled as a user compiles it: `jax.jit`, `tf.function` with XLA,
    `torch.compile` (graph breaks allowed, as in Keras' own `jit_compile` on torch). Shapes and
    dtypes come from each call, not from a fixed signature, so bad inputs reach the model."""
    if BACKEND == "jax":
        import jax

        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        forward = jax.jit(lambda x: model.stateless_call(tv, ntv, x, training=False)[0])
        return forward
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda x: model(x, training=False), jit_compile=True)
    import torch

    compiled = torch.compile(lambda x: model(x, training=False), backend="aot_eager")
    return lambda x: compiled(torch.as_tensor(x) if isinstance(x, np.ndarray) else x)
