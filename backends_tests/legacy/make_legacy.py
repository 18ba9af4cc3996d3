"""Write this release's legacy checkpoints: run once per release, when it is tagged.

    python backends_tests/legacy/make_legacy.py

Each backend (in a subprocess with its KERAS_BACKEND) writes `<name>.keras` and `<name>.npz`
(inputs and outputs) for a few small, diverse models into
`backends_tests/legacy/<vitkit version>/<backend>/`; `test_checkpoints.py` checks that every
release's files still load and give their outputs. A release's folder is never rewritten: the
script refuses to run if it exists. Commit the new folder (`.gitignore` lets these `.keras`
files through).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BACKENDS = ("jax", "torch", "tensorflow")
# Plain ViT; CaiT (class attention, layer scale, talking heads); PiT (convolutional pooling);
# LeViT (convolutions with BatchNorm statistics, attention biases, a distillation head).
MODELS = ("vit", "cait", "pit", "levit")


def main() -> None:
    sys.path.insert(0, str(REPO))
    import vitkit

    release = HERE / vitkit.__version__
    if release.exists():
        sys.exit(f"{release} exists: a release's legacy checkpoints are written once")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    for backend in BACKENDS:
        subprocess.run(
            [sys.executable, "-m", "backends_tests.write_checkpoints", str(release / backend)]
            + ["--models", ",".join(MODELS), "--no-weights"],
            cwd=REPO,
            env={**env, "KERAS_BACKEND": backend},
            check=True,
        )


if __name__ == "__main__":
    main()
