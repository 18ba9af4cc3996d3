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
    vitkit bench --rounds 3                   # each run three times, in turn (see `benchmark`)
    vitkit bench --workload vit_s16 --profile # and where each training step's time goes
    vitkit bench --precision bfloat16 --infer-batch 1 --infer-batch 8 --infer-batch 256 \
        --train-batch 8 --train-batch 128 --out bench/results-gpu.json     # on a GPU

On a CUDA GPU (where torch sees one) every run uses it: the reference runs there, and each
Keras backend takes its own default device. Inputs are put on the device before the clock
starts, and each timed call ends with its result back on the host (a synchronisation).
`--precision bfloat16` is mixed precision: float32 weights and bfloat16 arithmetic
(`torch.autocast` for the reference, Keras' `mixed_bfloat16` dtype policy for vitkit). On a
GPU the report also names the attention kernels each run reached. `--profile` also runs each
side's last training step under its backend's profiler (`vitkit.profiling`): how much of the step
is matrix products, copies and elementwise work, and its biggest operations by name.
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

from vitkit import _xla_cpu, profiling

# What each vitkit run measures: (Keras backend, compiled). JAX and TensorFlow compile with XLA
# (`jit_compile=True`); torch runs eagerly, and "torch-compile" through `torch.compile`
# (Keras' `jit_compile=True` on torch: TorchInductor, which needs a C++ compiler).
# "tensorflow-graph" is a `tf.function` without XLA (`jit_compile=False`): what Keras' default
# `jit_compile="auto"` (and so `vitkit train`) runs on a TensorFlow that sees no GPU.
RUNS = {
    "jax": ("jax", True),
    "torch": ("torch", False),
    "torch-compile": ("torch", True),
    "tensorflow": ("tensorflow", True),
    "tensorflow-graph": ("tensorflow", False),
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
TRAIN_BATCHES = (8,)
PRECISIONS = ("float32", "bfloat16")
# where a profiled worker's XLA dumps its optimized HLO (an environment variable)
PROFILE_HLO_DIR = "VITKIT_BENCH_HLO_DIR"


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


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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


def measure_reference(
    workload: str,
    weights: str,
    warmup: int,
    repeats: int,
    precision: str = "float32",
    infer_batches=INFERENCE_BATCHES,
    train_batches=TRAIN_BATCHES,
    profile: bool = False,
) -> dict:
    import contextlib

    import torch

    device = "cuda" if cuda_available() else "cpu"
    module, cls, config = WORKLOADS[workload]
    model = getattr(import_reference(module), cls)(**config)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.to(device)

    def autocast():
        if precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=torch.bfloat16)

    def device_input(batch, classes=1000):
        return [torch.as_tensor(a).to(device) for a in inputs(batch, classes)]

    results = {}
    model.eval()
    for batch in infer_batches:
        x = device_input(batch)[0]
        with torch.inference_mode(), autocast():
            seconds = median_seconds(lambda x=x: model(x).cpu(), warmup, repeats)
        results[f"infer_b{batch}"] = seconds
    with torch.inference_mode(), autocast():
        results["logits"] = model(device_input(2)[0]).float().cpu().tolist()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for batch in train_batches:
        x, y = device_input(batch, config["num_classes"])

        def step(x=x, y=y):
            optimizer.zero_grad()
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            return loss.item()  # waits for the step, as Keras' train_on_batch does

        results[f"train_b{batch}"] = median_seconds(step, warmup, repeats)
    if device == "cuda":
        results["attention_kernels"] = torch_attention_kernels(lambda: step())
        results["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if profile:
        results["peak_rss_mib"] = peak_rss_mib()  # before the profiler's own memory
        results["profile"] = profiling.profile_torch(step)
    return results


def measure_vitkit(
    workload: str,
    weights: str,
    warmup: int,
    repeats: int,
    jit: bool = True,
    precision: str = "float32",
    infer_batches=INFERENCE_BATCHES,
    train_batches=TRAIN_BATCHES,
    profile: bool = False,
) -> dict:
    import keras
    import torch

    from vitkit.convert import from_vit_pytorch

    if precision == "bfloat16":
        keras.config.set_dtype_policy("mixed_bfloat16")
    module, cls, config = WORKLOADS[workload]
    model = getattr(__import__(f"vitkit.models.{module}", fromlist=[cls]), cls)(**config)
    from_vit_pytorch(model, torch.load(weights, weights_only=True))
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )

    def device_input(batch, classes=1000):  # channels last, on the backend's default device
        x, y = inputs(batch, classes)
        return keras.ops.convert_to_tensor(x.transpose(0, 2, 3, 1)), keras.ops.convert_to_tensor(y)

    results = {}
    for batch in infer_batches:
        x = device_input(batch)[0]
        results[f"infer_b{batch}"] = median_seconds(
            lambda x=x: model.predict_on_batch(x),
            warmup,
            repeats,  # returns numpy: synced
        )
    logits = model.predict_on_batch(device_input(2)[0])
    results["logits"] = keras.ops.convert_to_numpy(logits).astype("float32").tolist()
    for batch in train_batches:
        x, y = device_input(batch, config["num_classes"])
        results[f"train_b{batch}"] = median_seconds(
            lambda x=x, y=y: model.train_on_batch(x, y),
            warmup,
            repeats,  # logs are floats
        )
    if cuda_available():
        x, y = device_input(train_batches[-1], config["num_classes"])
        if keras.config.backend() == "torch":
            results["attention_kernels"] = torch_attention_kernels(
                lambda: model.train_on_batch(x, y)
            )
            results["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
        elif keras.config.backend() == "jax":
            results["attention_kernels"] = jax_attention_kernels(model, x, y)
    if profile:
        results["peak_rss_mib"] = peak_rss_mib()  # before the profiler's own memory
        results["profile"] = profile_train_step(lambda: model.train_on_batch(x, y), jit)
    return results


def profile_train_step(step, jit: bool) -> dict:
    """`step` under this backend's profiler (`vitkit.profiling`); XLA's HLO was dumped to
    `PROFILE_HLO_DIR` (see `main`)."""
    import keras

    backend, dump_dir = keras.config.backend(), os.environ.get(PROFILE_HLO_DIR)
    if backend == "torch":
        return profiling.profile_torch(step)
    if backend == "jax":
        return profiling.profile_jax(step, dump_dir)
    return profiling.profile_tensorflow(step, dump_dir if jit else None)


# Which attention kernels a GPU run reached ---------------------------------------------------
# A fused attention kernel shows by name: torch's scaled_dot_product_attention launches
# "flash" / "fmha" / "efficient_attention" kernels (or cuDNN's), and XLA puts cuDNN's fused
# attention in the compiled program as a `__cudnn$fmha...` custom call. Without one, attention
# is two matrix products and a softmax, and nothing here matches.
ATTENTION_KERNEL_MARKS = ("flash", "fmha", "efficient_attention", "attention", "sdpa")


def torch_attention_kernels(step) -> list:
    """Names of the CUDA kernels of one call of `step` that are attention kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = {event.key for event in prof.key_averages()}
    return sorted(n for n in names if any(m in n.lower() for m in ATTENTION_KERNEL_MARKS))


def jax_attention_kernels(model, x, y) -> list:
    """cuDNN attention custom calls in the compiled forward + backward of `model` on JAX."""
    import re

    import jax
    import keras

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable, non_trainable, x, y):
        logits, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        return keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        )

    hlo = jax.jit(jax.grad(loss)).lower(trainable, non_trainable, x, y).compile().as_text()
    return sorted(set(re.findall(r"__cudnn\$fmha\w*", hlo)))


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


def matmul_peak_gflops(size: int = 2048, repeats: int = 5, precision: str = "float32") -> float:
    """Matrix-multiply throughput of this machine (torch): float32 on the CPU's threads (the
    faster of MKL's GEMM and oneDNN's: on an AMD CPU oneDNN's is about twice MKL's), or on
    the GPU where there is one, in the run's precision (bfloat16, or float32 without TF32)."""
    import torch

    if not cuda_available():  # the faster of torch's mm (MKL's GEMM) and oneDNN's product
        a, b = torch.randn(size, size), torch.randn(size, size)
        seconds = median_seconds(lambda: torch.mm(a, b), 2, repeats)
        onednn = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
        if onednn is not None and torch.backends.mkldnn.is_available():

            def product():  # a @ b.T
                return onednn(a, b, None, "none", [], "")

            seconds = min(seconds, median_seconds(product, 2, repeats))
        return 2 * size**3 / seconds / 1e9
    size, dtype = 8192, getattr(torch, precision)
    a, b = (torch.randn(size, size, device="cuda", dtype=dtype) for _ in range(2))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        torch.mm(a, b)
    start.record()
    for _ in range(10):
        torch.mm(a, b)
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e9


# The run ------------------------------------------------------------------------------------


def run_worker(who: str, workload: str, weights: str, warmup: int, repeats: int, **options) -> dict:
    """One measurement in a fresh process. `options`: precision, infer_batches, train_batches."""
    # every run, the reference's too, in the same environment: with huge pages for what
    # malloc maps where vitkit's small-host defaults apply (`vitkit._xla_cpu`)
    env = {**_xla_cpu.child_environment(os.environ), "TF_CPP_MIN_LOG_LEVEL": "3"}
    if who != "reference":
        env["KERAS_BACKEND"] = RUNS[who][0]
    command = [sys.executable, "-m", "vitkit.bench", "--worker", who, "--workload", workload]
    command += ["--weights", weights, "--warmup", str(warmup), "--repeats", str(repeats)]
    command += ["--precision", options.get("precision", "float32")]
    for batch in options.get("infer_batches", INFERENCE_BATCHES):
        command += ["--infer-batch", str(batch)]
    for batch in options.get("train_batches", TRAIN_BATCHES):
        command += ["--train-batch", str(batch)]
    if options.get("profile"):
        command.append("--profile")
    with tempfile.TemporaryDirectory() as tmp:  # the worker's report, removed after
        out = Path(tmp) / "result.json"
        done = subprocess.run(
            [*command, "--worker-out", str(out)],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": tail}
        return json.loads(out.read_text())


def relative_error(ours, reference) -> float:
    import numpy as np

    ours, reference = np.asarray(ours, "float64"), np.asarray(reference, "float64")
    return float(np.linalg.norm(ours - reference) / max(np.linalg.norm(reference), 1e-12))


def cpu_model() -> str:
    """The CPU's model name where the OS says it (Linux), else "": XLA's and torch's matrix
    kernels rank differently on different CPUs, so a result needs it."""
    from vitkit.layers.backend_quirks import cpuinfo_field

    return cpuinfo_field("model name")


# instruction sets the matrix kernels pick by (XLA's YNNPACK, oneDNN, MKL)
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_details(cpuinfo: str | None = None) -> dict:
    """What tells two CPUs of one model name apart (Linux's /proc/cpuinfo, else {}): vendor,
    family and model numbers ("AMD EPYC" and "Intel(R) Xeon(R) Processor" name many
    generations), threads per core (whether the CPUs are hyper-threads of fewer cores), and
    which of `CPU_FEATURES` it has."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as info:
                cpuinfo = info.read()
        except OSError:
            return {}
    first = cpuinfo.strip().split("\n\n")[0]
    fields = {}
    for line in first.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    if not fields:
        return {}
    details = {
        "vendor": fields.get("vendor_id", ""),
        "family": fields.get("cpu family", ""),
        "model": fields.get("model", ""),
    }
    if fields.get("siblings", "").isdigit() and fields.get("cpu cores", "").isdigit():
        details["threads_per_core"] = int(fields["siblings"]) // max(int(fields["cpu cores"]), 1)
    flags = set(fields.get("flags", "").split())
    details["features"] = [feature for feature in CPU_FEATURES if feature in flags]
    return details


def installed_backends() -> list:
    import importlib.util

    return [run for run, (backend, _) in RUNS.items() if importlib.util.find_spec(backend)]


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if cuda_available() else ""


def benchmark(
    workloads,
    backends,
    warmup=2,
    repeats=5,
    precision="float32",
    infer_batches=INFERENCE_BATCHES,
    train_batches=TRAIN_BATCHES,
    rounds=1,
    profile=False,
) -> dict:
    """Every run of every workload, `rounds` times over. A round runs the reference and each
    vitkit run once, each in its own process, and each round starts one run later in that
    order, so that a machine that slows down during the benchmark slows every run alike. A
    run's figure is the median over rounds of its per-round medians, and its ratio to
    vit-pytorch the median of the per-round ratios (each against the reference's run of the
    same round): `vs_ref`, with the rounds' lowest and highest ratio in `vs_ref_range`.
    `profile`: each run also profiles its last training step (`vitkit.profiling`)."""
    import torch

    options = dict(
        precision=precision, infer_batches=list(infer_batches), train_batches=list(train_batches)
    )
    if profile:
        options["profile"] = True
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_model() or platform.processor() or platform.machine(),
            "cpu": cpu_details(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": gpu_name(),
            "matmul_peak_gflops": round(matmul_peak_gflops(precision=precision), 1),
            "matmul_peak_dtype": precision if cuda_available() else "float32",
        },
        "settings": {
            "warmup": warmup, "repeats": repeats, "rounds": rounds, "image_size": IMAGE_SIZE,
            **options,
        },
        "versions": versions(),
        "workloads": {},
    }  # fmt: skip
    workers = [("vit-pytorch", "reference")] + [(f"vitkit-{run}", run) for run in backends]
    for workload in workloads:
        module, cls, config = WORKLOADS[workload]
        per_round = {who: [] for who, _ in workers}
        with tempfile.TemporaryDirectory() as tmp:
            weights = str(Path(tmp) / "weights.pt")
            torch.manual_seed(0)
            torch.save(getattr(import_reference(module), cls)(**config).state_dict(), weights)
            for start in range(rounds):
                start %= len(workers)
                for who, worker in workers[start:] + workers[:start]:
                    per_round[who].append(
                        run_worker(worker, workload, weights, warmup, repeats, **options)
                    )
        runs = {who: merge_rounds(results) for who, results in per_round.items()}
        reference = runs["vit-pytorch"].pop("logits", None)
        for who, run in runs.items():
            logits = run.pop("logits", None)
            if reference is not None and logits is not None:
                run["rel_err"] = relative_error(logits, reference)
            if "error" not in run and "error" not in runs["vit-pytorch"]:
                run.update(paired_ratios(per_round[who], per_round["vit-pytorch"], report))
        report["workloads"][workload] = {"flops_per_image": flops(workload), "runs": runs}
    # the same measurement at the end: how far the machine itself moved during the run
    report["machine"]["matmul_peak_gflops_end"] = round(matmul_peak_gflops(precision=precision), 1)
    return report


def merge_rounds(results: list) -> dict:
    """One run's rounds as one result: each task's median over rounds (the per-round figures
    kept in `rounds`), the first round's logits and attention kernels, the highest peaks."""
    failed = [result["error"] for result in results if "error" in result]
    if failed:
        return {"error": failed[0]}
    merged = dict(results[0])
    timed = [key for key in merged if key.startswith(("infer_b", "train_b"))]
    for key in timed:
        merged[key] = statistics.median(result[key] for result in results)
    for key in ("peak_rss_mib", "peak_device_mib"):
        if key in merged:
            merged[key] = max(result[key] for result in results)
    if len(results) > 1:
        merged["rounds"] = {key: [result[key] for result in results] for key in timed}
    return merged


def paired_ratios(results: list, reference: list, report: dict) -> dict:
    """Each task's speed against the reference's run of the same round: the median ratio over
    rounds, and the lowest and highest."""
    ratios = {
        task: [ref[task] / ours[task] for ours, ref in zip(results, reference, strict=True)]
        for task in tasks(report["settings"])
    }
    return {
        "vs_ref": {task: statistics.median(values) for task, values in ratios.items()},
        "vs_ref_range": {task: [min(values), max(values)] for task, values in ratios.items()},
    }


def versions() -> dict:
    import contextlib
    from importlib import metadata

    found = {}
    for name in ("keras", "torch", "jax", "jaxlib", "tensorflow", "tensorflow-cpu", "vit-pytorch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def tasks(settings) -> list:
    """The report's task names, in order: `infer_b<n>` then `train_b<n>`."""
    infer = settings.get("infer_batches", INFERENCE_BATCHES)
    train = settings.get("train_batches", TRAIN_BATCHES)
    return [f"infer_b{b}" for b in infer] + [f"train_b{b}" for b in train]


def table(report) -> str:
    peak = report["machine"]["matmul_peak_gflops"]
    settings = report["settings"]
    rounds = settings.get("rounds", 1)
    spread = f" {'ratio range':>11}" if rounds > 1 else ""
    lines = [
        f"{'workload':10} {'task':10} {'who':20} {'images/s':>9} {'vs ref':>7}{spread} "
        f"{'GFLOP/s':>9} {'% peak':>7} {'RSS MiB':>8} {'rel err':>8}"
    ]
    for workload, entry in report["workloads"].items():
        runs, per_image = entry["runs"], entry["flops_per_image"]
        ref = runs["vit-pytorch"]
        for task in tasks(settings):
            batch = int(task.split("_b")[1])
            work = per_image["train" if task.startswith("train") else "forward"] * batch
            for who, run in runs.items():
                if "error" in run:
                    lines.append(f"{workload:10} {task:10} {who:20} error: {run['error'][:60]}")
                    continue
                seconds = run[task]
                if "vs_ref" in run:  # paired with the reference's run of each round
                    ratio = run["vs_ref"][task]
                else:  # a report from before rounds existed
                    ratio = ref[task] / seconds if "error" not in ref else float("nan")
                gflops = work / seconds / 1e9
                low, high = run.get("vs_ref_range", {}).get(task, (float("nan"),) * 2)
                spread = f" {low:5.2f}-{high:<5.2f}" if rounds > 1 else ""
                lines.append(
                    f"{workload:10} {task:10} {who:20} {batch / seconds:9.2f} {ratio:6.2f}x"
                    f"{spread} {gflops:9.1f} {100 * gflops / peak:6.1f}% "
                    f"{run['peak_rss_mib']:8.0f} {run.get('rel_err', float('nan')):8.1e}"
                )
        for who, run in runs.items():
            if run.get("xla_flags") and who.startswith("vitkit-"):
                lines.append(f"{workload:10} XLA_FLAGS, {who}: {run['xla_flags']}")
            if run.get("glibc_tunables"):
                lines.append(f"{workload:10} GLIBC_TUNABLES, {who}: {run['glibc_tunables']}")
            if "attention_kernels" in run:
                found = ", ".join(run["attention_kernels"]) or "none (unfused attention)"
                lines.append(f"{workload:10} attention kernels, {who}: {found}")
        if any("profile" in run for run in runs.values()):
            lines.append(f"{workload:10} " + profiling.table(runs, tasks(settings)[-1]))
    machine = report["machine"]
    where = f"{machine['processor']}, {machine['cpus']} CPUs"
    cpu = machine.get("cpu") or {}
    if cpu.get("family"):
        threads = cpu.get("threads_per_core")
        per_core = f", {threads} thread{'s' * (threads != 1)} per core" if threads else ""
        features = "/".join(cpu.get("features", [])) or "none of " + "/".join(CPU_FEATURES)
        where += f" (family {cpu['family']} model {cpu['model']}{per_core}; {features})"
    if machine.get("gpu"):
        where = f"{machine['gpu']} ({where})"
    peak_dtype = machine.get("matmul_peak_dtype", "float32")
    end = machine.get("matmul_peak_gflops_end")
    at_end = f" ({end} at the end)" if end is not None else ""
    times = f"{rounds} rounds of " if rounds > 1 else ""
    lines.append(
        f"machine: {where}, {peak_dtype} matmul peak {peak} GFLOP/s{at_end}; {times}median of "
        f"{settings['repeats']} runs after {settings['warmup']} warm-up"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="vitkit bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    parser.add_argument("--backend", action="append", choices=list(RUNS))
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed calls before each task is timed (default 2: torch.compile compiles "
        "Keras' training step in its first call and again in its second)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the reference and every vitkit run this many times, in turn; ratios are "
        "the median of each round's ratio to the reference's run of the same round",
    )
    parser.add_argument("--out", default="bench/results.json")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="bfloat16: mixed precision (float32 weights, bfloat16 arithmetic)",
    )
    parser.add_argument(
        "--infer-batch", type=int, action="append", help="inference batch size (repeatable)"
    )
    parser.add_argument(
        "--train-batch", type=int, action="append", help="training batch size (repeatable)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run each side's last training step under its backend's profiler: where "
        "the step's time goes (matrix products, copies, elementwise) and its biggest operations",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("infer_batch", "train_batch"):
        if any(batch < 1 for batch in getattr(args, name) or ()):
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    options = dict(
        precision=args.precision,
        infer_batches=tuple(args.infer_batch or INFERENCE_BATCHES),
        train_batches=tuple(args.train_batch or TRAIN_BATCHES),
    )

    if args.worker:  # one measurement, in this process
        # what XLA runs with (importing vitkit may have added its CPU scheduler default)
        xla_flags = os.environ.get("XLA_FLAGS", "")
        (workload,) = args.workload
        with tempfile.TemporaryDirectory() as hlo_dir:
            if args.profile and args.worker != "reference":
                profiling.prepare_xla(hlo_dir, RUNS[args.worker][0])
                os.environ[PROFILE_HLO_DIR] = hlo_dir
            if args.worker == "reference":
                result = measure_reference(
                    workload, args.weights, args.warmup, args.repeats, **options,
                    profile=args.profile,
                )  # fmt: skip
            else:
                jit = RUNS[args.worker][1]
                result = measure_vitkit(
                    workload, args.weights, args.warmup, args.repeats, jit, **options,
                    profile=args.profile,
                )  # fmt: skip
        result.setdefault("peak_rss_mib", peak_rss_mib())
        result["xla_flags"] = xla_flags
        result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    report = benchmark(
        args.workload or list(DEFAULT_WORKLOADS),
        args.backend or installed_backends(),
        args.warmup,
        args.repeats,
        rounds=args.rounds,
        profile=args.profile,
        **options,
    )
    print(table(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
