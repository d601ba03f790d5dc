#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md: full fine-tuning (sdpa, which runs flash kernels on the GPU: flash-attn is not
# installed there), frozen vision, LoRA and QLoRA training steps of a full-size random-weight Phi-3.5-vision at
# DocVQA lengths (num_crops 16), plus the loss-memory comparison, in under 8 minutes on one GPU.
#
#   bash bench/gpu.sh                                  # on the GPU machine; writes bench/RESULTS-gpu.md
#   PYTHON=.venv/bin/python RESULTS=/tmp/dry.md bash bench/gpu.sh --device cpu --model tiny --num_crops 1  # dry run
#
# Extra arguments go to bench/bench_train.py after the defaults below, so they override them; RESULTS names the
# table's file.
# common/ needs transformers >= 5.24; a machine with an older one gets it from wheels carried in .whl/
# (bench/README.md says how), installed into a temporary folder, never into the machine's environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c "import common.modeling_phi3v" 2>/dev/null; then
    "$PYTHON" -c "import transformers; print('transformers', transformers.__version__)" || true
    echo "gpu.sh: common/ does not import with this Python (transformers too old?); carry transformers 5.24 wheels" \
        "in .whl/ as bench/README.md says" >&2
    exit 1
fi

results=${RESULTS:-bench/RESULTS-gpu.md}
# The 8-minute promise: modes not started after 6 minutes are skipped, and the hard stop keeps the table so far
# (bench_train.py rewrites it after every mode).
status=0
timeout 470 "$PYTHON" bench/bench_train.py \
    --model full-size --device cuda --num_crops 16 \
    --modes full frozen_vision lora qlora --policies batch1 padded grouped packed \
    --warmup 1 --steps 3 --max_seconds 60 --budget_seconds 360 --loss_memory \
    --out "$results" "$@" || status=$?
# The device tool brings back only what is written under $OUT.
if [[ -n "${OUT:-}" && -f "$results" ]]; then
    cp "$results" "$OUT/"
fi
exit "$status"
