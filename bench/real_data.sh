#!/usr/bin/env bash
# Issue 15's measurement on one GPU: `crossvlm bench train --data` (the real loop on generated
# variable-length sets) beside the fixed-length step of the same shapes, both stages.
# Usage: OUT=dir bash bench/real_data.sh    (writes $OUT/sft_real.json, $OUT/pretrain_real.json)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}
M=${MODELS:-/tmp/crossvlm-full}
mkdir -p "$OUT"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
# PROFILE=1: each variant's profile (kernel tables ending with the GPU's idle time by host phase) in $OUT/prof
B="python3 -m crossvlm.cli bench train --preset full --models $M --compile --warmup ${WARMUP:-8} --steps ${STEPS:-12}"
[ -n "${PROFILE:-}" ] && B="$B --profile $OUT/prof"
$B --stage sft --data --batch-size ${SFT_BATCH:-64} --variants ${SFT_VARIANTS:-packed,varlen,fixed} \
  --out "$OUT/sft_real.json" 2>&1 | grep -v -E "Warning|warn\(" | tee "$OUT/sft_real.log"
$B --stage pretrain --data --batch-size ${PRETRAIN_BATCH:-256} --variants ${PRETRAIN_VARIANTS:-packed,fixed} \
  --out "$OUT/pretrain_real.json" 2>&1 | grep -v -E "Warning|warn\(" | tee "$OUT/pretrain_real.log"
