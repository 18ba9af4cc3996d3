"""Import weights from other libraries' checkpoints."""

from vitkit.convert.mapping import (
    Empty,
    Ignored,
    OutputSlice,
    Pointwise,
    Reshaped,
    channel_layer_norm,
    feature_map_names,
)
from vitkit.convert.vit_pytorch import from_vit_pytorch, vit_pytorch_keys

__all__ = [
    "Empty",
    "Ignored",
    "OutputSlice",
    "Pointwise",
    "Reshaped",
    "channel_layer_norm",
    "feature_map_names",
    "from_vit_pytorch",
    "vit_pytorch_keys",
]
