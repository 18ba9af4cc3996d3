"""One module per paper, named as vit-pytorch's module. Importing this package imports every
module in it, and so registers every architecture."""

import importlib
import pkgutil

from vitkit.models.base import VitkitModel

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["VitkitModel"]
