"""Import weights from other libraries' checkpoints."""

from vitkit.convert.mapping import Empty, Reshaped
from vitkit.convert.vit_pytorch import from_vit_pytorch, vit_pytorch_keys

__all__ = ["Empty", "Reshaped", "from_vit_pytorch", "vit_pytorch_keys"]
