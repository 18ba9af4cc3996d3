"""Import Keras without TensorFlow's C++ start-up notices.

With the TensorFlow backend, the first `import tensorflow` makes its C++ runtime print notices
(oneDNN, CPU features, absl's pre-initialization warning) straight to the process's file
descriptor 2, past Python's `sys.stderr` and regardless of `TF_CPP_MIN_LOG_LEVEL`. They drown
the one-line errors of the `vitkit` command and the output of scripts. While Keras is imported,
descriptor 2 is parked in a temporary file; the known notices are dropped and anything else
is written back. `VITKIT_TF_NOTICES=1` leaves the import alone.

Before Keras (and so JAX) is imported, `vitkit._xla_cpu` may choose XLA:CPU's scheduler for
small hosts; XLA reads its flags only once.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

from vitkit import _xla_cpu

NOTICES = re.compile(
    r"(All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|cpu_feature_guard\.cc"
    r"|^To enable the following instructions:.*rebuild TensorFlow"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|TF-TRT Warning)"
)


def configured_backend() -> str:
    """The backend Keras will take: `KERAS_BACKEND`, else the one keras.json names, else
    TensorFlow (Keras' default)."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    try:
        with open(os.path.join(keras_home, "keras.json")) as f:
            return str(json.load(f).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def _pick_installed_backend():
    """With no `KERAS_BACKEND`, Keras takes the backend keras.json names, TensorFlow by default
    (and writes that file on its first import), even where only JAX or torch is installed: its
    import then fails. If the backend it would take is not installed, take one that is."""
    import importlib.util

    if os.environ.get("KERAS_BACKEND"):
        return
    configured = configured_backend()
    if configured not in ("tensorflow", "jax", "torch"):
        return  # numpy, openvino, ...: Keras' own business
    if importlib.util.find_spec(configured) is not None:
        return
    for backend in ("jax", "torch", "tensorflow"):
        if importlib.util.find_spec(backend) is not None:
            os.environ["KERAS_BACKEND"] = backend
            return


def import_keras():
    """`import keras`, with TensorFlow's start-up notices filtered out of stderr."""
    if "keras" not in sys.modules:
        _pick_installed_backend()
        _xla_cpu.apply_defaults(configured_backend())
    else:  # Keras' import does not start JAX: its flags may still be open
        _xla_cpu.apply_defaults(sys.modules["keras"].backend.backend())
    if "keras" in sys.modules or os.environ.get("VITKIT_TF_NOTICES"):
        import keras  # noqa: F401

        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (some embedded interpreters)
        import keras  # noqa: F401

        return
    with tempfile.TemporaryFile() as parked:
        os.dup2(parked.fileno(), 2)
        try:
            import keras  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            parked.seek(0)
            kept = [
                line
                for line in parked.read().decode(errors="replace").splitlines()
                if not NOTICES.search(line)
            ]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
