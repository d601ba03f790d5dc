#!/usr/bin/env bash
# Creates ./.venv with the pinned requirements once; later calls only check that nothing changed.
# Sourced by demo.sh and test.sh. PYTHON selects the interpreter (default: python3.11, else python3).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
stamp="$venv/.requirements.sha256"
python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"
wanted="$(sha256sum "$repo_root/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv with $python_bin"
    "$python_bin" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "[setup] installing requirements.txt (first run: a few minutes)"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r "$repo_root/requirements.txt"
    echo "$wanted" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
