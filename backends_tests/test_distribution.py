"""Data- and model-parallel training through `keras.distribution` (`vitkit.distribution`).

The layout map's coverage is checked on every backend and every registered model. Training
over devices needs JAX: there it runs in a subprocess with 4 simulated CPU devices (the
device count is fixed when JAX starts), and elsewhere `--distribute` must refuse clearly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import pytest

import vitkit
from backends_tests.helpers import BACKEND
from vitkit import distribution
from vitkit.layers.attention import Attention
from vitkit.layers.feed_forward import FeedForward

# Projections of each block that model parallelism splits, and how (column: by output unit).
SPLIT = {
    Attention: {"to_qkv": "column", "to_q": "column", "to_k": "column", "to_v": "column"}
    | {"to_kv": "column", "to_out": "row"},
    FeedForward: {"hidden": "column", "out": "row"},
}


def expected_layouts(model):
    """{path: axes} for the Dense kernels (and biases) of every Attention and FeedForward."""
    expected = {}
    for layer in model._flatten_layers(include_self=False):
        for kind, names in SPLIT.items():
            if not isinstance(layer, kind):
                continue
            for name, how in names.items():
                dense = getattr(layer, name, None)
                if not isinstance(dense, keras.layers.Dense):
                    continue  # a convolution (Twins-SVT's reduced keys and values) or none
                column = how == "column"
                expected[dense.kernel.path] = (None, "model") if column else ("model", None)
                if dense.bias is not None:
                    expected[dense.bias.path] = ("model",) if column else None
    return expected


@pytest.mark.parametrize("name", vitkit.list_models())
def test_layout_map_splits_every_attention_and_mlp_kernel(name):
    spec = vitkit.get_spec(name)
    model = spec.cls(**spec.tiny)
    model.build_default()
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), devices=["cpu:0"])
    tensor_parallel = distribution.TensorParallel(layout_map=distribution.layout_map(mesh))
    expected = expected_layouts(model)
    assert any(axes == (None, "model") for axes in expected.values()), "nothing to split"
    for variable in model.variables:
        got = tuple(tensor_parallel.get_variable_layout(variable).axes)
        whole = (None,) * len(variable.shape)
        assert got == (expected.get(variable.path) or whole), variable.path


def test_layout_map_needs_a_model_axis():
    mesh = keras.distribution.DeviceMesh((1,), ("batch",), devices=["cpu:0"])
    with pytest.raises(ValueError, match="`model_axis`.*'model'"):
        distribution.layout_map(mesh)


# Trains a ViT for 2 epochs of 4 steps on one device, then data parallel over 4 devices, then
# model parallel on a 2 x 2 mesh and on 1 x 4; prints the losses and where each kernel lives.
SCRIPT = textwrap.dedent(
    """
    import contextlib, json, keras, numpy as np
    from vitkit import distribution, models

    def train(dist):
        keras.utils.clear_session()
        keras.utils.set_random_seed(0)
        with (dist.scope() if dist else contextlib.nullcontext()):
            model = models.vit.ViT(image_size=16, patch_size=4, num_classes=8, dim=32,
                                   depth=2, heads=4, dim_head=8, mlp_dim=64)
            model.build_default()
            rng = np.random.default_rng(0)
            x = rng.normal(size=(32, 16, 16, 3)).astype("float32")
            y = rng.integers(0, 8, 32)
            model.compile(optimizer=keras.optimizers.AdamW(1e-3),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            losses = model.fit(x, y, batch_size=8, epochs=2, shuffle=False,
                               verbose=0).history["loss"]
            specs = ({p: list(s) for p, s in distribution.variable_shardings(model).items()}
                     if dist else {})
            return {"losses": losses, "specs": specs,
                    "replicated": getattr(dist, "replicated", [])}

    print(json.dumps({
        "devices": len(keras.distribution.list_devices()),
        "single": train(None),
        "data": train(distribution.data_parallel()),
        "model_2x2": train(distribution.model_parallel(model_size=2)),
        "model_1x4": train(distribution.model_parallel()),
    }))
    """
)


def four_devices_env():
    return {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }


def on_four_devices(code):
    """Run `code` in a JAX process with 4 CPU devices; the JSON its last line prints."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=four_devices_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_cli(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "vitkit", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


if BACKEND == "jax":

    def test_sharded_training_gives_the_single_device_losses():
        runs = on_four_devices(SCRIPT)
        assert runs["devices"] == 4
        single = runs["single"]["losses"]
        for mode in ("data", "model_2x2", "model_1x4"):
            for a, b in zip(runs[mode]["losses"], single, strict=True):
                assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (mode, runs[mode]["losses"], single)
            assert runs[mode]["replicated"] == []

        def spec(mode, path):
            return runs[mode]["specs"][f"vi_t/transformer/{path}/kernel"]

        for mode in ("model_2x2", "model_1x4"):
            for block in ("attention_0/to_qkv", "feed_forward_1/hidden"):
                assert spec(mode, block) == [None, "model"], (mode, block)
            for block in ("attention_1/to_out", "feed_forward_0/out"):
                assert spec(mode, block) == ["model", None], (mode, block)
            assert runs[mode]["specs"]["vi_t/head/kernel"] == [None, None]
        assert spec("data", "attention_0/to_qkv") == [None, None]  # replicated

    def test_kernels_that_cannot_split_stay_whole():
        """dim_head 5 x 3 heads: to_qkv's 45 outputs do not divide by 4 devices."""
        code = textwrap.dedent(
            """
            import json, keras
            from vitkit import distribution, models
            dist = distribution.model_parallel()
            with dist.scope():
                model = models.vit.ViT(image_size=8, patch_size=4, num_classes=3, dim=16, depth=1,
                                       heads=3, dim_head=5, mlp_dim=32)
                model.build_default()
            print(json.dumps(dist.replicated))
            """
        )
        replicated = on_four_devices(code)
        # to_qkv (45 outputs) and to_out (15 inputs) stay whole; the MLP (32) splits.
        assert sorted(p.split("/")[-2] for p in replicated) == ["to_out", "to_qkv"], replicated

    def test_train_cli_distributes_over_the_devices(tmp_path):
        result = run_cli(
            "train", "vit", "--distribute", "model", "--model-size", "2", "--epochs", "1",
            "--limit", "301", "--batch-size", "32", "--verbose", "0", "--out", tmp_path,
            env=four_devices_env(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert "mesh {'batch': 2, 'model': 2}" in result.stdout
        assert "2 images left out" in result.stdout  # 301 train and test images, 2 batch shards
        assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 1
        keras.saving.load_model(tmp_path / "model.keras")  # the sharded weights saved whole

        odd = run_cli(
            "train", "vit", "--distribute", "data", "--batch-size", "30", env=four_devices_env()
        )
        assert odd.returncode == 1
        assert "--batch-size 30 must divide by the 4 devices" in odd.stderr


else:

    def test_train_cli_refuses_to_distribute_off_jax(tmp_path):
        result = run_cli(
            "train", "vit", "--distribute", "data", "--out", tmp_path, env={**os.environ}
        )
        assert result.returncode == 1
        assert f"JAX backend only (KERAS_BACKEND is '{BACKEND}')" in result.stderr
