"""vitkit: vision transformers written once in Keras 3, for JAX, PyTorch and TensorFlow.

```python
import os; os.environ["KERAS_BACKEND"] = "jax"   # or "torch", "tensorflow"
import vitkit
model = vitkit.create_model("vit_small_patch16_224", num_classes=10)
```
"""

from vitkit._quiet import import_keras

import_keras()

from vitkit import convert, layers, models  # noqa: E402
from vitkit.exporting import ExportError, export  # noqa: E402
from vitkit.introspect import Extractor, Recorder  # noqa: E402
from vitkit.registry import (  # noqa: E402
    create_model,
    get_spec,
    list_models,
    list_presets,
    register_model,
)
from vitkit.saving import CheckpointError, load_model  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "CheckpointError",
    "ExportError",
    "Extractor",
    "Recorder",
    "convert",
    "create_model",
    "export",
    "get_spec",
    "layers",
    "list_models",
    "list_presets",
    "load_model",
    "models",
    "register_model",
]
