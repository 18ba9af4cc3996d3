"""One module per paper, named as vit-pytorch's module. Importing this package registers them."""

from vitkit.models import simple_vit, vit  # noqa: F401
from vitkit.models.base import VitkitModel

__all__ = ["VitkitModel"]
