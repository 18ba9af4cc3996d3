"""Import weights from other libraries' checkpoints."""

from vitkit.convert.mapping import Empty
from vitkit.convert.vit_pytorch import from_vit_pytorch, vit_pytorch_keys

__all__ = ["Empty", "from_vit_pytorch", "vit_pytorch_keys"]
