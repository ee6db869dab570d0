#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Usage: scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" HF_HUB_OFFLINE=1
exec python -m pytest -q "$@"
