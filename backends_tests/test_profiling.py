"""`vitkit.profiling` puts each profiled operation in its group and names it (the profilers'
own runs are in test_bench.py)."""

from __future__ import annotations

import collections
import os

import pytest

from vitkit import profiling
from vitkit.profiling import ELEMENTWISE, LAYOUT, MATRIX

# An optimized HLO module as XLA:CPU dumps it (shortened): a YNN fusion around a dot, a
# transpose fusion, an elementwise fusion, a fusion nesting a fusion with a dot, a oneDNN
# custom call, a plain (Eigen) dot, a plain copy, and a while loop.
HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8,5]{1,0})->f32[8,7]{1,0}}

%fused_dot (param_0: f32[8,5], param_1: f32[5,7]) -> f32[8,7] {
  %param_0 = f32[8,5]{1,0} parameter(0)
  %param_1 = f32[5,7]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,7]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_transpose (param_0.1: f32[8,7]) -> f32[7,8] {
  %param_0.1 = f32[8,7]{1,0} parameter(0)
  %transpose.3 = f32[7,8]{0,1} transpose(%param_0.1), dimensions={1,0}
  ROOT %copy.4 = f32[7,8]{1,0} copy(%transpose.3)
}

%fused_exp (param_0.2: f32[7,8]) -> f32[7,8] {
  %param_0.2 = f32[7,8]{1,0} parameter(0)
  ROOT %exponential.5 = f32[7,8]{1,0} exponential(%param_0.2)
}

%inner (p: f32[8,5], q: f32[5,7]) -> f32[8,7] {
  %p = f32[8,5]{1,0} parameter(0)
  %q = f32[5,7]{1,0} parameter(1)
  ROOT %dot.9 = f32[8,7]{1,0} dot(%p, %q), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%outer (a: f32[8,5], b: f32[5,7]) -> f32[8,7] {
  %a = f32[8,5]{1,0} parameter(0)
  %b = f32[5,7]{1,0} parameter(1)
  ROOT %nested = f32[8,7]{1,0} fusion(%a, %b), kind=kOutput, calls=%inner
}

%body (s: (s32[], f32[8,7])) -> (s32[], f32[8,7]) {
  ROOT %s = (s32[], f32[8,7]{1,0}) parameter(0)
}

%cond (c: (s32[], f32[8,7])) -> pred[] {
  %c = (s32[], f32[8,7]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(false)
}

ENTRY %main.20 (x: f32[8,5], w: f32[5,7]) -> f32[8,7] {
  %x = f32[8,5]{1,0} parameter(0)
  %w = f32[5,7]{1,0} parameter(1)
  %ynn_fusion.12 = f32[8,7]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(step)/transpose(jvp(vi_t))/transformer/attention_11/to_qkv/dot_general" stack_frame_id=3}
  %transpose_copy_fusion = f32[7,8]{1,0} fusion(%ynn_fusion.12), kind=kLoop, calls=%fused_transpose, metadata={op_name="jit(step)/jvp(vi_t)/transformer/attention_0/transpose"}
  %exp_fusion.3 = f32[7,8]{1,0} fusion(%transpose_copy_fusion), kind=kLoop, calls=%fused_exp
  %outer_fusion = f32[8,7]{1,0} fusion(%x, %w), kind=kCustom, calls=%outer
  %custom-call.2 = f32[8,7]{1,0} custom-call(%x, %w), custom_call_target="__onednn$matmul"
  %dot.30 = f32[5,7]{1,0} dot(%x, %ynn_fusion.12), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/transpose(jvp(vi_t))/head/transpose"}
  %copy.7 = f32[8,7]{1,0} copy(%outer_fusion)
  %init = (s32[], f32[8,7]{1,0}) tuple(%copy.7, %copy.7)
  %while.2 = (s32[], f32[8,7]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %add.8 = f32[8,7]{1,0} add(%ynn_fusion.12, %custom-call.2)
}
"""  # noqa: E501 (XLA's own lines)


def test_hlo_operations_fall_in_the_group_of_what_they_contain():
    found = profiling.hlo_groups(HLO)
    groups = {name: op.group for name, op in found.items()}
    assert groups["ynn_fusion.12"] == MATRIX  # a fusion around a dot
    assert groups["dot.30"] == MATRIX
    assert groups["outer_fusion"] == MATRIX  # a fusion of a fusion around a dot
    assert groups["custom-call.2"] == MATRIX  # oneDNN's product
    assert groups["transpose_copy_fusion"] == LAYOUT
    assert groups["copy.7"] == LAYOUT
    assert groups["exp_fusion.3"] == ELEMENTWISE
    assert groups["add.8"] == ELEMENTWISE
    assert groups["while.2"] is None  # its body's operations are traced on their own
    # inside the fused computations too, each instruction by its own opcode
    assert groups["dot.9"] == MATRIX and groups["exponential.5"] == ELEMENTWISE
    # only the plain dot runs on Eigen's thread pool, returning once launched
    asynchronous = {name for name, op in found.items() if op.asynchronous}
    assert {"dot.30", "ynn_fusion.12", "custom-call.2", "outer_fusion"} & asynchronous == {"dot.30"}


def test_hlo_labels_name_the_layer_and_mark_the_gradient():
    found = profiling.hlo_groups(HLO)
    assert found["ynn_fusion.12"].label == (
        "transformer/attention_N/to_qkv/dot_general (backward) [ynn_fusion]"
    )
    assert found["transpose_copy_fusion"].label == (
        "vi_t/transformer/attention_N/transpose [transpose_copy_fusion]"
    )
    assert found["exp_fusion.3"].label == "[exp_fusion]"  # no metadata: the instruction's kind


def test_a_run_waiting_on_eigen_products_counts_the_wait_as_theirs():
    """Two Eigen products launched back to back, each waited for in turn: each wait is the
    product's that was launched first and not yet waited for; a wait in another run, or with
    no product running, is nobody's; a while loop's own event is not counted."""
    dot_a = profiling.HloOp(MATRIX, "a", asynchronous=True)
    dot_b = profiling.HloOp(MATRIX, "b", asynchronous=True)
    use = profiling.HloOp(ELEMENTWISE, "use")
    loop = profiling.HloOp(None, "loop")
    events = [
        ("run 1", 0.0, 0.1, dot_a), ("run 1", 0.1, 0.1, dot_b),
        ("run 1", 3.0, 1.0, use),  # waited 2.8 ms for a
        ("run 1", 5.0, 1.0, use),  # waited 1.0 ms for b
        ("run 1", 8.0, 1.0, use),  # waited 2.0 ms, for nothing traced
        ("run 2", 20.0, 5.0, loop), ("run 2", 21.0, 1.0, use),
    ]  # fmt: skip
    ops = profiling.xla_ops(events, steps=1)
    total = collections.Counter()
    for label, group, ms in ops:
        total[label, group] += ms
    assert total == pytest.approx(
        {("a", MATRIX): 0.1 + 2.8, ("b", MATRIX): 0.1 + 1.0, ("use", ELEMENTWISE): 4.0}
    )


@pytest.mark.parametrize(
    "op_name, label",
    [
        (
            "jit(f)/jvp(vi_t)/transformer/feed_forward_3/hidden/div",
            "transformer/feed_forward_N/hidden/div",
        ),
        (
            "gradient_tape/vi_t_1/transformer_1/attention_0_1/einsum/Einsum",
            "transformer_N/attention_N/einsum/Einsum (backward)",
        ),
        ("jit(f)/transpose(jvp(remat(vi_t)))/blocks/mlp_12", "vi_t/blocks/mlp_N (backward)"),
    ],
)  # fmt: skip
def test_framework_labels_fold_layer_numbers(op_name, label):
    assert profiling.framework_label(op_name) == label


@pytest.mark.parametrize(
    "name, group",
    [
        ("aten::mm", MATRIX), ("aten::addmm", MATRIX), ("aten::bmm", MATRIX),
        ("mkldnn::_linear_pointwise", MATRIX), ("aten::mkldnn_convolution", MATRIX),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", MATRIX),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", MATRIX), ("aten::copy_", LAYOUT),
        ("aten::cat", LAYOUT), ("aten::gelu", ELEMENTWISE),
        ("aten::native_layer_norm", ELEMENTWISE), ("Optimizer.step#AdamW.step", ELEMENTWISE),
    ],
)  # fmt: skip
def test_torch_operators_group_by_name(name, group):
    assert profiling.torch_group(name) == group


@pytest.mark.parametrize(
    "op_type, group",
    [
        ("MatMul", MATRIX), ("_MklMatMul", MATRIX), ("_MklBatchMatMulV2", MATRIX),
        ("_MklEinsum", MATRIX), ("Conv2DBackpropFilter", MATRIX),
        ("DepthwiseConv2dNative", MATRIX), ("_MklTranspose", LAYOUT), ("ConcatV2", LAYOUT),
        ("StridedSliceGrad", LAYOUT), ("Erf", ELEMENTWISE), ("_MklLayerNorm", ELEMENTWISE),
        ("ResourceApplyAdam", ELEMENTWISE),
    ],
)  # fmt: skip
def test_tensorflow_op_types_group_by_name(op_type, group):
    assert profiling.tensorflow_group(op_type) == group


def test_summary_is_per_step_with_the_biggest_operations_first():
    ops = [("a", MATRIX, 6.0), ("b", LAYOUT, 2.0), ("a", MATRIX, 3.0), ("c", ELEMENTWISE, 4.0)]
    ops += [(f"small_{i}", ELEMENTWISE, 0.1) for i in range(profiling.TOP)]
    summary = profiling.summarize(ops, steps=2, seconds=0.01)
    assert summary["steps"] == 2 and summary["step_ms"] == pytest.approx(5.0)
    assert summary["groups"] == pytest.approx(
        {MATRIX: 4.5, LAYOUT: 1.0, ELEMENTWISE: 2.0 + 0.05 * profiling.TOP}
    )
    assert summary["traced_ms"] == pytest.approx(sum(summary["groups"].values()))
    top = summary["top"]
    assert len(top) == profiling.TOP
    assert [op["op"] for op in top[:3]] == ["a", "c", "b"]
    assert top[0] == {"op": "a", "group": MATRIX, "ms": pytest.approx(4.5)}
    assert [op["ms"] for op in top] == sorted((op["ms"] for op in top), reverse=True)


def test_report_table_lists_each_profiled_run():
    summary = profiling.summarize([("aten::mm", MATRIX, 3.0)], steps=1, seconds=0.004)
    text = profiling.table({"vit-pytorch": {"profile": summary}, "vitkit-jax": {}}, "train_b8")
    assert "train_b8" in text and "vit-pytorch" in text and "vitkit-jax" not in text
    assert "aten::mm" in text and "100.0%" in text


def test_profiled_process_flags_go_before_the_users(monkeypatch, tmp_path):
    """XLA stops reading XLA_FLAGS at the first word that is not a `--flag`: the dump (and
    TensorFlow's per-operation trace points) go first, and the user's flags stay."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false not_a_flag=1")
    profiling.prepare_xla(str(tmp_path), "tensorflow")
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == [
        f"--xla_dump_to={tmp_path}", "--xla_dump_hlo_as_text",
        "--xla_cpu_enable_xprof_traceme=true",
        "--xla_cpu_multi_thread_eigen=false", "not_a_flag=1",
    ]  # fmt: skip
