"""Fuzzed configurations: every registered model, given random constructor arguments (valid and
invalid), either builds a model whose forward pass gives finite outputs of the right shape, or
refuses the configuration with a ValueError or TypeError that names one of the changed arguments
(as `name`, in backticks). Any other exception, or an error that names none of them (a shape
error from deep inside Keras), fails the test.

Each draw starts from the model's `tiny` registry configuration and changes one to three of its
constructor arguments. `pytest -s` prints how many draws each model built and refused.
"""

from __future__ import annotations

import math
import os

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import vitkit
from backends_tests.helpers import BACKEND, as_numpy, random_images
from vitkit.layers.utils import constructor_args

MODELS = vitkit.list_models()
# Draws per model, the same ones every run. To hunt for new failures locally, draw more
# (VITKIT_FUZZ_EXAMPLES=200) or other ones (VITKIT_FUZZ_SEED=1).
MAX_EXAMPLES = int(os.environ.get("VITKIT_FUZZ_EXAMPLES", "12"))
SEED = os.environ.get("VITKIT_FUZZ_SEED")

# Strings a string argument is set to: the choices some argument takes, and ones none does.
STRINGS = ("cls", "mean", "sine", "learnable", "none", "channels_first", "channels_last")
BAD_STRINGS = ("max", "bogus", "")

# {model: {"built": n, "refused": n}}, printed when the module ends.
COUNTS: dict[str, dict[str, int]] = {}


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    if COUNTS:
        print(f"\nfuzzed configurations on {BACKEND} (draws built / refused):")
        for name, c in sorted(COUNTS.items()):
            print(f"  {name:24s} {c['built']:3d} built  {c['refused']:3d} refused")
        total = {k: sum(c[k] for c in COUNTS.values()) for k in ("built", "refused")}
        print(f"  {'total':24s} {total['built']:3d} built  {total['refused']:3d} refused")


def defaults(cls) -> dict:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return {
        name: params[name].default
        for name in constructor_args(cls)
        if params[name].default is not inspect.Parameter.empty
    }


# Mutations by the type of the value in the tiny config (or the default). Sizes stay near the
# tiny value (at most twice it, plus 3), so no draw builds anything large.


def near_int(value: int):
    low = max(1, value - 2)
    high = max(value * 2, value + 3)
    return st.integers(low, high)


def int_mutations(value: int):
    return st.one_of(
        near_int(value),  # valid, mostly (twice: as likely as the invalid draws)
        near_int(value),
        st.sampled_from([0, -1, -value - 1]),  # not positive
        st.sampled_from([value + 0.5, float(value), str(value), None, True]),  # not an int
    )


def float_mutations(value: float):
    return st.one_of(
        st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.5, 2.0, 4.0]),
        st.sampled_from([-0.1, 1.0, 0, -1, math.nan, "0.1", None]),
    )


def tuple_mutations(value: tuple):
    """Each element changed as its type would be; one element dropped or repeated; the tuple
    given as one of its elements; an element zeroed."""
    n = len(value)
    options = [
        st.sampled_from([value[:-1], value + value[-1:], ()]) if n else st.just((1,)),
    ]
    if n:
        options.append(st.integers(0, n - 1).flatmap(lambda i: element_mutation(value, i)))
        options.append(st.sampled_from(list(value)))  # a scalar instead of the tuple
        options.append(st.just(value[::-1]))
    return st.one_of(*options)


def element_mutation(value: tuple, i: int):
    return mutations(value[i]).map(lambda v: value[:i] + (v,) + value[i + 1 :])


def dict_mutations(value: dict):
    """A nested layer config (EfficientViT's `transformer`): one of its entries changed, or not
    a layer at all."""
    config = value.get("config", {})
    options = [st.sampled_from(["transformer", {}, None, 3])]
    if config:
        options.append(
            st.sampled_from(sorted(config)).flatmap(
                lambda k: mutations(config[k]).map(lambda v: {**value, "config": {**config, k: v}})
            )
        )
    return st.one_of(*options)


def mutations(value):
    if isinstance(value, bool):
        return st.sampled_from([not value, 0, "yes", None])
    if isinstance(value, int):
        return int_mutations(value)
    if isinstance(value, float):
        return float_mutations(value)
    if isinstance(value, str):
        return st.sampled_from([s for s in STRINGS + BAD_STRINGS if s != value])
    if isinstance(value, (tuple, list)):
        return tuple_mutations(tuple(value))
    if isinstance(value, dict):
        return dict_mutations(value)
    if value is None:  # an optional argument: set it, or give it nonsense
        return st.one_of(st.integers(-1, 6), st.sampled_from(["bogus", 1.5, (2, 2)]))
    return st.just(None)


@st.composite
def configs(draw, name):
    """(config, names of the changed arguments)."""
    spec = vitkit.get_spec(name)
    base = {**defaults(spec.cls), **spec.tiny}
    names = draw(
        st.lists(st.sampled_from(constructor_args(spec.cls)), min_size=1, max_size=3, unique=True)
    )
    config = dict(spec.tiny)
    for arg in names:
        config[arg] = draw(mutations(base[arg]), label=arg)
    return config, names


def names_one_of(message: str, names) -> bool:
    return any(f"`{n}`" in message for n in names)


@pytest.mark.parametrize("name", MODELS)
def test_fuzzed_configuration_builds_or_names_the_argument(name):
    counts = COUNTS.setdefault(name, {"built": 0, "refused": 0})
    cls = vitkit.get_spec(name).cls

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=SEED is None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(configs(name))
    def check(drawn):
        config, changed = drawn
        keras.utils.clear_session(free_memory=False)
        try:
            model = cls(**config)
        except (ValueError, TypeError) as err:
            assert names_one_of(str(err), changed), (
                f"{name}({changed} changed): the error names none of {changed}: {err}"
            )
            counts["refused"] += 1
            return
        x = random_images(model, 2)
        (y, *_) = [as_numpy(t) for t in keras.tree.flatten(model(x))]
        num_classes = config.get("num_classes", 1000)
        # `num_classes=0` (ViT): no head, the encoder's tokens come out.
        assert y.shape[0] == 2 and (num_classes == 0 or y.shape == (2, num_classes)), y.shape
        assert np.isfinite(y).all(), f"{name}{config}: non-finite outputs"
        counts["built"] += 1

    if SEED is not None:
        check = seed(int(SEED))(check)
    check()
