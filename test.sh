#!/usr/bin/env bash
# The test suite, on CPU: installs the pinned requirements into ./.venv if needed, then runs pytest.
# Extra arguments go to pytest (e.g. ./test.sh -k collator).
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_env.sh
exec python -m pytest -q "$@"
