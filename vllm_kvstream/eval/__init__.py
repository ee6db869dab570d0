"""Quality evaluations run through vLLM with the plugin: streaming perplexity and passkey
retrieval (``vllm-kvstream eval ...``). vLLM runs in a subprocess per run (``engine.py``)."""
