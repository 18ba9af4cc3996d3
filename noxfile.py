"""The test matrix: `nox` runs every backend's tests, the linter and the docs build.

Each backend's session gets its own virtualenv with that backend and the test dependencies:
torch 2.13.0 and vit-pytorch 1.26.11 (installed with --no-deps) as the numerical reference for
parity tests, and TensorFlow (CPU) with tf2onnx and onnxruntime, through which every backend
exports to SavedModel and ONNX. Every session also installs JAX (CPU), so that each has all three
backends: the checkpoint tests write checkpoints on each backend in a subprocess (once per nox
run, kept under .nox/checkpoint-cache for the later sessions) and load them on the session's
own. The tests run with KERAS_BACKEND set to the session's backend, spread over xdist workers
with `--dist load` (no test is pinned to a worker).
"""

import os

import nox

BACKENDS = ("jax", "torch", "tensorflow")
# Every session installs all three backends: torch (pinned: a newer one pulls CUDA wheels)
# first, then JAX, then TensorFlow, which is also the export path of every backend (tf2onnx
# etc. are in [test]). The checkpoint tests run each backend in a subprocess.
TORCH = "torch==2.13.0"
BACKEND_PACKAGES = ["jax[cpu]"]
EXPORT_PACKAGES = ["tensorflow-cpu"]
REFERENCE = "vit-pytorch==1.26.11"

nox.options.sessions = [f"tests-{b}" for b in BACKENDS] + ["lint", "docs"]
nox.options.reuse_existing_virtualenvs = True


def install_backends(session):
    session.install(TORCH)  # first, so nothing later resolves a CUDA build
    session.install("-e", ".[test]", *BACKEND_PACKAGES, *EXPORT_PACKAGES)
    session.install("--no-deps", REFERENCE)


def run_tests(session, backend):
    install_backends(session)
    workers = os.environ.get("VITKIT_TEST_WORKERS", "2")
    session.run(
        "pytest",
        "-n",
        workers,
        "--dist",
        "load",  # no test uses xdist_group (which pytest 9.2 + xdist 3.8 ignore anyway)
        "-p",
        "no:cacheprovider",
        "--durations=25",  # where CI's time goes, in every log
        *session.posargs,
        env={
            "KERAS_BACKEND": backend,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            # Checkpoints each backend writes (test_checkpoints.py), shared by the sessions
            # of one nox run: the first writes them, the next ones load them.
            "VITKIT_CHECKPOINT_CACHE": os.path.abspath(".nox/checkpoint-cache"),
        },
    )


# One parametrized body, one named session per backend: `nox -s tests-jax`.
for _backend in BACKENDS:

    def _tests(session, backend=_backend):
        run_tests(session, backend)

    _tests.__doc__ = f"Run the whole test harness on the {_backend} backend."
    nox.session(name=f"tests-{_backend}")(_tests)


@nox.session
def lint(session):
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", "vitkit", "backends_tests", "noxfile.py")
    session.run("ruff", "format", "--check", "vitkit", "backends_tests", "noxfile.py")


@nox.session
def docs(session):
    """Build the mkdocs-material site, warnings as errors."""
    session.install("mkdocs>=1.6", "mkdocs-material>=9.5")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")


@nox.session
def bench(session):
    """vitkit on JAX, PyTorch and TensorFlow against vit-pytorch eager: one table, and JSON in
    bench/results.json (`nox -s bench -- --workload vit_s16 --repeats 10` passes options)."""
    session.install(TORCH)
    session.install("-e", ".", "jax[cpu]", "tensorflow-cpu")
    session.install("--no-deps", REFERENCE)
    session.run("python", "-m", "vitkit.bench", *session.posargs)
