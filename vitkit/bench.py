"""`vitkit bench`: vitkit on JAX, PyTorch and TensorFlow against vit-pytorch in plain PyTorch
eager, on this machine, in one run.

The same model (vit-pytorch's, its weights ported with `from_vit_pytorch`), the same input,
measured in a fresh process per backend (one Keras backend per process; each process's peak
memory is its own): inference at batch 1 and 8 and one full training step (forward, backward,
AdamW update) at batch 8. Warm-up runs (compilation included) are excluded; each figure is the
median of the timed runs. FLOPs are counted on the reference with torch's `FlopCounterMode`
(matrix products and convolutions), and the achieved GFLOP/s compared with a measured
matrix-multiply peak.

    vitkit bench                              # every workload, every installed backend
    vitkit bench --workload vit_s16 --repeats 5 --out bench/results.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What each vitkit run measures: (Keras backend, compiled). JAX and TensorFlow compile with XLA
# (`jit_compile=True`); torch runs eagerly, and "torch-compile" through `torch.compile`
# (Keras' `jit_compile=True` on torch: TorchInductor, which needs a C++ compiler).
RUNS = {
    "jax": ("jax", True),
    "torch": ("torch", False),
    "torch-compile": ("torch", True),
    "tensorflow": ("tensorflow", True),
}
# vit-pytorch module, class and keywords of each workload
WORKLOADS = {
    "vit_s16": (
        "vit",
        "ViT",
        dict(
            image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6,
            mlp_dim=1536,
        ),
    ),
    "cvt_13": ("cvt", "CvT", dict(num_classes=1000)),
    # a seconds-long run of the whole pipeline, for its tests
    "vit_tiny": (
        "vit", "ViT",
        dict(image_size=224, patch_size=32, num_classes=10, dim=32, depth=1, heads=2, mlp_dim=64),
    ),
}  # fmt: skip
DEFAULT_WORKLOADS = ("vit_s16", "cvt_13")
IMAGE_SIZE = 224
INFERENCE_BATCHES = (1, 8)
TRAIN_BATCH = 8


def import_reference(module: str):
    """`vit_pytorch.<module>`. vit_pytorch imports torchvision (for DINO's augmentations) when
    imported; where torchvision is not installed, an empty stand-in takes its place (nothing
    measured here touches it)."""
    import importlib
    import importlib.util
    import types

    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        torchvision = types.ModuleType("torchvision")
        torchvision.transforms = types.ModuleType("torchvision.transforms")
        sys.modules["torchvision"] = torchvision
        sys.modules["torchvision.transforms"] = torchvision.transforms
    return importlib.import_module(f"vit_pytorch.{module}")


def median_seconds(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def inputs(batch: int, classes: int = 1000, seed: int = 0):
    """Images `(batch, 3, 224, 224)` (channels first, as vit-pytorch takes them) and labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype("float32")
    return x, rng.integers(0, classes, size=batch)


# One measurement per process ---------------------------------------------------------------


def measure_reference(workload: str, weights: str, warmup: int, repeats: int) -> dict:
    import torch

    module, cls, config = WORKLOADS[workload]
    model = getattr(import_reference(module), cls)(**config)
    model.load_state_dict(torch.load(weights, weights_only=True))
    results = {}
    model.eval()
    for batch in INFERENCE_BATCHES:
        x = torch.from_numpy(inputs(batch)[0])
        with torch.inference_mode():
            seconds = median_seconds(lambda x=x: model(x), warmup, repeats)
        results[f"infer_b{batch}"] = seconds
    with torch.inference_mode():
        results["logits"] = model(torch.from_numpy(inputs(2)[0])).tolist()
    model.train()
    x, y = (torch.as_tensor(a) for a in inputs(TRAIN_BATCH, config["num_classes"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    results[f"train_b{TRAIN_BATCH}"] = median_seconds(step, warmup, repeats)
    return results


def measure_vitkit(
    workload: str, weights: str, warmup: int, repeats: int, jit: bool = True
) -> dict:
    import keras
    import torch

    from vitkit.convert import from_vit_pytorch

    module, cls, config = WORKLOADS[workload]
    model = getattr(__import__(f"vitkit.models.{module}", fromlist=[cls]), cls)(**config)
    from_vit_pytorch(model, torch.load(weights, weights_only=True))
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    results = {}
    for batch in INFERENCE_BATCHES:
        x = inputs(batch)[0].transpose(0, 2, 3, 1)  # channels last
        results[f"infer_b{batch}"] = median_seconds(
            lambda x=x: keras.ops.convert_to_numpy(model.predict_on_batch(x)), warmup, repeats
        )
    logits = model.predict_on_batch(inputs(2)[0].transpose(0, 2, 3, 1))
    results["logits"] = keras.ops.convert_to_numpy(logits).tolist()  # the same numbers?
    x, y = inputs(TRAIN_BATCH, config["num_classes"])
    x = x.transpose(0, 2, 3, 1)
    results[f"train_b{TRAIN_BATCH}"] = median_seconds(
        lambda: model.train_on_batch(x, y), warmup, repeats
    )
    return results


def flops(workload: str) -> dict:
    """FLOPs of one image through the reference: forward, and forward + backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module, cls, config = WORKLOADS[workload]
    model = getattr(import_reference(module), cls)(**config)
    x = torch.from_numpy(inputs(1)[0])
    with FlopCounterMode(display=False) as counter:
        model(x)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return {"forward": forward, "train": counter.get_total_flops()}


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Float32 matrix-multiply throughput of this machine (torch, all its threads)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = median_seconds(lambda: torch.mm(a, b), 2, repeats)
    return 2 * size**3 / seconds / 1e9


# The run ------------------------------------------------------------------------------------


def run_worker(who: str, workload: str, weights: str, warmup: int, repeats: int) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if who != "reference":
        env["KERAS_BACKEND"] = RUNS[who][0]
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    command = [sys.executable, "-m", "vitkit.bench", "--worker", who, "--workload", workload]
    command += ["--weights", weights, "--warmup", str(warmup), "--repeats", str(repeats)]
    done = subprocess.run(
        [*command, "--worker-out", out], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return json.loads(Path(out).read_text())


def relative_error(ours, reference) -> float:
    import numpy as np

    ours, reference = np.asarray(ours, "float64"), np.asarray(reference, "float64")
    return float(np.linalg.norm(ours - reference) / max(np.linalg.norm(reference), 1e-12))


def cpu_model() -> str:
    """The CPU's model name where the OS says it (Linux), else "": XLA's and torch's matrix
    kernels rank differently on different CPUs, so a result needs it."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def installed_backends() -> list:
    import importlib.util

    return [run for run, (backend, _) in RUNS.items() if importlib.util.find_spec(backend)]


def benchmark(workloads, backends, warmup=2, repeats=5) -> dict:
    import torch

    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_model() or platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "matmul_peak_gflops": round(matmul_peak_gflops(), 1),
        },
        "settings": {"warmup": warmup, "repeats": repeats, "image_size": IMAGE_SIZE},
        "workloads": {},
    }
    for workload in workloads:
        module, cls, config = WORKLOADS[workload]
        with tempfile.TemporaryDirectory() as tmp:
            weights = str(Path(tmp) / "weights.pt")
            torch.manual_seed(0)
            torch.save(getattr(import_reference(module), cls)(**config).state_dict(), weights)
            runs = {"vit-pytorch": run_worker("reference", workload, weights, warmup, repeats)}
            for backend in backends:
                runs[f"vitkit-{backend}"] = run_worker(backend, workload, weights, warmup, repeats)
        reference = runs["vit-pytorch"].pop("logits", None)
        for run in runs.values():
            logits = run.pop("logits", None)
            if reference is not None and logits is not None:
                run["rel_err"] = relative_error(logits, reference)
        report["workloads"][workload] = {"flops_per_image": flops(workload), "runs": runs}
    return report


def table(report) -> str:
    peak = report["machine"]["matmul_peak_gflops"]
    lines = [
        f"{'workload':10} {'task':9} {'who':20} {'images/s':>9} {'vs ref':>7} {'GFLOP/s':>8} "
        f"{'% peak':>7} {'RSS MiB':>8} {'rel err':>8}"
    ]
    for workload, entry in report["workloads"].items():
        runs, per_image = entry["runs"], entry["flops_per_image"]
        ref = runs["vit-pytorch"]
        for task in [f"infer_b{b}" for b in INFERENCE_BATCHES] + [f"train_b{TRAIN_BATCH}"]:
            batch = int(task.split("_b")[1])
            work = per_image["train" if task.startswith("train") else "forward"] * batch
            for who, run in runs.items():
                if "error" in run:
                    lines.append(f"{workload:10} {task:9} {who:20} error: {run['error'][:60]}")
                    continue
                seconds = run[task]
                ratio = ref[task] / seconds if "error" not in ref else float("nan")
                gflops = work / seconds / 1e9
                lines.append(
                    f"{workload:10} {task:9} {who:20} {batch / seconds:9.2f} {ratio:6.2f}x "
                    f"{gflops:8.1f} {100 * gflops / peak:6.1f}% {run['peak_rss_mib']:8.0f} "
                    f"{run.get('rel_err', float('nan')):8.1e}"
                )
    machine = report["machine"]
    lines.append(
        f"machine: {machine['processor']}, {machine['cpus']} CPUs, float32 matmul peak "
        f"{peak} GFLOP/s; median of {report['settings']['repeats']} runs after "
        f"{report['settings']['warmup']} warm-up"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="vitkit bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    parser.add_argument("--backend", action="append", choices=list(RUNS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one measurement, in this process
        (workload,) = args.workload
        if args.worker == "reference":
            result = measure_reference(workload, args.weights, args.warmup, args.repeats)
        else:
            jit = RUNS[args.worker][1]
            result = measure_vitkit(workload, args.weights, args.warmup, args.repeats, jit)
        result["peak_rss_mib"] = peak_rss_mib()
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    report = benchmark(
        args.workload or list(DEFAULT_WORKLOADS),
        args.backend or installed_backends(),
        args.warmup,
        args.repeats,
    )
    print(table(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
