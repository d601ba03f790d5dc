#!/usr/bin/env bash
# Creates ./.venv with the pinned requirements once; later calls only check that nothing changed.
# Sourced by demo.sh and test.sh. PYTHON selects the interpreter (default: python3.11, else python3).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
stamp="$venv/.requirements.sha256"
python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"
wanted="$(cat "$repo_root/requirements.txt" "$repo_root/tools/requirements-transformers4.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv with $python_bin"
    "$python_bin" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "[setup] installing requirements.txt (first run: a few minutes)"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r "$repo_root/requirements.txt"
    rm -rf "$venv/transformers4"
    "$venv/bin/python" -m pip install --quiet --target "$venv/transformers4" -r "$repo_root/tools/requirements-transformers4.txt" 2>&1 \
        | { grep -v "dependency resolver\|requires huggingface-hub" || true; }
    echo "$wanted" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
