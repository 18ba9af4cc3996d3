"""Import weights from other libraries' checkpoints."""

from vitkit.convert.mapping import (
    Empty,
    Reshaped,
    Transformed,
    as_feature_map,
    channel_norm,
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
    "from_vit_pytorch",
    "vit_pytorch_keys",
]
