"""Text data for long-context runs: Jane Austen's novels and plain-text files.

Importing this package has no side effects; the novels are downloaded
(``apt-get download r-cran-janeaustenr``) on first use.  The names below are
resolved lazily, so ``python -m vllm_kvstream.data.austen`` does not import
its own module twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_kvstream.data.austen import austen_novels, austen_text
    from vllm_kvstream.data.text import load_text

__all__ = ["austen_novels", "austen_text", "load_text"]

_EXPORTS = {
    "austen_novels": "vllm_kvstream.data.austen",
    "austen_text": "vllm_kvstream.data.austen",
    "load_text": "vllm_kvstream.data.text",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
