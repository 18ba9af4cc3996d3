#!/usr/bin/env bash
# The GPU benchmark of docs/performance.md: mixed bfloat16, vitkit on JAX and eager PyTorch
# against vit-pytorch (under torch.autocast), at small batches (launch-bound) and large ones.
#   bash bench/gpu.sh OUTDIR
# Writes OUTDIR/vit_s16.json, OUTDIR/cvt_13.json and their tables to OUTDIR/log. About 7 minutes
# on an H100 (most of it XLA compiling and CvT's eager torch run).
set -euo pipefail
out=${1:?output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
python3 -m vitkit bench --workload vit_s16 --backend jax --backend torch --precision bfloat16 \
  --warmup 3 --repeats 20 --infer-batch 1 --infer-batch 8 --infer-batch 256 \
  --train-batch 8 --train-batch 128 --out "$out/vit_s16.json" 2>&1 | tee -a "$out/log"
python3 -m vitkit bench --workload cvt_13 --backend jax --backend torch --precision bfloat16 \
  --warmup 2 --repeats 10 --infer-batch 8 --infer-batch 256 \
  --train-batch 128 --out "$out/cvt_13.json" 2>&1 | tee -a "$out/log"
