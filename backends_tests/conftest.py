"""Shared fixtures. The backend is whatever KERAS_BACKEND names (nox sets it per session)."""

import importlib.util
import os
import sys
import types

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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


@pytest.fixture(autouse=True)
def fresh_keras_state():
    """Each test starts from a clean Keras session and a fixed seed."""
    keras.utils.clear_session()
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
