"""`vitkit.export(model, path, format=...)`: one call, on every backend.

| format           | tensorflow       | jax                       | torch                  |
|------------------|------------------|---------------------------|------------------------|
| `tf_saved_model` | Keras' exporter  | Keras' exporter (jax2tf)  | via a TensorFlow child |
| `onnx`           | Keras' (tf2onnx) | via a TensorFlow child    | via a TensorFlow child |

"Via a TensorFlow child": the model is saved as `.keras` (weights are backend-neutral), rebuilt
in a Python subprocess with `KERAS_BACKEND=tensorflow`, and exported there. Keras 3.15's own
exporters fail for these cases (torch.export's dynamic batch dimension; ONNX from JAX needs
jax2onnx and from torch fails on a dynamic-shape gather), while the TensorFlow path handles a
dynamic batch and every op vitkit uses. Exports take any batch size; the image size is the
model's configured one unless `input_shape` says otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import keras

FORMATS = ("tf_saved_model", "onnx")


class ExportError(ValueError):
    """A model that cannot be exported to a format, or an export that failed."""


def _input_spec(model, input_shape):
    shape = tuple(input_shape) if input_shape else tuple(model.default_input_shape()[1:])
    return [keras.InputSpec(shape=(None, *shape), dtype="float32", name="images")]


def _check_exportable(model, format):
    from vitkit.registry import spec_of

    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {', '.join(FORMATS)}; got {format!r}.")
    spec = spec_of(model)
    if spec is not None and format in spec.export_gaps:
        raise ExportError(
            f"{type(model).__name__} ({spec.name}) cannot be exported to {format}: "
            f"{spec.export_gaps[format]}"
        )
    if keras.backend.standardize_dtype(model.compute_dtype) != "float32":
        raise ExportError(
            f"{type(model).__name__}: export needs a float32 model; this one computes in "
            f"{model.compute_dtype}. Rebuild it with dtype='float32' and copy the weights."
        )


def _native(model, path, format, input_shape):
    model.export(
        str(path), format=format, input_signature=_input_spec(model, input_shape), verbose=False
    )


def _via_tensorflow(model, path, format, input_shape):
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "model.keras"
        model.save(source)
        shape = json.dumps(list(input_shape) if input_shape else None)
        # The child imports this same vitkit, installed or not.
        package_root = str(Path(__file__).resolve().parent.parent)
        pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        env = {
            **os.environ,
            "KERAS_BACKEND": "tensorflow",
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONPATH": pythonpath,
        }
        command = [sys.executable, "-m", "vitkit.exporting", str(source), str(path), format, shape]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ExportError(
            f"exporting {type(model).__name__} to {format} through TensorFlow failed: {last}"
        )


def export(model, path, format="tf_saved_model", input_shape=None):
    """Export a vitkit model for inference outside Keras.

    Args:
        model: a built or unbuilt vitkit model (it is built at its configured size if needed).
        path: a directory for `"tf_saved_model"`, a file (`.onnx`) for `"onnx"`.
        format: `"tf_saved_model"` (load with `tf.saved_model.load(path).serve(images)`) or
            `"onnx"` (run with onnxruntime; the input is named `"images"`).
        input_shape: `(height, width, channels)` (or channels-first, following the model's
            `data_format`) of one image; defaults to the model's configured size. The batch
            dimension is always dynamic.

    Returns:
        The path written.

    Raises:
        ExportError: the model cannot be exported to `format` (the message names both), or the
            exporter failed.
    """
    _check_exportable(model, format)
    if hasattr(model, "build_default"):
        model.build_default()
    path = Path(path)
    backend = keras.config.backend()
    native = backend == "tensorflow" or (backend == "jax" and format == "tf_saved_model")
    try:
        import tensorflow  # noqa: F401  (both paths end in TensorFlow)
    except ImportError:
        raise ExportError(
            f"exporting to {format} needs TensorFlow installed (pip install 'vitkit[export]')."
        ) from None
    if native:
        _native(model, path, format, input_shape)
    else:
        _via_tensorflow(model, path, format, input_shape)
    return path


def _child(source, path, format, shape):
    """The TensorFlow side of `_via_tensorflow`."""
    # `import vitkit` alone loads nothing (its attributes are lazy): import the models, so
    # every class a .keras file may name is registered with Keras.
    import vitkit.models  # noqa: F401

    model = keras.saving.load_model(source, safe_mode=True)
    shape = json.loads(shape)
    _native(model, path, format, shape)


if __name__ == "__main__":
    _child(*sys.argv[1:5])
