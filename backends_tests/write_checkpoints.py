"""Write a checkpoint of every registered model on the current backend, with the outputs it
gives, for the tests that load it on another backend (`test_checkpoints.py`).

    KERAS_BACKEND=torch python -m backends_tests.write_checkpoints OUTDIR [--models vit,cait]
        [--no-weights]

For each model: `OUTDIR/<name>.keras`, `OUTDIR/<name>.weights.h5` (unless `--no-weights`) and
`OUTDIR/<name>.npz` with the inputs (`inputs`), every flattened output in inference mode
(`output_0`, `output_1`, ...) and where they came from (`backend`, `keras_version`,
`vitkit_version`). Every weight is drawn at random (no default initialization survives, so a
weight loaded into the wrong place, or a BatchNorm statistic left at its default, changes the
outputs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import keras
import numpy as np

import vitkit

BATCH = 2
SEED = 0


def randomize(model, seed: int = SEED, scale: float = 0.2) -> None:
    """Every floating-point variable drawn at random; variances stay positive. Integer state
    (seed generators, index tables) stays as it is."""
    rng = np.random.default_rng(seed)
    for v in model.variables:
        if not keras.backend.is_float_dtype(v.dtype):
            continue
        if "variance" in v.path:
            value = rng.uniform(0.5, 1.5, size=v.shape)
        else:
            value = rng.normal(scale=scale, size=v.shape)
        v.assign(value.astype(v.dtype))


def flat_outputs(model, x) -> list[np.ndarray]:
    """Every output of an inference-mode forward pass, as float32 numpy. `predict_on_batch`
    compiles the whole pass on JAX: one program per model instead of one per op (a tenth of
    the time of the eager pass there, cold cache)."""
    ys = keras.tree.flatten(model.predict_on_batch(x))
    return [np.asarray(y).astype("float32") for y in ys]


def write(name: str, outdir: Path, weights: bool = True) -> None:
    """The three files of model `name` (tiny config) in `outdir`."""
    # helpers imports nothing from the test session: safe to use from this script.
    from backends_tests.helpers import random_images

    keras.utils.clear_session(free_memory=False)
    keras.utils.set_random_seed(SEED)
    spec = vitkit.get_spec(name)
    model = spec.cls(**spec.tiny).build_default()
    randomize(model)
    x = random_images(model, BATCH, seed=SEED)
    ys = flat_outputs(model, x)
    model.save(outdir / f"{name}.keras")
    if weights:
        model.save_weights(outdir / f"{name}.weights.h5")
    np.savez(
        outdir / f"{name}.npz",
        inputs=x,
        backend=keras.config.backend(),
        keras_version=keras.__version__,
        vitkit_version=vitkit.__version__,
        **{f"output_{i}": y for i, y in enumerate(ys)},
    )


def stored_outputs(npz) -> list[np.ndarray]:
    """The outputs an `.npz` written here holds, in order."""
    count = sum(1 for key in npz.files if key.startswith("output_"))
    return [npz[f"output_{i}"] for i in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--models", help="comma-separated names (default: every model)")
    parser.add_argument("--no-weights", action="store_true", help="no .weights.h5 files")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else vitkit.list_models()
    args.outdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name in names:
        write(name, args.outdir, weights=not args.no_weights)
    print(
        f"{len(names)} checkpoints on {keras.config.backend()} in "
        f"{time.perf_counter() - start:.1f} s -> {os.fspath(args.outdir)}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
