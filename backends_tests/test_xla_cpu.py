"""XLA:CPU's scheduler default on small hosts (`vitkit._xla_cpu`): the rules, and that a process
that imports vitkit under JAX gets the flag and that both JAX's and TensorFlow's XLA accept it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vitkit import _xla_cpu

TESTED = {"jaxlib": "0.10.2", "tensorflow": "2.21.0"}
FLAG = _xla_cpu.FLAG


@pytest.mark.parametrize(
    "environ, backend, cpus, versions, expected",
    [
        ({}, "jax", 2, TESTED, FLAG),
        ({}, "jax", 1, {"jaxlib": "0.10.0", "tensorflow": None}, FLAG),  # no TensorFlow
        (
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
            "jax",
            2,
            TESTED,
            f"{FLAG} --xla_force_host_platform_device_count=4",
        ),  # added, not replaced
        (
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 stray"},
            "jax",
            2,
            TESTED,
            f"{FLAG} --xla_force_host_platform_device_count=4 stray",
        ),  # first: XLA stops reading at a word that is not a flag
        ({}, "torch", 2, TESTED, None),
        ({}, "tensorflow", 2, TESTED, None),
        ({}, "jax", 16, TESTED, None),  # more cores than measured
        ({"VITKIT_XLA_CPU_DEFAULTS": "1"}, "jax", 16, TESTED, FLAG),
        ({"VITKIT_XLA_CPU_DEFAULTS": "0"}, "jax", 2, TESTED, None),
        (
            {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"},
            "jax",
            2,
            TESTED,
            None,
        ),  # the user's choice
        (
            {"XLA_FLAGS": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"},
            "jax",
            2,
            TESTED,
            None,
        ),
        ({}, "jax", 2, {"jaxlib": None, "tensorflow": None}, None),
        ({}, "jax", 2, {"jaxlib": "0.9.1", "tensorflow": None}, None),  # not checked: unknown
        ({}, "jax", 2, {"jaxlib": "0.11.0", "tensorflow": None}, None),
        ({}, "jax", 2, {"jaxlib": "0.10.2", "tensorflow": "2.20.0"}, None),
        ({}, "jax", 2, {"jaxlib": "0.10.2", "tensorflow": "unknown"}, None),
        (
            {"VITKIT_XLA_CPU_DEFAULTS": "1"},
            "jax",
            2,
            {"jaxlib": "0.12.0", "tensorflow": None},
            None,
        ),  # forcing does not override the version check
    ],
)
def test_the_rules(environ, backend, cpus, versions, expected):
    assert _xla_cpu.xla_flags_with_defaults(environ, backend, cpus, versions) == expected


def test_release_parses_versions():
    assert _xla_cpu.release("0.10.2") == (0, 10)
    assert _xla_cpu.release("2.21.0rc1") == (2, 21)
    assert _xla_cpu.release("unknown") is None
    assert _xla_cpu.release(None) is None


PROBE = textwrap.dedent(
    """
    import json, os
    import vitkit
    flags = os.environ.get("XLA_FLAGS", "")
    import jax, jax.numpy as jnp
    out = {"flags": flags, "jax": float(jax.jit(lambda x: (x @ x).sum())(jnp.ones((4, 4))))}
    import tensorflow as tf
    product = tf.function(lambda x: tf.reduce_sum(x @ x), jit_compile=True)
    out["tensorflow"] = float(product(tf.ones((4, 4))))
    print(json.dumps(out))
    """
)


def probe(backend, **environ):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", _xla_cpu.SWITCH)}
    env.update(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", **environ)
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_jax_process_gets_the_flag_and_both_xlas_accept_it():
    """Forced on (the CI host's CPU count may differ): where the installed releases are ones
    known to have the flag it goes first, and JAX's and TensorFlow's XLA compile with it
    (an unknown flag would abort the process)."""
    out = probe(
        "jax", VITKIT_XLA_CPU_DEFAULTS="1", XLA_FLAGS="--xla_force_host_platform_device_count=1"
    )
    versions = _xla_cpu.installed_versions()
    known = _xla_cpu.xla_flags_with_defaults({_xla_cpu.SWITCH: "1"}, "jax", 1, versions)
    expected = (f"{FLAG} " if known else "") + "--xla_force_host_platform_device_count=1"
    assert out["flags"] == expected
    assert out["jax"] == out["tensorflow"] == 64.0


def test_other_backends_leave_xla_flags_alone():
    out = probe("torch", VITKIT_XLA_CPU_DEFAULTS="1")
    assert out["flags"] == ""
    assert out["jax"] == 64.0


@pytest.mark.parametrize(
    "environ, backend, cpus, expected",
    [
        ({}, "jax", 2, _xla_cpu.MALLOC_OPTIONS),
        ({}, "jax", 16, None),  # more cores than measured
        ({"VITKIT_XLA_CPU_DEFAULTS": "1"}, "jax", 16, _xla_cpu.MALLOC_OPTIONS),
        ({"VITKIT_XLA_CPU_DEFAULTS": "0"}, "jax", 2, None),
        ({}, "torch", 2, None),
        ({}, "tensorflow", 2, None),
    ],
)
def test_the_malloc_rules(environ, backend, cpus, expected):
    assert _xla_cpu.malloc_options_with_defaults(environ, backend, cpus) == expected


MALLOC_PROBE = textwrap.dedent(
    """
    import json, resource
    import vitkit
    import jax, jax.numpy as jnp
    x, w, v = jnp.ones((16384, 256)), jnp.ones((256, 1024)) / 256, jnp.ones((1024, 8))
    # two products: the first one's 64 MiB result, and its tanh, are the program's temporaries
    step = jax.jit(lambda x, w, v: jnp.sum(jnp.tanh(x @ w) @ v, axis=0))
    for _ in range(3):
        step(x, w, v).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step(x, w, v).block_until_ready()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    mib = faults * resource.getpagesize() / 10 / 2**20
    print(json.dumps({"applied": vitkit._xla_cpu.APPLIED, "mib_a_run": mib}))
    """
)


def malloc_probe(backend, switch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    env.update(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", VITKIT_XLA_CPU_DEFAULTS=switch)
    result = subprocess.run(
        [sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_xla_cpu.glibc() is None, reason="mallopt is glibc's; elsewhere nothing is set")
def test_xla_keeps_its_memory_between_runs_under_jax():
    """XLA:CPU allocates a program's temporaries at every run, in one block; above 32 MiB glibc
    maps it fresh and the run faults every page in again. With vitkit's malloc options the
    block freed by one run serves the next: after the first runs, less than 8 MiB a run is
    faulted in. Without them (the switch at 0) the 128 MiB of temporaries are, every run,
    which shows that the probe measures what it should."""
    kept = malloc_probe("jax", "1")
    assert kept["applied"]["malloc"] is True
    assert kept["mib_a_run"] < 8, kept
    fresh = malloc_probe("jax", "0")
    assert fresh["applied"]["malloc"] is False
    assert fresh["mib_a_run"] > 64, fresh


def test_other_backends_leave_malloc_alone():
    assert malloc_probe("torch", "1")["applied"] == {"xla_flags": False, "malloc": False}
