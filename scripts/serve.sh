#!/usr/bin/env bash
# Set up (idempotent) and start `vllm serve` on SmolLM2-135M-Instruct with the streaming-sink
# policy (4 sink tokens + 1020-token window) on 127.0.0.1:8000. Extra args go to vllm serve.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" HF_HUB_OFFLINE=1
MODEL="$(python -m vllm_kvstream.models smollm2)"
exec vllm serve "$MODEL" --served-model-name smollm2 --host 127.0.0.1 --port "${PORT:-8000}" \
  --kv-policy streaming-sink --kv-policy-config '{"sink_tokens": 4, "window_tokens": 1020}' "$@"
