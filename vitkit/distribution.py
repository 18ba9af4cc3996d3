"""Data- and model-parallel training of vitkit models through `keras.distribution` (JAX).

Data parallel replicates every weight and splits each batch over the devices. Model (tensor)
parallel also splits the transformer's big kernels over a `"model"` axis of the device mesh,
the way Megatron-LM does (Shoeybi et al. 2019, arXiv:1909.08053, section 3): the projections
*into* the heads and the MLP's hidden layer are split by output unit (column parallel), the
projections *back* to the token width by input unit (row parallel), so each device holds
`1 / model_size` of them and one all-reduce per block joins the partial sums.

vitkit names these layers the same way in every architecture, and the layout map keys on
those names:

| layer | kernel split | bias split |
|---|---|---|
| attention `to_qkv`, `to_q`, `to_k`, `to_v`, `to_kv` (Dense) | `(None, "model")` | `("model",)` |
| attention `to_out` | `("model", None)` | replicated |
| MLP `hidden` | `(None, "model")` | `("model",)` |
| MLP `out` | `("model", None)` | replicated |

A variable whose rank differs from its layout (a convolution under one of those names, as
Twins-SVT's reduced keys and values) or whose split dimension does not divide by the model
axis stays replicated; `TensorParallel.replicated` lists them. CrossFormer's dynamic position
bias (a tiny MLP under `dpb/`) is not split.

```python
import keras
from vitkit import distribution, models

keras.distribution.set_distribution(distribution.model_parallel(model_size=2))
model = models.vit.ViT(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12,
                       heads=6, mlp_dim=1536)   # weights are created sharded
model.compile(...); model.fit(...)             # batches are split over the "batch" axis
```
"""

from __future__ import annotations

import keras

BATCH_AXIS = "batch"
MODEL_AXIS = "model"

COLUMN_PARALLEL = ("to_qkv", "to_q", "to_k", "to_v", "to_kv", "hidden")
ROW_PARALLEL = ("to_out", "out")


def _require_jax(what):
    backend = keras.config.backend()
    if backend != "jax":
        raise ValueError(
            f"{what}: keras.distribution shards training on the JAX backend only "
            f"(KERAS_BACKEND is {backend!r})."
        )


def _alternatives(names):
    return "|".join(names)


def layout_map(device_mesh, model_axis: str = MODEL_AXIS) -> keras.distribution.LayoutMap:
    """A `keras.distribution.LayoutMap` over `device_mesh` for every vitkit transformer's
    attention and MLP kernels (see the module docstring). Variables are matched by path, so
    it serves any vitkit model, and any other model that follows the same names."""
    if model_axis not in device_mesh.axis_names:
        raise ValueError(
            f"`model_axis`: {model_axis!r} is not an axis of the device mesh "
            f"{tuple(device_mesh.axis_names)}."
        )
    column = _alternatives(COLUMN_PARALLEL)
    row = _alternatives(ROW_PARALLEL)
    layouts = keras.distribution.LayoutMap(device_mesh)
    layouts[rf"(.*/)?({column})/kernel"] = (None, model_axis)
    layouts[rf"(.*/)?({column})/bias"] = (model_axis,)
    # CrossFormer's dynamic position bias (`dpb`) is a tiny MLP with an `out` of one unit.
    layouts[rf"(?!.*/dpb/)(.*/)?({row})/kernel"] = (model_axis, None)
    return layouts


class TensorParallel(keras.distribution.ModelParallel):
    """`keras.distribution.ModelParallel` that checks each layout against the variable: one
    of another rank, or whose split dimension does not divide by the mesh axis, is kept
    whole on every device (and listed in `replicated`) instead of failing inside JAX."""

    def __init__(self, *, layout_map, batch_dim_name=BATCH_AXIS, **kwargs):
        super().__init__(layout_map=layout_map, batch_dim_name=batch_dim_name, **kwargs)
        self.replicated = []

    def get_variable_layout(self, variable):
        layout = super().get_variable_layout(variable)
        shape = tuple(variable.shape)
        axes = tuple(layout.axes)
        mesh = dict(zip(self.device_mesh.axis_names, self.device_mesh.shape))
        fits = len(axes) == len(shape) and all(
            axis is None or size % mesh[axis] == 0 for axis, size in zip(axes, shape)
        )
        if fits:
            return layout
        self.replicated.append(variable.path)
        return keras.distribution.TensorLayout([None] * len(shape), self.device_mesh)


def _devices(devices):
    if devices is None:
        return keras.distribution.list_devices()
    return list(devices)


def data_parallel(devices=None) -> keras.distribution.DataParallel:
    """Every weight on every device, each batch split over `devices` (default: all)."""
    _require_jax("data_parallel")
    return keras.distribution.DataParallel(devices=_devices(devices))


def device_mesh(devices=None, model_size: int | None = None) -> keras.distribution.DeviceMesh:
    """A `(batch, model)` mesh over `devices` (default: all) with `model_size` devices on the
    model axis (default: all of them, no data parallelism)."""
    devices = _devices(devices)
    model_size = len(devices) if model_size is None else model_size
    if not isinstance(model_size, int) or model_size < 1 or len(devices) % model_size:
        raise ValueError(
            f"`model_size` must be a positive divisor of the number of devices "
            f"({len(devices)}); got {model_size!r}."
        )
    return keras.distribution.DeviceMesh(
        shape=(len(devices) // model_size, model_size),
        axis_names=(BATCH_AXIS, MODEL_AXIS),
        devices=devices,
    )


def model_parallel(devices=None, model_size: int | None = None) -> TensorParallel:
    """Tensor parallel over a `(batch, model)` mesh (see `device_mesh`): the transformer's
    kernels split over the model axis, batches over the batch axis."""
    _require_jax("model_parallel")
    mesh = device_mesh(devices, model_size)
    return TensorParallel(layout_map=layout_map(mesh), batch_dim_name=BATCH_AXIS)


def distribution_for(mode: str, model_size: int | None = None):
    """`"data"` or `"model"` (the CLI's `--distribute`) as a Keras distribution."""
    if mode == "data":
        return data_parallel()
    if mode == "model":
        return model_parallel(model_size=model_size)
    raise ValueError(f"`distribute` must be 'data' or 'model'; got {mode!r}.")


def variable_shardings(model) -> dict:
    """`{path: axes}` of every variable: for each dimension the mesh axis it is split over,
    or None; read from where its value really lives (JAX). A value on one device is whole."""
    _require_jax("variable_shardings")

    def axes(value):
        spec = getattr(value.sharding, "spec", ())  # a single device's sharding has none
        return tuple(spec) + (None,) * (value.ndim - len(spec))

    return {v.path: axes(v.value) for v in model.variables}
