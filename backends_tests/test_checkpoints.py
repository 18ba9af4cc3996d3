"""Checkpoints across backends and releases.

Each backend writes a checkpoint of every model (`write_checkpoints.py`, in a subprocess with
its KERAS_BACKEND); this session's backend loads all of them. The session of backend B checks
X -> B for every X: the three CI sessions together cover all nine pairs. The files under
`legacy/` were written by an earlier release (`legacy/make_legacy.py`) and must still load.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from filelock import FileLock, Timeout

import vitkit
from backends_tests.helpers import BACKEND
from backends_tests.write_checkpoints import flat_outputs, stored_outputs

BACKENDS = ("jax", "torch", "tensorflow")
MODELS = vitkit.list_models()
REPO = Path(__file__).resolve().parent.parent
LEGACY = Path(__file__).resolve().parent / "legacy"
LEGACY_FILES = sorted(LEGACY.glob("*/*/*.keras"))  # legacy/<release>/<backend>/<name>.keras


def write_checkpoints(backend: str, outdir: Path) -> None:
    """Every model's checkpoint written by `backend`, in a subprocess."""
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "backends_tests.write_checkpoints", str(outdir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, f"the {backend} writer failed:\n{result.stderr[-5000:]}"
    print(f"{backend} wrote checkpoints in {time.perf_counter() - start:.1f} s")


def source_key() -> str:
    """A digest of what decides the checkpoints' contents: vitkit's source, the writer, and
    the versions of Keras and the backends (a cached folder written by other code is never
    reused)."""
    versions = []
    for package in ("keras", "jax", "jaxlib", "torch", "tensorflow", "tensorflow-cpu"):
        try:
            versions.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} absent")
    digest = hashlib.sha256(";".join(versions).encode())
    files = sorted((REPO / "vitkit").rglob("*.py")) + [
        Path(__file__).with_name("write_checkpoints.py")
    ]
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory) -> dict[str, Path]:
    """{backend: folder of its checkpoints}, shared by the xdist workers of one run: each
    folder is written once, by whichever worker takes its lock first. A first pass takes the
    free locks without waiting (so two workers split the three writers), a second waits for
    the rest; a `done` file marks a complete folder.

    With `VITKIT_CHECKPOINT_CACHE` (nox sets it to a folder under `.nox/`), the folders are
    kept there, under a digest of the source, and reused by the next session: the first
    backend's session writes all three, the others load them."""
    cache = os.environ.get("VITKIT_CHECKPOINT_CACHE")
    if cache:
        root = Path(cache) / source_key()
    else:
        base = tmp_path_factory.getbasetemp()
        # An xdist worker's base is `<run>/popen-gwN`: its parent is the run's, shared by the
        # workers. Without xdist the base is the run's own (its parent holds every past run).
        run = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
        root = run / "checkpoints-written-by-each-backend"
    root.mkdir(parents=True, exist_ok=True)
    dirs = {backend: root / backend for backend in BACKENDS}

    def write_unless_done(backend, lock):
        with lock:
            if not (dirs[backend] / "done").exists():
                write_checkpoints(backend, dirs[backend])
                (dirs[backend] / "done").touch()

    for blocking in (False, True):
        for backend in BACKENDS:
            lock = FileLock(str(root / f"{backend}.lock"), timeout=-1 if blocking else 0)
            try:
                write_unless_done(backend, lock)
            except Timeout:
                continue  # another worker is writing it: the blocking pass waits for it
    return dirs


def check_outputs(model, npz, what: str) -> None:
    expected = stored_outputs(npz)
    actual = flat_outputs(model, npz["inputs"])
    assert len(actual) == len(expected), what
    for i, (a, b) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{what}, output {i}")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("writer", BACKENDS)
def test_keras_file_from_each_backend(checkpoint_dirs, writer, name):
    folder = checkpoint_dirs[writer]
    model = keras.saving.load_model(folder / f"{name}.keras", safe_mode=True)
    assert type(model) is vitkit.get_spec(name).cls
    check_outputs(model, np.load(folder / f"{name}.npz"), f"{name}.keras {writer} -> {BACKEND}")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("writer", BACKENDS)
def test_weights_file_from_each_backend(checkpoint_dirs, writer, name):
    folder = checkpoint_dirs[writer]
    spec = vitkit.get_spec(name)
    model = spec.cls(**spec.tiny).build_default()
    model.load_weights(folder / f"{name}.weights.h5")
    what = f"{name}.weights.h5 {writer} -> {BACKEND}"
    check_outputs(model, np.load(folder / f"{name}.npz"), what)


@pytest.mark.parametrize("path", LEGACY_FILES, ids=lambda p: "/".join(p.parts[-3:]))
def test_legacy_keras_file_loads(path):
    """A checkpoint an earlier release wrote still loads and gives the outputs it gave."""
    model = keras.saving.load_model(path, safe_mode=True)
    check_outputs(model, np.load(path.with_suffix(".npz")), f"{path} -> {BACKEND}")


def test_legacy_files_from_every_backend():
    """Every release folder under `legacy/` holds files from each backend, each with its
    outputs (a folder missing from a clean clone fails here, not silently)."""
    releases = sorted(p for p in LEGACY.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert releases, f"no legacy checkpoints under {LEGACY}"
    for release in releases:
        for backend in BACKENDS:
            files = sorted((release / backend).glob("*.keras"))
            assert files, f"no legacy checkpoints from {backend} in {release}"
            for path in files:
                assert path.with_suffix(".npz").exists(), f"{path} has no stored outputs"
