"""Import weights from other libraries' checkpoints."""

from vitkit.convert.mapping import (
    Empty,
    Ignored,
    OutputSlice,
    Pointwise,
    Reshaped,
    Transformed,
    as_feature_map,
    channel_norm,
)
from vitkit.convert.vit_pytorch import from_vit_pytorch, vit_pytorch_keys

__all__ = [
    "Empty",
    "Ignored",
    "OutputSlice",
    "Pointwise",
    "Reshaped",
    "Transformed",
    "as_feature_map",
    "channel_norm",
    "from_vit_pytorch",
    "vit_pytorch_keys",
]
