"""Where a training step's time goes, on each backend (`vitkit bench --profile`).

A few training steps run under the backend's own profiler, and each traced operation's time
is put in one of three groups: matrix products (dots, convolutions and the fusions built
around them), copies and layout (transposes, concatenations, pads, slices and other data
movement), and elementwise and reductions (everything else: activations, normalisations,
softmax, the optimizer's update). The biggest operations are listed by name, the backward
pass's marked `(backward)` where the name tells.

- torch (vit-pytorch and vitkit's torch runs): `torch.profiler`, each operator's own time
  (on a GPU, its kernels' time).
- JAX: `jax.profiler`'s trace of XLA's operations, grouped by what each compiled operation
  contains, read from the optimized HLO that XLA dumps (`prepare_xla` asks for the dump).
- TensorFlow: `tf.profiler`; with XLA, per-operation events need XLA's own trace points
  (`prepare_xla` turns them on) and the HLO dump as on JAX; without XLA, TensorFlow's
  kernels, grouped by op type.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
import time

from vitkit._xla_cpu import flags_first

MATRIX = "matrix products"
LAYOUT = "copies and layout"
ELEMENTWISE = "elementwise and reductions"
GROUPS = (MATRIX, LAYOUT, ELEMENTWISE)
TOP = 8  # operations listed by name


# Grouping by name -------------------------------------------------------------------------

# XLA opcodes that only move data
_HLO_LAYOUT = {
    "bitcast", "broadcast", "concatenate", "constant", "copy", "dynamic-slice",
    "dynamic-update-slice", "gather", "get-tuple-element", "iota", "pad", "parameter",
    "reshape", "reverse", "slice", "transpose", "tuple",
}  # fmt: skip
_HLO_CONTAINERS = {"while", "conditional", "call", "async-start", "async-done"}
_MATRIX_WORDS = ("matmul", "conv", "gemm", "onednn", "cublas", "cudnn", "fmha", "dot")

_TORCH_MATRIX = re.compile(
    r"::_?(mm|addmm|bmm|baddbmm|addbmm|matmul|linear\w*|convolution\w*|conv\w*|mkldnn_\w*|"
    r"scaled_dot_product\w*|flash_attention\w*|efficient_attention\w*)$"
)
_TORCH_LAYOUT = {
    "copy_", "cat", "contiguous", "clone", "_to_copy", "to", "permute", "transpose", "t",
    "view", "_unsafe_view", "reshape", "as_strided", "expand", "unfold", "im2col", "col2im",
    "narrow", "slice", "select", "split", "chunk", "stack", "pad", "constant_pad_nd",
    "empty", "empty_like", "empty_strided", "resize_", "index_select", "flatten", "unbind",
}  # fmt: skip
_TF_LAYOUT = {
    "BroadcastTo", "Concat", "ConcatV2", "ExpandDims", "Fill", "GatherV2", "Identity",
    "MirrorPad", "Pack", "Pad", "PadV2", "Reshape", "Reverse", "ReverseV2", "Slice", "Split",
    "SplitV", "Squeeze", "StridedSlice", "StridedSliceGrad", "Tile", "Transpose", "Unpack",
    "ZerosLike",
}  # fmt: skip


def torch_group(name: str) -> str:
    """The group of a torch operator (`aten::mm`) or kernel name."""
    if _TORCH_MATRIX.search(name) or "gemm" in name.lower():
        return MATRIX
    if name.split("::")[-1] in _TORCH_LAYOUT:
        return LAYOUT
    return ELEMENTWISE


def tensorflow_group(op_type: str) -> str:
    """The group of a TensorFlow op type (`MatMul`, oneDNN's `_MklBatchMatMulV2`)."""
    op_type = re.sub(r"^_?(Mkl|Fused|MklFused|MklNative)*", "", op_type.lstrip("_"))
    if re.search(r"MatMul|Einsum|Conv|Depthwise", op_type):
        return MATRIX
    return LAYOUT if op_type in _TF_LAYOUT else ELEMENTWISE


# XLA's optimized HLO ----------------------------------------------------------------------

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
# `%name = shape opcode(operands), attributes`; a shape is `f32[8,5]{1,0}` or a tuple of them
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+([a-z][\w\-]*)\("
)
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]+)"')


@dataclasses.dataclass(frozen=True)
class HloOp:
    """What the profile needs of one compiled XLA instruction."""

    group: str | None  # None: a while loop or call, whose body's operations are traced
    label: str
    asynchronous: bool = False  # a plain `dot` / `convolution`: Eigen's, launched and left


def hlo_groups(text: str) -> dict:
    """`{instruction: HloOp}` for every instruction of an optimized HLO module's text. A
    fusion is a matrix product if it contains one, copies and layout if it contains nothing
    but data movement, else elementwise. While loops and calls have no group: their bodies'
    operations are traced on their own. The label is the framework's name of the operation
    (XLA's `op_name` metadata), with layer numbers folded (`attention_N`), and `(backward)`
    where it comes from a gradient, else the instruction's kind. XLA:CPU runs a plain `dot`
    or `convolution` (not one fused into a YNNPACK or oneDNN call) with Eigen, which returns
    as soon as the product is launched (see `xla_ops`)."""
    computations, instructions, current = {}, {}, None
    for line in text.splitlines():
        found = _INSTRUCTION.match(line)
        if found:
            name, opcode = found.groups()
            calls = _CALLS.findall(line)
            target = _TARGET.search(line)
            op_name = _OP_NAME.search(line)
            info = (opcode, calls, target.group(1) if target else "", op_name)
            instructions[name] = info
            if current is not None:
                computations[current].append(info)
            continue
        header = _HEADER.match(line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            computations[current] = []

    def contents(computation, seen):
        ops = set()
        for opcode, calls, target, _ in computations.get(computation, ()):
            ops.add((opcode, target))
            for called in calls:
                if called not in seen:
                    seen.add(called)
                    ops |= contents(called, seen)
        return ops

    def group(opcode, calls, target):
        if opcode in _HLO_CONTAINERS:
            return None
        ops = {(opcode, target)}
        for called in calls:
            ops |= contents(called, {called})
        if any(op in ("dot", "convolution") for op, _ in ops) or any(
            word in target.lower() for _, target in ops for word in _MATRIX_WORDS
        ):
            return MATRIX
        if all(op in _HLO_LAYOUT or op == "fusion" for op, _ in ops):
            return LAYOUT
        return ELEMENTWISE

    result = {}
    for name, (opcode, calls, target, op_name) in instructions.items():
        kind = re.sub(r"[.\d]+$", "", name)
        label = f"[{kind}]"
        if op_name:
            label = f"{framework_label(op_name.group(1))} [{kind}]"
        eigen = opcode in ("dot", "convolution")
        result[name] = HloOp(group(opcode, calls, target), label, eigen)
    return result


def framework_label(op_name: str) -> str:
    """`jit(step)/transpose(jvp(vi_t))/attention_6/dot_general` -> `vi_t/attention_N/dot_general
    (backward)`: the layer path, numbers folded, the gradient marked."""
    backward = "transpose(" in op_name or op_name.startswith("gradient_tape/")
    path = [part for part in op_name.split("/") if not part.startswith("jit(")]
    path = [re.sub(r"^(\w+\()+|\)+$", "", p) for p in path]
    path = [re.sub(r"(?<=[A-Za-z])(_\d+)+(?=_|$)", "_N", p) for p in path if p]
    path = [p for p in path if p != "gradient_tape"]
    return "/".join(path[-4:]) + (" (backward)" if backward else "")


def dumped_hlo_groups(dump_dir: str) -> dict:
    """`{module: {instruction: (group, label)}}` from XLA's `*after_optimizations.txt` dumps
    (`--xla_dump_to`)."""
    modules = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
        with open(path) as f:
            text = f.read()
        header = re.match(r"HloModule\s+([\w.\-]+)", text)
        modules[header.group(1) if header else path] = hlo_groups(text)
    return modules


def xla_ops(events, steps: int) -> list:
    """`(label, group, milliseconds)` of XLA operations from `events`, `(run, start_ms,
    duration_ms, HloOp)` of each traced operation of each run of a compiled program. Eigen's
    matrix products are launched and left running on the thread pool, their events covering
    only the launch: a stretch of a run when no traced operation runs (the program waiting)
    is the product's that has been running longest, which is then done."""
    ops, by_run = [], collections.defaultdict(list)
    for run, start, duration, op in events:
        by_run[run].append((start, duration, op))
    for run_events in by_run.values():
        run_events.sort(key=lambda event: event[0])
        busy_until, running = run_events[0][0], collections.deque()
        for start, duration, op in run_events:
            if start > busy_until and running:
                waited_for = running.popleft()
                ops.append((waited_for.label, waited_for.group, start - busy_until))
            if op.group is not None:
                ops.append((op.label, op.group, duration))
                if op.asynchronous:
                    running.append(op)
            busy_until = max(busy_until, start + duration)
    return ops


def prepare_xla(dump_dir: str, backend: str) -> None:
    """Set this process up to be profiled, before XLA first compiles: XLA dumps its optimized
    HLO to `dump_dir` and, on TensorFlow, traces each operation (JAX's runtime does already).
    The flags go first in `XLA_FLAGS`, as XLA stops reading it at a word that is not a
    `--flag`. JAX's persistent compilation cache is turned off: a program found there is not
    compiled, and so not dumped."""
    flags = f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
    if backend == "tensorflow":
        flags += " --xla_cpu_enable_xprof_traceme=true"
    os.environ["XLA_FLAGS"] = flags_first(flags, os.environ.get("XLA_FLAGS", ""))
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_compilation_cache", False)


# Summaries --------------------------------------------------------------------------------


def summarize(ops, steps: int, seconds: float) -> dict:
    """`ops`: `(label, group, milliseconds)` of every traced operation over `steps` steps that
    took `seconds` of wall time. Milliseconds per step: the step, all traced operations, each
    group, and the `TOP` biggest operations (summed over their calls)."""
    groups = dict.fromkeys(GROUPS, 0.0)
    by_label = collections.Counter()
    label_group = {}
    for label, group, ms in ops:
        groups[group] += ms / steps
        by_label[label] += ms / steps
        label_group[label] = group
    return {
        "steps": steps,
        "step_ms": 1e3 * seconds / steps,
        "traced_ms": sum(groups.values()),
        "groups": groups,
        "top": [
            {"op": label, "group": label_group[label], "ms": ms}
            for label, ms in by_label.most_common(TOP)
        ],
    }


def _timed(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


# Each backend's profiler ------------------------------------------------------------------


def profile_torch(step, steps: int = 3) -> dict:
    """`step` (which waits for its own result) under `torch.profiler`: each operator's own
    time, or on a GPU its kernels' time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        seconds = _timed(step, steps)
    ops = []
    for event in prof.key_averages():
        if cuda:
            ms = getattr(event, "self_device_time_total", 0) / 1e3
        else:
            ms = event.self_cpu_time_total / 1e3
        if ms > 0:
            # torch.compile's generated kernels: one graph's fused code, named by its hash
            label = re.sub(r"^## Call CompiledFxGraph \w+.*", "(torch.compile's code)", event.key)
            ops.append((label, torch_group(event.key), ms))
    return summarize(ops, steps, seconds)


def profile_jax(step, dump_dir: str, steps: int = 3) -> dict:
    """`step` under `jax.profiler`; XLA's operations grouped by the dumped HLO."""
    import jax

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            seconds = _timed(step, steps)
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    modules = dumped_hlo_groups(dump_dir)
    events = []
    for event in trace["traceEvents"] if isinstance(trace, dict) else trace:
        args = event.get("args") or {}
        op = modules.get(args.get("hlo_module"), {}).get(args.get("hlo_op"))
        if event.get("ph") == "X" and op is not None:
            run = (args.get("hlo_module"), args.get("run_id"))
            events.append((run, event["ts"] / 1e3, event["dur"] / 1e3, op))
    return summarize(xla_ops(events, steps), steps, seconds)


def profile_tensorflow(step, dump_dir: str | None, steps: int = 3) -> dict:
    """`step` under `tf.profiler`. With XLA (`dump_dir` given), XLA's operations grouped by
    the dumped HLO; without, TensorFlow's kernels (`scope/name:OpType`) by op type."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as trace_dir:
        tf.profiler.experimental.start(trace_dir)
        try:
            seconds = _timed(step, steps)
        finally:
            tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
            with open(path, "rb") as f:
                space.MergeFromString(f.read())
    events = [
        (plane.event_metadata[event.metadata_id].name, line, event)
        for plane in space.planes
        for line in plane.lines
        for event in line.events
    ]

    def start_ms(line, event):
        return line.timestamp_ns / 1e6 + event.offset_ps / 1e9

    if dump_dir is None:  # TensorFlow's kernels, `scope/name:OpType`
        ops = []
        for name, _, event in events:
            kernel = re.fullmatch(r"([\w/.\-]+):(\w+)", name)
            if kernel and not kernel.group(2).startswith("__"):
                scope, op_type = kernel.groups()
                label = f"{framework_label(scope)} [{op_type}]"
                ops.append((label, tensorflow_group(op_type), event.duration_ps / 1e9))
        return summarize(ops, steps, seconds)
    hlo = {}  # instruction names: the biggest module (the training step) wins a clash
    for module in sorted(dumped_hlo_groups(dump_dir).values(), key=len):
        hlo.update(module)
    # each run of a compiled program: the span of one `CpuExecutable` call
    runs = sorted(
        (start_ms(line, event), start_ms(line, event) + event.duration_ps / 1e9)
        for name, line, event in events
        if name == "CpuExecutable::ExecuteAsyncOnStream"
    )
    xla_events = []
    for name, line, event in events:
        if name in hlo:
            start = start_ms(line, event)
            run = next((i for i, (begin, end) in enumerate(runs) if begin <= start <= end), -1)
            xla_events.append((run, start, event.duration_ps / 1e9, hlo[name]))
    return summarize(xla_ops(xla_events, steps), steps, seconds)


def table(runs: dict, task: str) -> str:
    """The report's lines: per run, a step's milliseconds by group, then its biggest ops."""
    lines = [
        f"where a training step's time goes ({task}; ms per step; "
        "each backend's profiler, operations' own time):",
        f"  {'who':24} {'step':>7} {'traced':>7} " + " ".join(f"{g:>26}" for g in GROUPS),
    ]
    for who, run in runs.items():
        found = run.get("profile")
        if not found:
            continue
        traced = found["traced_ms"] or float("nan")
        shares = " ".join(
            f"{found['groups'][g]:17.1f} ({100 * found['groups'][g] / traced:4.1f}%)"
            for g in GROUPS
        )
        lines.append(f"  {who:24} {found['step_ms']:7.1f} {found['traced_ms']:7.1f} {shares}")
        for op in found["top"]:
            lines.append(f"  {'':24} {op['ms']:7.1f}  {op['op'][:70]}  ({op['group']})")
    return "\n".join(lines)
