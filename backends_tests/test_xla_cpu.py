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


def run_python(code, env):
    """`code` in a fresh Python process with `env`; the JSON its last line prints."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def probe(backend, **environ):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", _xla_cpu.SWITCH)}
    env.update(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", **environ)
    return run_python(PROBE, env)


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


HUGE = _xla_cpu.HUGE_PAGES


@pytest.mark.parametrize(
    "environ, cpus, thp, expected",
    [
        ({}, 2, "madvise", HUGE),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
            2,
            "madvise",
            f"glibc.malloc.arena_max=2:{HUGE}",
        ),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, 2, "madvise", None),  # the user's choice
        ({}, 2, "always", None),  # the kernel gives them unasked
        ({}, 2, "never", None),
        ({}, 2, None, None),  # no such kernel setting
        ({}, 16, "madvise", None),  # more cores than measured
        ({"VITKIT_XLA_CPU_DEFAULTS": "1"}, 16, "madvise", HUGE),
        ({"VITKIT_XLA_CPU_DEFAULTS": "0"}, 2, "madvise", None),
    ],
)
def test_the_huge_page_rules(environ, cpus, thp, expected):
    assert _xla_cpu.glibc_tunables_with_defaults(environ, cpus, thp) == expected


MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource
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
    print(json.dumps({"faults_a_run": faults / 10}))
    """
)


def memory_probe(environ):
    return run_python(MEMORY_PROBE, environ)["faults_a_run"]


def test_child_processes_fault_xlas_memory_in_huge_pages():
    """XLA:CPU allocates a program's temporaries at every run, in one block that glibc maps
    fresh (above 32 MiB): 128 MiB here, 32,768 faults of 4 KiB a run. A process started with
    the environment vitkit gives its own children (forced on: the CI host's CPU count may
    differ) takes them in huge pages, where the kernel gives them on request; the same
    program without it shows that the probe measures what it should."""
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", _xla_cpu.SWITCH)}
    child = _xla_cpu.child_environment({**base, _xla_cpu.SWITCH: "1"})
    if not (_xla_cpu.glibc() and _xla_cpu.thp_mode() == "madvise"):
        assert "GLIBC_TUNABLES" not in child  # nothing to ask for here
        return
    assert child["GLIBC_TUNABLES"] == HUGE
    assert memory_probe(child) < 2000
    assert memory_probe({**base, "GLIBC_TUNABLES": ""}) > 16000
