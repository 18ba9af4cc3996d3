"""XLA:CPU's scheduler, and glibc's malloc options, on small CPU hosts, set before JAX starts.

XLA:CPU orders a compiled program for concurrency by default: independent operations run side
by side on its thread pool. On a host with one or two CPUs every matrix product already uses
all of them, so running others beside it only makes them contend, and the extra buffers kept
alive raise the peak memory. Turning the concurrency-optimised scheduler off there gave, on a
2-vCPU AMD EPYC with jax 0.10.2 (docs/performance.md has the runs):

- CvT-13's training step at batch 8: 1121 -> 1017 ms (vitkit's train_on_batch, median of 6);
  against vit-pytorch in the same bench run, 0.86x -> 0.97x; inference 1.21x -> 1.47x at
  batch 8; peak RSS 3513 -> 3059 MiB.
- ViT-S/16: unchanged (within the runs' spread), as is TensorFlow's XLA (which reads the same
  variable).

XLA reads `XLA_FLAGS` once, when JAX's backend starts, and refuses to start on a flag it does
not know. So vitkit puts `--xla_cpu_enable_concurrency_optimized_scheduler=false` first in
`XLA_FLAGS` (XLA stops reading the variable at the first word that is not a `--flag`, so a
stray word in a user's flags cannot hide it) while it is imported, before any JAX
computation, and only where all of these hold:

- Keras' backend is JAX;
- the host gives this process at most `MAX_CPUS` CPUs (the size measured; more cores may
  profit from concurrency);
- `XLA_FLAGS` does not already choose a CPU scheduler;
- every installed XLA that reads `XLA_FLAGS` (jaxlib, and TensorFlow, which a child process
  or an export may start) is a release known to have the flag (`KNOWN_RELEASES`).

`VITKIT_XLA_CPU_DEFAULTS=0` leaves `XLA_FLAGS` alone; `=1` adds the flag whatever the CPU
count (the version and user-choice checks still apply).

XLA:CPU's working memory, kept by glibc's malloc
------------------------------------------------
XLA:CPU (jaxlib 0.10) allocates one block for all of a compiled program's temporaries each
time the program runs, and frees it after. A training step's block is large (ViT-S/16 at
batch 8: 719 MiB). glibc's malloc serves a block above 32 MiB (the most its `mmap` threshold
may be) with a fresh `mmap` and gives it back with `munmap`, so every step faulted the whole
block in again, page by page, with the kernel zeroing each page: 201,000 page faults (785
MiB) a step, about 130 ms of an 800 ms ViT-S/16 step on a 2-vCPU AMD EPYC. TensorFlow's
allocator keeps its memory between steps (no faults), and torch's tensors stay below the
threshold (26 MiB of faults a step).

So, under the same rules as the flag above (JAX; at most `MAX_CPUS` CPUs unless the switch
says `1`; `0` leaves it alone; JAX not started yet), vitkit asks glibc (`mallopt`) to:

- serve large blocks from its heap rather than with `mmap` (`M_MMAP_MAX` 0);
- keep up to 2 GiB of freed memory at the top of the heap rather than hand it back to the
  system (`M_TRIM_THRESHOLD`), so the next step's block is the same, already mapped, memory;
- give every thread the main heap (`M_ARENA_MAX` 1): XLA allocates the block on one of its
  worker threads, and glibc's other heaps are at most 64 MiB, too small, so they would fall
  back to `mmap`.

The step: 798 -> 667 ms, no page faults. The cost: freed memory up to 2 GiB stays with the
process (its resident size stays at its peak, as with jemalloc or tcmalloc), and threads share
one heap's lock. On other C libraries (musl, macOS, Windows) nothing is changed. A process
that started JAX, or other threads, before importing vitkit may not get the main heap for
XLA's threads; `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647` in
the environment does the same from the process's start.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import re
import sys

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# A user's own choice of either scheduler flag wins.
USER_CHOICE = re.compile(r"--xla_cpu_(enable_concurrency_optimized_scheduler|scheduler_type)\b")
MAX_CPUS = 2
SWITCH = "VITKIT_XLA_CPU_DEFAULTS"

# Releases checked to know the flag: [first, end) as (major, minor). Each XLA aborts on an
# unknown flag, so a release outside its window gets nothing until someone checks it.
KNOWN_RELEASES = {
    "jaxlib": ((0, 10), (0, 11)),
    "tensorflow": ((2, 21), (2, 22)),
}
TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos")


def release(version: str | None):
    """'0.10.2' -> (0, 10); None where there is no version or it does not parse."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def installed_versions() -> dict:
    """{"jaxlib": version or None, "tensorflow": version or None or "unknown"}: None where it is
    not installed, "unknown" where it imports but no distribution says its version."""
    versions = {"jaxlib": None, "tensorflow": None}
    if importlib.util.find_spec("jaxlib") is not None:
        versions["jaxlib"] = _distribution_version(("jaxlib",)) or "unknown"
    if importlib.util.find_spec("tensorflow") is not None:
        versions["tensorflow"] = _distribution_version(TENSORFLOW_DISTRIBUTIONS) or "unknown"
    return versions


def _distribution_version(names) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def flags_first(flags: str, current: str) -> str:
    """`flags` put before the `XLA_FLAGS` value `current`: XLA stops reading the variable at
    the first word that is not a `--flag`, so a stray word there cannot hide them."""
    return f"{flags} {current}".strip()


def xla_flags_with_defaults(environ, backend: str, cpus: int, versions: dict) -> str | None:
    """The `XLA_FLAGS` value vitkit would set, or None to leave it as it is (see the module's
    docstring for the rules)."""
    switch = environ.get(SWITCH, "").strip()
    if switch == "0" or backend != "jax":
        return None
    current = environ.get("XLA_FLAGS", "")
    if USER_CHOICE.search(current):
        return None
    if cpus > MAX_CPUS and switch != "1":
        return None
    if versions.get("jaxlib") is None:
        return None
    for package, version in versions.items():
        if version is None and package != "jaxlib":
            continue  # not installed: nothing to break
        first, end = KNOWN_RELEASES[package]
        found = release(version)
        if found is None or not first <= found < end:
            return None
    return flags_first(FLAG, current)


def _jax_started() -> bool:
    """Whether JAX's backends are already up (then XLA has read its flags)."""
    import sys

    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))


# mallopt's parameters (glibc's malloc.h) and the values set.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
MALLOC_OPTIONS = {M_ARENA_MAX: 1, M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}
# What this process's import set: {"xla_flags": bool, "malloc": bool}.
APPLIED = {"xla_flags": False, "malloc": False}


def malloc_options_with_defaults(environ, backend: str, cpus: int) -> dict | None:
    """The `mallopt` settings vitkit would make, or None to leave malloc as it is."""
    switch = environ.get(SWITCH, "").strip()
    if switch == "0" or backend != "jax":
        return None
    if cpus > MAX_CPUS and switch != "1":
        return None
    return dict(MALLOC_OPTIONS)


def glibc():
    """This process's C library where it is glibc (which has `mallopt`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it; musl does not)
        return libc
    except (OSError, AttributeError):
        return None


def set_malloc_options(options: dict) -> bool:
    """`mallopt` each option; True where glibc took them all."""
    libc = glibc()
    if libc is None:
        return False
    return all(
        libc.mallopt(ctypes.c_int(key), ctypes.c_int(value)) == 1 for key, value in options.items()
    )


def apply_defaults(backend: str) -> dict:
    """Set `XLA_FLAGS` and malloc's options for `backend` if the rules say so; returns
    `APPLIED`, what was set (by this call or an earlier one)."""
    if _jax_started():
        return APPLIED
    cpus = cpu_count()
    flags = xla_flags_with_defaults(os.environ, backend, cpus, installed_versions())
    if flags is not None:
        os.environ["XLA_FLAGS"] = flags
        APPLIED["xla_flags"] = True
    options = malloc_options_with_defaults(os.environ, backend, cpus)
    if options is not None and not APPLIED["malloc"]:
        APPLIED["malloc"] = set_malloc_options(options)
    return APPLIED
