"""vllm-kvstream: bounded-memory, unbounded-length streaming KV-cache policies for vLLM.

Importing this package has no side effects. vLLM loads the plugin through the
``vllm.general_plugins`` entry point (:func:`vllm_kvstream.adapter.plugin.register`).
"""

__version__ = "0.1.0"
