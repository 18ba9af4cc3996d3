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

import atexit
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


class _TensorFlowWorker:
    """One long-lived Python process with `KERAS_BACKEND=tensorflow` that exports the `.keras`
    files it is sent, one JSON line per request and per reply: TensorFlow, Keras and vitkit
    are imported once per session instead of once per export (seconds each)."""

    _running = None

    @classmethod
    def get(cls):
        worker = cls._running
        if worker is None or worker.process.poll() is not None:
            worker = cls._running = cls()
        return worker

    def __init__(self):
        # The child imports this same vitkit, installed or not.
        package_root = str(Path(__file__).resolve().parent.parent)
        pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        env = {
            **os.environ,
            "KERAS_BACKEND": "tensorflow",
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONPATH": pythonpath,
        }
        # its chatter, kept for the worker's lifetime; replies come on stdout
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vitkit.exporting", "--serve"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        atexit.register(self.close)

    def export(self, source, path, format, shape) -> str | None:
        """Export; None if it worked, else the error's last line."""
        request = dict(source=str(source), path=str(path), format=format, shape=shape)
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            reply = self.process.stdout.readline()
        except (BrokenPipeError, OSError):
            reply = ""
        if not reply:  # the worker died: its last words are in its log
            self.log.seek(0)
            lines = self.log.read().strip().splitlines() or ["the TensorFlow process died"]
            return lines[-1]
        return json.loads(reply)["error"]

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def _via_tensorflow(model, path, format, input_shape):
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "model.keras"
        model.save(source)
        shape = list(input_shape) if input_shape else None
        error = _TensorFlowWorker.get().export(source, Path(path).resolve(), format, shape)
    if error is not None:
        raise ExportError(
            f"exporting {type(model).__name__} to {format} through TensorFlow failed: {error}"
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


def _serve():
    """The TensorFlow side of `_via_tensorflow`: one request per line on stdin, one reply per
    line on stdout (`{"error": null}` or the error's last line)."""
    import traceback

    import vitkit.models  # noqa: F401  (registers the classes the files name)

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever else writes to stdout (TensorFlow, tf2onnx) goes to the log
    for line in sys.stdin:
        request = json.loads(line)
        try:
            model = keras.saving.load_model(request["source"], safe_mode=True)
            _native(model, request["path"], request["format"], request["shape"])
            error = None
        except Exception as err:  # reported to the parent, which raises ExportError
            traceback.print_exc()
            error = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        keras.utils.clear_session()
        replies.write(json.dumps({"error": error}) + "\n")
        replies.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
