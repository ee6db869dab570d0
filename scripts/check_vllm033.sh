#!/usr/bin/env bash
# The plugin against vLLM 0.33 (PyPI `vllm`, CUDA build) on a machine without a GPU: a venv of
# its own (about 6 GB: CUDA torch), the plugin installed into it, scripts/check_vllm033.py run
# on vLLM's CPU device type. Not part of the test suite (size). Usage: scripts/check_vllm033.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV033:-.venv033}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "vllm==0.33.0"
"$VENV/bin/pip" install -q --no-deps --force-reinstall .
# The tiny test model is built by the main venv's setup (scripts/setup.sh) if missing.
[ -d "$HOME/.cache/vllm-kvstream" ] || scripts/setup.sh
# Run outside the checkout: its top-level kernels/ folder must not shadow anything importable.
PY="$(realpath "$VENV")/bin/python"
SCRIPT="$PWD/scripts/check_vllm033.py"
cd /tmp && VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 exec "$PY" "$SCRIPT"
