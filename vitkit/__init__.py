"""vitkit: vision transformers written once in Keras 3, for JAX, PyTorch and TensorFlow.

```python
import os; os.environ["KERAS_BACKEND"] = "jax"   # or "torch", "tensorflow"
import vitkit
model = vitkit.create_model("vit_small_patch16_224", num_classes=10)
```
"""

import importlib

__version__ = "0.1.0"

# Attributes are loaded on first use (PEP 562), so that `import vitkit.cli` does not import
# Keras and its backend before the command has had a chance to quiet the backend's start-up.
_LAZY = {
    "convert": ("vitkit.convert", None),
    "layers": ("vitkit.layers", None),
    "models": ("vitkit.models", None),
    "ExportError": ("vitkit.exporting", "ExportError"),
    "export": ("vitkit.exporting", "export"),
    "create_model": ("vitkit.registry", "create_model"),
    "get_spec": ("vitkit.registry", "get_spec"),
    "list_models": ("vitkit.registry", "list_models"),
    "list_presets": ("vitkit.registry", "list_presets"),
    "register_model": ("vitkit.registry", "register_model"),
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'vitkit' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
