#!/usr/bin/env bash
# The generation engine's measurements on one GPU (docs/PERFORMANCE.md, "Generation engine"), run from
# the repository root: the engine's CUDA-graph test, `bench generate`, `bench serve` and `crossvlm eval`
# on 1,000 short answers. Reports go to $OUT (default runs/engine).
set -uo pipefail
OUT=${OUT:-runs/engine}
PY=${PYTHON:-python3}
PRESET=${PRESET:-full}
MODELS=${MODELS:-/tmp/crossvlm-$PRESET}
SERVE_ARGS=${SERVE_ARGS:---baseline-requests 16}  # a quick try elsewhere: PRESET=tiny SERVE_ARGS="--requests 4 ..."
EXAMPLES=${EXAMPLES:-1000}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
$PY -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
$PY -m pytest -q -p no:cacheprovider tests/test_engine.py -k cuda 2>&1 | tail -15 > "$OUT/gpu_test.txt"
cat "$OUT/gpu_test.txt"
$PY -m crossvlm.cli bench generate --preset $PRESET --models "$MODELS" --variants dynamic,engine \
    --profile "$WORK/prof" --out "$OUT/generate.json"
cp "$WORK"/prof/*.kernels.txt "$OUT/" 2>/dev/null
$PY -m crossvlm.cli bench serve --preset $PRESET --models "$MODELS" $SERVE_ARGS --out "$OUT/serve.json"
# crossvlm eval, default settings, $EXAMPLES (1,000) short answers of 16 tokens; `--limit 1` times loading and start-up alone.
$PY - "$MODELS" "$WORK/vlm" <<'PYEOF'
import sys, torch
from crossvlm.model.modeling import CrossVLM
from crossvlm.model.processor import CrossVLMProcessor
models, out = sys.argv[1:]
model = CrossVLM.from_base_models(f"{models}/llm", f"{models}/vision", dtype=torch.bfloat16 if torch.cuda.is_available() else None)
model.save_pretrained(out)
CrossVLMProcessor.from_base_models(f"{models}/llm", f"{models}/vision", model.num_image_tokens).save_pretrained(out)
PYEOF
$PY -m crossvlm.cli data synth --out "$WORK/shapes" --train 1 --test $((EXAMPLES / 5)) > /dev/null
for limit in 1 $EXAMPLES; do
    start=$EPOCHREALTIME
    $PY -m crossvlm.cli eval --model "$WORK/vlm" --data "$WORK/shapes/sft_test.parquet" --limit $limit \
        --max-new-tokens 16 --out "$WORK/pred.jsonl" > "$WORK/metrics.json"
    echo "eval --limit $limit: $(awk "BEGIN {print $EPOCHREALTIME - $start}") s" | tee -a "$OUT/eval.txt"
done
