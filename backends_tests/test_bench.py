"""`vitkit bench` measures this backend against vit-pytorch on the same weights (a tiny
workload here: the test checks the pipeline and its report, not the speed)."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

from backends_tests.helpers import BACKEND
from vitkit import _xla_cpu, bench, cli, profiling

# this backend's runs (TensorFlow's also without XLA; `torch.compile` compiles for minutes)
RUNS_HERE = [BACKEND] + (["tensorflow-graph"] if BACKEND == "tensorflow" else [])


def test_benchmark_runs_vitkit_and_vit_pytorch_on_the_same_weights(tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.json"
    # the temporary files of the bench and of its workers go here, to be counted after
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    args = ["bench", "--workload", "vit_tiny", "--warmup", "1"]
    for run in RUNS_HERE:
        args += ["--backend", run]
    assert cli.main([*args, "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    entry = report["workloads"]["vit_tiny"]
    runs = entry["runs"]
    assert set(runs) == {"vit-pytorch", *(f"vitkit-{run}" for run in RUNS_HERE)}
    for who, run in runs.items():
        assert "error" not in run, (who, run)
        for task in ("infer_b1", "infer_b8", "train_b8"):
            assert 0 < run[task] < 60, (who, task, run[task])
        assert run["peak_rss_mib"] > 100
    # the same model, the same numbers
    for run in RUNS_HERE:
        assert runs[f"vitkit-{run}"]["rel_err"] < 1e-4, (run, runs[f"vitkit-{run}"]["rel_err"])
    assert entry["flops_per_image"]["train"] > 2 * entry["flops_per_image"]["forward"] > 0
    assert report["machine"]["matmul_peak_gflops"] > 0
    if os.path.exists("/proc/cpuinfo"):  # which CPU, beyond its model name
        assert report["machine"]["cpu"] == bench.cpu_details()
        assert report["machine"]["cpu"]["family"]
    table = capsys.readouterr().out
    assert f"vitkit-{BACKEND}" in table and "vs ref" in table and "wrote" in table
    # each vitkit run reports the XLA flags it ran with: this process's, which importing
    # vitkit here already settled (so the worker's import adds nothing)
    flags = os.environ.get("XLA_FLAGS", "")
    assert runs[f"vitkit-{BACKEND}"]["xla_flags"] == flags
    assert (f"XLA_FLAGS, vitkit-{BACKEND}: {flags}" in table) == bool(flags)
    # every run, the reference's too, in the same environment: huge pages for what malloc
    # maps where vitkit's small-host defaults apply
    tunables = _xla_cpu.child_environment(os.environ).get("GLIBC_TUNABLES", "")
    for who, run in runs.items():
        assert run["glibc_tunables"] == tunables, who
        assert (f"GLIBC_TUNABLES, {who}: {tunables}" in table) == bool(tunables)
    assert bench.table(report).splitlines()[0] in table
    # nothing left behind (the weights, the workers' reports) but torch's compile cache,
    # which torch keeps there by design
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]
    assert left == []


def test_benchmark_mixed_precision_at_chosen_batch_sizes_over_rounds(tmp_path):
    """`--precision bfloat16` runs both sides in mixed precision (float32 weights, bfloat16
    arithmetic), at the batch sizes asked for; the report names them, and the logits still
    agree to bfloat16's precision (not float32's: the check that they differ at all keeps
    the flag from being ignored). `--rounds 2` runs each side twice, in turn: each task keeps
    both rounds' figures, and its ratio is paired round by round."""
    out = tmp_path / "results.json"
    args = ["bench", "--workload", "vit_tiny", "--backend", BACKEND, "--warmup", "1"]
    args += ["--repeats", "1", "--precision", "bfloat16", "--infer-batch", "2", "--rounds", "2"]
    assert cli.main([*args, "--train-batch", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert settings["precision"] == "bfloat16" and settings["rounds"] == 2
    assert (settings["infer_batches"], settings["train_batches"]) == ([2], [3])
    assert bench.tasks(settings) == ["infer_b2", "train_b3"]
    runs = report["workloads"]["vit_tiny"]["runs"]
    for who, run in runs.items():
        assert "error" not in run, (who, run)
        assert {"infer_b2", "train_b3"} <= set(run) and "infer_b1" not in run
        for task in ("infer_b2", "train_b3"):
            assert len(run["rounds"][task]) == 2 and run[task] == pytest.approx(
                sum(run["rounds"][task]) / 2
            )
            low, high = run["vs_ref_range"][task]
            assert 0 < low <= run["vs_ref"][task] <= high, (who, task, run)
    assert runs["vit-pytorch"]["vs_ref"] == {"infer_b2": 1.0, "train_b3": 1.0}
    assert 1e-5 < runs[f"vitkit-{BACKEND}"]["rel_err"] < 5e-2
    assert report["machine"]["matmul_peak_gflops_end"] > 0
    table = bench.table(report)
    assert "infer_b2" in table and "train_b3" in table and "ratio range" in table
    assert "2 rounds of median of 1 runs" in table


def test_rounds_merge_into_medians_and_paired_ratios():
    """Each task's figure is the median over rounds; its ratio is the median of the ratios to
    the reference's run of the same round, not the ratio of the medians; a failed round fails
    the run."""
    ours = [{"infer_b1": 1.0, "peak_rss_mib": 10}, {"infer_b1": 4.0, "peak_rss_mib": 30}]
    ours.append({"infer_b1": 2.0, "peak_rss_mib": 20})
    ref = [{"infer_b1": 2.0}, {"infer_b1": 8.0}, {"infer_b1": 1.0}]  # median 2.0, as ours
    merged = bench.merge_rounds(ours)
    assert merged["infer_b1"] == 2.0 and merged["peak_rss_mib"] == 30
    assert merged["rounds"] == {"infer_b1": [1.0, 4.0, 2.0]}
    report = {"settings": {"infer_batches": [1], "train_batches": []}}
    ratios = bench.paired_ratios(ours, ref, report)
    # rounds' ratios 2, 2 and 0.5 (the medians' ratio would be 1.0)
    assert ratios == {"vs_ref": {"infer_b1": 2.0}, "vs_ref_range": {"infer_b1": [0.5, 2.0]}}
    assert bench.merge_rounds([ours[0], {"error": "out of memory"}]) == {"error": "out of memory"}
    assert "rounds" not in bench.merge_rounds(ours[:1])


# /proc/cpuinfo of a 2-vCPU Intel virtual machine whose vCPUs are hyper-threads of one core
INTEL_HYPERTHREADS = "\n\n".join(
    f"""processor\t: {n}
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
siblings\t: 2
core id\t\t: 0
cpu cores\t: 1
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512bw avx512_vnni amx_tile amx_int8"""
    for n in range(2)
)


def test_the_report_tells_cpus_of_one_model_name_apart():
    assert bench.cpu_details(INTEL_HYPERTHREADS) == {
        "vendor": "GenuineIntel",
        "family": "6",
        "model": "143",
        "threads_per_core": 2,
        "features": ["avx2", "fma", "avx512f", "avx512_vnni", "amx_tile"],
    }
    assert bench.cpu_details("") == {}
    report = {
        "machine": {
            "processor": "Intel(R) Xeon(R) Processor",
            "cpus": 2,
            "cpu": bench.cpu_details(INTEL_HYPERTHREADS),
            "matmul_peak_gflops": 300.0,
        },
        "settings": {"warmup": 2, "repeats": 5, "infer_batches": [1], "train_batches": [8]},
        "workloads": {},
    }
    assert (
        "machine: Intel(R) Xeon(R) Processor, 2 CPUs (family 6 model 143, 2 threads per core; "
        "avx2/fma/avx512f/avx512_vnni/amx_tile)" in bench.table(report)
    )


def test_benchmark_rejects_a_batch_size_or_rounds_below_one(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--workload", "vit_tiny", "--infer-batch", "0"])
    assert "--infer-batch must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--workload", "vit_tiny", "--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_profile_shows_where_each_training_step_goes(tmp_path, capsys):
    """`--profile`: each side's training step also runs under its backend's profiler, and the
    report splits it into matrix products, copies and elementwise work, with its biggest
    operations. On XLA the operations are grouped through the optimized HLO XLA dumps: were
    the dump missing, nothing would be traced. The timing runs' XLA flags are reported
    without the profiler's."""
    out = tmp_path / "results.json"
    args = ["bench", "--workload", "vit_tiny", "--warmup", "1", "--repeats", "1", "--profile"]
    for run in RUNS_HERE:
        args += ["--backend", run]
    assert cli.main([*args, "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["workloads"]["vit_tiny"]["runs"]
    for who, run in runs.items():
        assert "error" not in run, (who, run)
        found = run["profile"]
        assert found["steps"] == 3 and found["step_ms"] > 0, (who, found)
        assert found["groups"][profiling.MATRIX] > 0, (who, found)
        assert found["traced_ms"] == pytest.approx(sum(found["groups"].values()))
        assert found["traced_ms"] > 0.2 * found["step_ms"], (who, found)
        top = found["top"]
        assert 0 < len(top) <= profiling.TOP
        assert all(op["group"] in profiling.GROUPS for op in top)
        assert [op["ms"] for op in top] == sorted((op["ms"] for op in top), reverse=True)
        assert "xla_dump_to" not in run.get("xla_flags", "")
    if BACKEND in ("jax", "tensorflow"):  # XLA's operations carry their layers' names
        labels = [op["op"] for op in runs[f"vitkit-{BACKEND}"]["profile"]["top"]]
        assert any("patch_embed" in label or "transformer" in label for label in labels)
    table = capsys.readouterr().out
    assert "where a training step's time goes (train_b8" in table
    assert all(who in table.split("where a training step")[1] for who in runs)
