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

# Strings a string argument is set to: the choices of the arguments that take them, and ones
# that no argument takes.
CHOICES = {
    "pool": ("cls", "mean"),
    "data_format": ("channels_last", "channels_first"),
    "positional_embedding": ("sine", "learnable", "none"),
}
STRINGS = tuple(s for choices in CHOICES.values() for s in choices)
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


# Mutations by the type of the value in the tiny config (or the default). Half the draws keep
# to plausible values (sizes near the tiny ones, known strings, tuples of the same length), so
# that enough of them build; the other half may also give nonsense. Sizes stay near the tiny
# value (at most twice it, plus 3), so no draw builds anything large.


def near_int(value: int):
    return st.integers(max(1, value - 2), max(value * 2, value + 3))


def int_mutations(value: int, plausible: bool):
    if plausible:
        return near_int(value)
    return st.one_of(
        near_int(value),
        st.sampled_from([0, -1, -value - 1]),  # not positive
        st.sampled_from([value + 0.5, float(value), str(value), None, True]),  # not an int
    )


def float_mutations(value: float, plausible: bool):
    rates = st.sampled_from([0.0, 0.1, 0.25, 0.5])
    if plausible:
        return rates
    return st.one_of(rates, st.sampled_from([-0.1, 1.0, 1.5, 4.0, 0, -1, math.nan, "0.1", None]))


def string_mutations(value: str, plausible: bool):
    return st.sampled_from([s for s in STRINGS + (() if plausible else BAD_STRINGS) if s != value])


def tuple_mutations(value: tuple, plausible: bool):
    """One element changed as its type would be, or the tuple reversed; else also one element
    dropped or repeated, none left, or one of its elements instead of the tuple."""
    n = len(value)
    if not n:
        return st.just((1,))
    element = st.integers(0, n - 1).flatmap(lambda i: element_mutation(value, i, plausible))
    if plausible:
        return st.one_of(element, st.just(value[::-1]))
    return st.one_of(
        element,
        st.sampled_from([value[:-1], value + value[-1:], ()]),
        st.sampled_from(list(value)),  # a scalar instead of the tuple
    )


def element_mutation(value: tuple, i: int, plausible: bool):
    return mutations(value[i], plausible).map(lambda v: value[:i] + (v,) + value[i + 1 :])


def dict_mutations(value: dict, plausible: bool):
    """A nested layer config (EfficientViT's `transformer`): one of its entries changed, or
    not a layer at all."""
    config = value.get("config", {})
    if not config:
        return st.sampled_from(["transformer", {}, None, 3])
    entry = st.sampled_from(sorted(config)).flatmap(
        lambda k: mutations(config[k], plausible).map(
            lambda v: {**value, "config": {**config, k: v}}
        )
    )
    if plausible:
        return entry
    return st.one_of(entry, st.sampled_from(["transformer", {}, None, 3]))


def mutations(value, plausible: bool):
    if isinstance(value, bool):
        return st.sampled_from([not value] if plausible else [not value, 0, "yes", None])
    if isinstance(value, int):
        return int_mutations(value, plausible)
    if isinstance(value, float):
        return float_mutations(value, plausible)
    if isinstance(value, str):
        return string_mutations(value, plausible)
    if isinstance(value, (tuple, list)):
        return tuple_mutations(tuple(value), plausible)
    if isinstance(value, dict):
        return dict_mutations(value, plausible)
    if value is None:  # an optional argument: set it, or give it nonsense
        if plausible:
            return st.integers(1, 6)
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
    plausible = draw(st.booleans(), label="plausible")
    config = dict(spec.tiny)
    for arg in names:
        if plausible and arg in CHOICES:
            config[arg] = draw(st.sampled_from(CHOICES[arg]), label=arg)
        else:
            config[arg] = draw(mutations(base[arg], plausible), label=arg)
    return config, names


def forward(model, x):
    """The model's outputs for `x`, as numpy. On JAX, one jitted program: eager JAX compiles
    every op for every new shape, 6 to 20 s per draw here against about 1 s."""
    if BACKEND != "jax":
        return [as_numpy(t) for t in keras.tree.flatten(model(x))]
    import jax

    model.build(x.shape)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    y = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x)[0])(trainable, non_trainable, x)
    return [as_numpy(t) for t in keras.tree.flatten(y)]


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
        (y, *_) = forward(model, x)
        num_classes = config.get("num_classes", 1000)
        # `num_classes=0` (ViT): no head, the encoder's tokens come out.
        assert y.shape[0] == 2 and (num_classes == 0 or y.shape == (2, num_classes)), y.shape
        assert np.isfinite(y).all(), f"{name}{config}: non-finite outputs"
        counts["built"] += 1

    if SEED is not None:
        check = seed(int(SEED))(check)
    check()
