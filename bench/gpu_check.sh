#!/usr/bin/env bash
# One prepared GPU check (parity + benchmark), sized to finish in under 10 minutes on an
# H100/H200. Run it through the device tool from the repo root, carrying a tokenizer:
#
#   here:   mkdir -p .gpu && cp .cache/models/qwen3-reranker-0.6b-random/tokenizer* .gpu/
#           (and `echo /.gpu/ >> .git/info/exclude`)
#   device: run(command="bash bench/gpu_check.sh", carry=[".gpu"], timeout_s=600)
#
# Figures land in $OUT (parity.json, bench.json, bench.log); copy them into
# docs/PERFORMANCE.md with the date and the card.
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
MODEL=/tmp/qwen3-reranker-0.6b-random
$PY -c "from worker.offline import make_random_reranker as m; m('$MODEL', '0.6b', tokenizer_from='.gpu')"
timeout 200 $PY bench/gpu_parity.py --model-dir "$MODEL" --out "$OUT/parity.json"
timeout 300 $PY bench/engine.py --model-dir "$MODEL" --device cuda --dtype bfloat16 \
    --workloads fixed,mixed,concurrent --docs 100 --doc-tokens 256 --concurrent 64 \
    --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
