#!/usr/bin/env bash
# The generation engine's measurements on one GPU (docs/PERFORMANCE.md, "Generation engine"), run from
# the repository root: the engine's CUDA-graph test, `bench generate`, `bench serve`, the decode step alone
# (bench/decode_step.py), 3-turn chats (bench/chat_turns.py) and `crossvlm eval` on 1,000 short answers. Reports go to $OUT (default runs/engine).
set -uo pipefail
OUT=${OUT:-runs/engine}
PY=${PYTHON:-python3}
PRESET=${PRESET:-full}
MODELS=${MODELS:-/tmp/crossvlm-$PRESET}
SERVE_ARGS=${SERVE_ARGS:---baseline-requests 16}  # a quick try elsewhere: PRESET=tiny SERVE_ARGS="--requests 4 ..."
EXAMPLES=${EXAMPLES:-1000}
# One GPU call holds 10 minutes: PARTS="preprocess generate test eval" took 518 s on an H200. `serve` needs
# calls of its own: with --compile the server took 236 s to be ready at 64 slots, and the offline part
# compiles its own engine (Inductor's on-disk cache may make that second start shorter), so one call each, e.g.
#   PARTS=serve SERVE_ARGS="--compile --no-offline --concurrency 1 8 64 --baseline-requests 8"
#   PARTS=serve SERVE_ARGS="--compile --no-server --baseline-requests 0"
PARTS=${PARTS:-test preprocess generate serve decode turns eval}
has() { [[ " $PARTS " == *" $1 "* ]]; }
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
$PY -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
if has test; then  # every GPU-only test (engine graphs, packed kernels, bench); the files named, as the
    # GPU machine lacks the openai client some other test files import
    $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_engine.py tests/test_packing.py tests/test_bench.py 2>&1 \
        | tail -15 > "$OUT/gpu_test.txt"
    cat "$OUT/gpu_test.txt"
fi
if has preprocess; then  # one 640x480 JPEG through the image processor: each backend, on the CPU and the GPU
    $PY - <<'PYEOF' 2>&1 | tee "$OUT/preprocess.txt"
import time, numpy as np, torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPImageProcessorPil
im = Image.fromarray((np.random.default_rng(0).random((480, 640, 3)) * 255).astype("uint8"))
kw = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
for name, proc, extra in (("pil", CLIPImageProcessorPil(**kw), {}), ("torchvision cpu", CLIPImageProcessor(**kw), {}),
                          ("torchvision cuda", CLIPImageProcessor(**kw), {"device": "cuda"})):
    for threads in (torch.get_num_threads(), 1):
        torch.set_num_threads(threads)
        for _ in range(3): proc(images=[im], return_tensors="pt", **extra)
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(20): out = proc(images=[im], return_tensors="pt", **extra)["pixel_values"]
        torch.cuda.synchronize()
        print(f"{name}, {threads} threads: {(time.perf_counter() - t) / 20 * 1000:.2f} ms", tuple(out.shape), out.device)
PYEOF
fi
if has generate; then
    $PY -m crossvlm.cli bench generate --preset $PRESET --models "$MODELS" --variants ${GEN_VARIANTS:-dynamic,engine,engine+compile} \
        --profile "$WORK/prof" --out "$OUT/generate.json"
    cat "$WORK"/prof/*.kernels.txt > "$OUT/generate_kernels.txt" 2>/dev/null
fi
has serve && $PY -m crossvlm.cli bench serve --preset $PRESET --models "$MODELS" $SERVE_ARGS --out "$OUT/serve.json" 2>&1 \
    | tee "$OUT/serve.log"
if has decode; then  # the decode step alone: ms a step and its kernels at each batch (bench/decode_step.py)
    [ -d "$MODELS/llm" ] || $PY -m crossvlm.cli make-model --preset $PRESET --out "$MODELS" > /dev/null
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" $PY bench/decode_step.py "$MODELS" ${DECODE_ROWS:-1,64,256} ${DECODE_CONTEXT:-1100} 2>&1 | tee "$OUT/decode_step.txt"
fi
if has turns; then  # 3-turn chats with an image: each turn's first token, the prefix cache's share (bench/chat_turns.py)
    [ -d "$MODELS/llm" ] || $PY -m crossvlm.cli make-model --preset $PRESET --out "$MODELS" > /dev/null
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" $PY bench/chat_turns.py "$MODELS" ${TURN_WORDS:-300} 2>&1 | tee "$OUT/chat_turns.txt"
fi
has eval || exit 0
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
