#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md: full fine-tuning (sdpa, which runs flash kernels on the GPU: flash-attn is not
# installed there), frozen vision, LoRA and QLoRA training steps of a full-size random-weight Phi-3.5-vision at
# DocVQA lengths (num_crops 16), plus the loss-memory comparison, then full fine-tuning under FSDP2 as --fsdp shards it
# (bench_train.py --fsdp, on every GPU there is), in under 8 minutes on one GPU.
#
#   bash bench/gpu.sh                                  # on the GPU machine; writes bench/RESULTS-gpu.md
#   PYTHON=.venv/bin/python RESULTS=/tmp/dry.md bash bench/gpu.sh --device cpu --model tiny --num_crops 1  # dry run
#
# Extra arguments go to bench/bench_train.py after the defaults below (in both runs), so they override them; RESULTS
# names the table's file, and the FSDP table goes next to it, named with -fsdp before .md (bench/RESULTS-gpu-fsdp.md).
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
if ! "$PYTHON" -c "import common.model.modeling_phi3v" 2>/dev/null; then
    "$PYTHON" -c "import transformers; print('transformers', transformers.__version__)" || true
    echo "gpu.sh: common/ does not import with this Python (transformers too old?); carry transformers 5.24 wheels" \
        "in .whl/ as bench/README.md says" >&2
    exit 1
fi

results=${RESULTS:-bench/RESULTS-gpu.md}
fsdp_results=${results%.md}-fsdp.md
# The 8-minute promise: modes not started after 280 s are skipped, the hard stops (380 s, then 90 s for the FSDP row)
# keep the tables so far (bench_train.py rewrites its table after every mode).
status=0
timeout 380 "$PYTHON" bench/bench_train.py \
    --model full-size --device cuda --num_crops 16 \
    --modes full frozen_vision lora qlora --policies batch1 padded grouped packed \
    --warmup 1 --steps 3 --max_seconds 60 --budget_seconds 280 --loss_memory \
    --out "$results" "$@" || status=$?
# On one GPU FSDP shards nothing: this row measures its overhead against the full batch1 row above, with the fp32
# master weights that accelerate keeps under --fsdp --bf16.
gpus=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
timeout 90 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$gpus" bench/bench_train.py --fsdp \
    --model full-size --device cuda --num_crops 16 --modes full --policies batch1 \
    --warmup 1 --steps 2 --max_seconds 30 \
    --out "$fsdp_results" "$@" || status=$?
# The device tool brings back only what is written under $OUT.
if [[ -n "${OUT:-}" ]]; then
    for table in "$results" "$fsdp_results"; do
        if [[ -f "$table" ]]; then
            cp "$table" "$OUT/"
        fi
    done
fi
exit "$status"
