"""Import weights from other libraries' checkpoints."""

from vitkit.convert.mapping import (
    Empty,
    Ignored,
    OutputSlice,
    Pointwise,
    Reshaped,
    Transformed,
    as_feature_map,
    channel_layer_norm,
    channel_norm,
    feature_map_names,
    pointwise_conv,
)
from vitkit.convert.vit_pytorch import from_vit_pytorch, vit_pytorch_keys

__all__ = [
    "Empty",
    "Reshaped",
    "Transformed",
    "as_feature_map",
    "channel_norm",
    "pointwise_conv",
    "Ignored",
    "OutputSlice",
    "Pointwise",
    "Reshaped",
    "channel_layer_norm",
    "feature_map_names",
    "from_vit_pytorch",
    "vit_pytorch_keys",
]
