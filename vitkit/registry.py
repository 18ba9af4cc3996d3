"""The model registry: every architecture registers itself once and so joins the CLI, the
presets and the whole test harness.

```python
@register_model(tiny=dict(...), presets={"vit_base_patch16_224": dict(...)})
@keras.saving.register_keras_serializable(package="vitkit")
class ViT(VitkitModel): ...
```
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import keras


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows of one architecture.

    Attributes:
        name: the architecture's name, the reference module's name (`"vit"`).
        cls: the model class.
        tiny: the smallest sensible configuration; the tests build it on every backend.
        parity: configurations the parity tests check against vit-pytorch.
        presets: named published sizes, `{preset_name: constructor kwargs}`.
        invalid: `(overrides of tiny, name of the parameter the ValueError must name)` pairs.
        reference: the vit-pytorch class, `"module.Class"` under `vit_pytorch`.
        digits: a configuration suited to the 8x8 digits data (`vitkit train`).
        input_size: `(height, width)` of the images the tests feed a model whose constructor
            names no image size (CvT); `None` for the others (they get their configured size).
        invalid_size: an image size the tiny model must refuse with a clear error; `None`
            for the default, one row more than the tiny model's images.
        any_size: the model takes images of every size (CvT); the tests then check that one
            row more than the tiny model's images runs, instead of expecting an error.
        parity_sizes: `(height, width)` of the parity test's images, one per `parity`
            configuration, for architectures whose constructor takes no `image_size`
            (default: the model's `image_hw`).
        export_gaps: `{format: reason}` for export formats this architecture cannot reach.
    """

    name: str
    cls: type
    tiny: dict
    parity: tuple = ()
    presets: dict = field(default_factory=dict)
    invalid: tuple = ()
    reference: str | None = None
    digits: dict | None = None
    input_size: tuple | None = None
    invalid_size: tuple | None = None
    any_size: bool = False
    parity_sizes: tuple = ()
    export_gaps: dict = field(default_factory=dict)


_MODELS: dict[str, ModelSpec] = {}
_PRESETS: dict[str, str] = {}  # preset name -> architecture name
_KERAS_NAMES: dict[str, type] = {}  # Keras' registered name -> model class


def register_model(
    *,
    tiny: dict,
    parity=(),
    presets: dict | None = None,
    invalid=(),
    name: str | None = None,
    reference: str | None = None,
    digits: dict | None = None,
    input_size: tuple | None = None,
    invalid_size: tuple | None = None,
    any_size: bool = False,
    parity_sizes=(),
    export_gaps: dict | None = None,
):
    """Class decorator that registers an architecture under its module's name."""

    def decorate(cls):
        arch = name or cls.__module__.rsplit(".", 1)[-1]
        if parity_sizes and len(parity_sizes) != len(parity):
            raise ValueError(f"{arch}: give one of `parity_sizes` per `parity` configuration")
        if arch in _MODELS and _MODELS[arch].cls is not cls:
            raise ValueError(f"architecture {arch!r} is registered twice")
        # Keras finds a class by "package>Name" when loading: two classes under one name
        # would load as whichever registered last (vit-pytorch has many `ViT`s).
        keras_name = keras.saving.get_registered_name(cls)
        if _KERAS_NAMES.setdefault(keras_name, cls) is not cls:
            raise ValueError(
                f"{cls.__module__}.{cls.__name__} is registered with Keras as {keras_name!r}, "
                f"as {_KERAS_NAMES[keras_name].__module__}.{cls.__name__} already is: use "
                f'`register_keras_serializable(package="vitkit.{arch}")`.'
            )
        spec = ModelSpec(
            name=arch,
            cls=cls,
            tiny=dict(tiny),
            parity=tuple(dict(c) for c in parity),
            presets={k: dict(v) for k, v in (presets or {}).items()},
            invalid=tuple(invalid),
            reference=reference or f"{arch}.{cls.__name__}",
            digits=dict(digits) if digits is not None else None,
            input_size=tuple(input_size) if input_size is not None else None,
            invalid_size=tuple(invalid_size) if invalid_size is not None else None,
            any_size=any_size,
            parity_sizes=tuple(tuple(size) for size in parity_sizes),
            export_gaps=dict(export_gaps or {}),
        )
        _MODELS[arch] = spec
        for preset in spec.presets:
            if preset in _PRESETS or preset in _MODELS:
                raise ValueError(f"preset name {preset!r} is taken")
            _PRESETS[preset] = arch
        return cls

    return decorate


def _load_all() -> None:
    importlib.import_module("vitkit.models")


def list_models() -> list[str]:
    """Names of every registered architecture (the vit-pytorch module names), sorted."""
    _load_all()
    return sorted(_MODELS)


def list_presets(model: str | None = None) -> list[str]:
    """Names of the named sizes, of every architecture or of `model` alone, sorted."""
    _load_all()
    if model is not None:
        return sorted(get_spec(model).presets)
    return sorted(_PRESETS)


def get_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of an architecture, or of the architecture a preset belongs to."""
    _load_all()
    arch = _PRESETS.get(name, name)
    if arch not in _MODELS:
        known = ", ".join(sorted(_MODELS) + sorted(_PRESETS))
        raise ValueError(f"unknown model or preset {name!r}; known: {known}.")
    return _MODELS[arch]


def spec_of(model) -> ModelSpec | None:
    """The `ModelSpec` whose class `model` is an instance of (None for unregistered models)."""
    _load_all()
    for spec in _MODELS.values():
        if type(model) is spec.cls:
            return spec
    return None


def create_model(name: str, **kwargs):
    """Build an architecture from keyword arguments, or a preset with some of them overridden.

    `create_model("vit_base_patch16_224", num_classes=10)`, or
    `create_model("vit", image_size=32, patch_size=4, num_classes=10, dim=64, depth=2, heads=4,
    mlp_dim=128)`.
    """
    spec = get_spec(name)
    config = {**spec.presets.get(name, {}), **kwargs}
    return spec.cls(**config)
