"""Shared fixtures. The backend is whatever KERAS_BACKEND names (nox sets it per session)."""

import gc
import importlib.util
import os
import sys
import tempfile
import types

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Eager JAX compiles every op for every new shape (~25 ms each on a small CPU): the xdist
# workers and the subprocesses the tests start share one on-disk cache of those programs.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "vitkit-tests-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# The tests' models are tiny: compiling them costs far more than running them, and XLA's
# optimization passes were a quarter of the JAX session (the benchmark measures speed, with
# every optimization on). Set JAX_DISABLE_MOST_OPTIMIZATIONS=0 to test the optimized programs.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the cores: one compute thread each. torch's OpenMP pool spin-waits,
    # and two 2-thread pools on 2 busy cores ran a training step 10x slower than one thread.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    # (XLA stops reading XLA_FLAGS at the first word that is not a `--flag`: a bare
    # `intra_op_parallelism_threads=1` here once hid every flag after it.)
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")


def _torchvision_stand_in():
    """vit_pytorch imports torchvision (for DINO's augmentations) when imported. It has no CPU
    build here, and the numbers we compare never touch it: give it an empty stand-in."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    torchvision = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    torchvision.transforms = transforms
    sys.modules["torchvision"] = torchvision
    sys.modules["torchvision.transforms"] = transforms


_torchvision_stand_in()

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def collect_garbage():
    """Python's garbage collection once per test module: `clear_session` runs it by default,
    and over the heap a JAX worker builds up that took 0.6 s before every test. JAX's
    in-memory programs go too (a worker grew past 6 GB; the disk cache keeps them)."""
    gc.collect()
    if keras.config.backend() == "jax":
        import jax

        jax.clear_caches()


@pytest.fixture(autouse=True)
def fresh_keras_state(collect_garbage):
    """Each test starts from a clean Keras session and a fixed seed."""
    keras.utils.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
