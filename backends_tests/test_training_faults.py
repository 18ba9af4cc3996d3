"""`vitkit train` under faults: a killed run resumes, NaN does not go unnoticed, and the same
seed gives the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np

from vitkit import cli, data

EPOCHS = 4


def train_args(epochs=EPOCHS):
    return ["train", "simple_vit", "--epochs", str(epochs), "--limit", "200", "--batch-size", "10"]


TRAIN = train_args()


# The killed run: enough epochs that it is still training when the test kills it, 0.3 s after
# its second backup, on a fast machine too (an AMD EPYC trains an epoch of these in about
# 0.1 s on JAX: with 4 epochs, a run was once done before the kill).
KILLED_EPOCHS = 12


def command(out, epochs=EPOCHS):
    return [sys.executable, "-m", "vitkit", *train_args(epochs), "--verbose", "0", "--out", out]


def test_a_killed_run_resumes_from_its_last_epoch(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    first = subprocess.Popen(
        command(out, KILLED_EPOCHS),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metadata = out / "backup" / "training_metadata.json"
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None:
        if metadata.is_file():
            try:
                done = json.loads(metadata.read_text())["epoch"]
            except (ValueError, KeyError):  # being written
                done = 0
            if done >= 2:
                break
        time.sleep(0.05)
    assert first.poll() is None, f"the run ended before it could be killed: {first.stderr.read()}"
    time.sleep(0.3)  # into the third epoch
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert not (out / "model.keras").exists()
    logged = [
        json.loads(line)["epoch"] for line in (out / "history.jsonl").read_text().splitlines()
    ]
    assert logged[:2] == [0, 1]

    second = subprocess.run(
        command(out, KILLED_EPOCHS), env=env, capture_output=True, text=True, timeout=900
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from epoch " in second.stdout, second.stdout
    resumed = int(second.stdout.split("resuming from epoch ")[1].split(":")[0])
    assert 3 <= resumed <= KILLED_EPOCHS, second.stdout  # epochs 1 and 2 are not trained again
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == KILLED_EPOCHS  # as many epochs as an unbroken run
    rows = [json.loads(line)["epoch"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert rows == list(range(KILLED_EPOCHS))
    assert json.loads((out / "metrics.json").read_text())["epochs"] == KILLED_EPOCHS
    assert (out / "model.keras").is_file() and not (out / "backup").exists()


def with_nan(load):
    def load_with_nan(*args, **kwargs):
        split = load(*args, **kwargs)
        split.x_train = split.x_train.copy()
        split.x_train[3, 2, 1] = np.nan
        return split

    return load_with_nan


def test_nan_in_the_images_is_refused(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(data, "load_digits", with_nan(data.load_digits))
    code = cli.main([*TRAIN, "--verbose", "0", "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "training images hold" in err and "NaN or Inf" in err
    assert not (tmp_path / "model.keras").exists()


def test_a_loss_that_becomes_nan_stops_training(capsys, tmp_path):
    """Keras' TerminateOnNaN: a learning rate of 1e30 overflows within a few steps."""
    code = cli.main([*TRAIN, "--lr", "1e30", "--verbose", "0", "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "training stopped at epoch" in err and "NaN or Inf" in err, err
    assert not (tmp_path / "model.keras").exists()


def trained_weights(out, seed=0):
    args = ["train", "vit", "--epochs", "1", "--limit", "120", "--batch-size", "16", "--augment"]
    assert cli.main([*args, "--seed", str(seed), "--verbose", "0", "--out", str(out)]) == 0
    model = keras.saving.load_model(out / "model.keras")
    return [np.asarray(keras.ops.convert_to_numpy(w)) for w in model.weights]


def test_the_same_seed_gives_the_same_weights(tmp_path):
    """Dropout, augmentation and initial weights all come from `--seed`: two runs agree
    exactly (on torch's CPU too: one thread per test worker, no nondeterministic kernels)."""
    first = trained_weights(tmp_path / "a")
    second = trained_weights(tmp_path / "b")
    assert len(first) == len(second) > 10
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    other = trained_weights(tmp_path / "c", seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
