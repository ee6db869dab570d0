"""The only code in vllm-kvstream that imports vLLM.

* :mod:`.plugin`       - ``register()``, the ``vllm.general_plugins`` entry point.
* :mod:`.engine_args`  - ``--kv-policy`` / ``--kv-policy-config`` and config validation.
* :mod:`.kv_manager`   - the KV cache spec and scheduler-side manager that frees blocks.
* :mod:`.attention`    - the attention backend that reads only kept blocks.
* :mod:`.rope`         - the rotary-embedding override that keeps keys unrotated in the cache.
* :mod:`.compat`       - the supported vLLM range and probes of APIs that moved.
"""
