"""XLA:CPU's scheduler on small CPU hosts, chosen before JAX starts; huge pages for its memory.

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

XLA:CPU's working memory, in huge pages
--------------------------------------
XLA:CPU (jaxlib 0.10) allocates one block for all of a compiled program's temporaries each
time the program runs, and frees it after. A training step's block is large (ViT-S/16 at
batch 8: 719 MiB). glibc's malloc serves a block above 32 MiB (the most its `mmap` threshold
may be) with a fresh `mmap` and gives it back with `munmap`, so every step faulted the whole
block in again, 4 KiB page by 4 KiB page: 201,000 page faults (785 MiB) a step, about 150 ms
of a 780 ms ViT-S/16 step on a 2-vCPU AMD EPYC. TensorFlow's allocator keeps its memory
between steps, and torch's tensors stay below the threshold (26 MiB of faults a step).

glibc's tunable `glibc.malloc.hugetlb=1` has malloc ask for transparent huge pages
(`madvise`) on the memory it maps: the step then takes about 800 faults instead of 201,000,
most of them of 2 MiB pages, and 778 -> 633 ms. glibc reads its tunables only when a
process starts, so vitkit cannot set it on import: `glibc_tunables_with_defaults` gives the
`GLIBC_TUNABLES` value for the processes vitkit starts itself (the benchmark's runs, the
reference's included), under the switch and CPU-count rules above, where the kernel gives
huge pages on request (its mode `madvise`; with `always` it does so unasked) and the
variable does not already choose. A script sets it itself:
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py`.

(Keeping the freed memory instead, with `mallopt` on import, was tried: as fast in a steady
training loop, but the heap fragmented whenever other allocations came between two steps'
blocks (a profiler, another program), grew by whole blocks, and faulted them in again.)
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


# glibc's tunable for transparent huge pages on the memory malloc maps.
HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None where
    it does not say (not Linux, no such file)."""
    try:
        with open(THP_MODE_FILE) as f:
            found = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return found.group(1) if found else None


def glibc() -> bool:
    """Whether this process's C library is glibc (whose tunables these are; musl has none)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError):
        return False
    return True


def glibc_tunables_with_defaults(environ, cpus: int, thp: str | None) -> str | None:
    """The `GLIBC_TUNABLES` value for a process vitkit starts, or None to leave it as it is
    (see the module's docstring for the rules)."""
    switch = environ.get(SWITCH, "").strip()
    if switch == "0":
        return None
    if cpus > MAX_CPUS and switch != "1":
        return None
    if thp != "madvise":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None  # the user's choice
    return f"{current}:{HUGE_PAGES}" if current else HUGE_PAGES


def child_environment(environ) -> dict:
    """`environ` for a process vitkit starts, with the huge-page tunable where it applies."""
    tunables = None
    if glibc():
        tunables = glibc_tunables_with_defaults(environ, cpu_count(), thp_mode())
    return {**environ, "GLIBC_TUNABLES": tunables} if tunables else dict(environ)


def apply_defaults(backend: str) -> bool:
    """Set `XLA_FLAGS` for `backend` if the rules say so; True where it was set."""
    if _jax_started():
        return False
    flags = xla_flags_with_defaults(os.environ, backend, cpu_count(), installed_versions())
    if flags is None:
        return False
    os.environ["XLA_FLAGS"] = flags
    return True
