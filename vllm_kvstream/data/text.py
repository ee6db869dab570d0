"""Text corpora by name or path, for long-context streaming runs."""

from __future__ import annotations

import os
from pathlib import Path

from vllm_kvstream.data.austen import austen_text

__all__ = ["TEXT_SOURCES", "load_text"]

#: Named sources :func:`load_text` accepts (besides a file path).
TEXT_SOURCES = ("austen",)

_ALLOWED = (
    "'austen' (Jane Austen's six novels, from the Debian package "
    "r-cran-janeaustenr) or the path of an existing UTF-8 plain-text file"
)


def load_text(source: str | os.PathLike[str]) -> str:
    """The text named by ``source``: ``"austen"`` or a path to a UTF-8 text file.

    ``"austen"`` is :func:`vllm_kvstream.data.austen.austen_text` (all six
    novels; downloaded on first use).  Any other value must be the path of
    a readable UTF-8 file.  Raises ``ValueError`` naming the bad value and
    the allowed forms otherwise.
    """
    if isinstance(source, str) and source == "austen":
        return austen_text()
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        raise ValueError(f"text source {source!r} is invalid: use {_ALLOWED}")
    path = Path(source).expanduser()
    if not path.is_file():
        reason = "is a directory" if path.is_dir() else "no such file"
        raise ValueError(
            f"text source {str(source)!r} is invalid ({reason}): use {_ALLOWED}"
        )
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"text source {str(source)!r} is not UTF-8 ({exc}): use {_ALLOWED}"
        ) from None
    except OSError as exc:
        raise ValueError(
            f"text source {str(source)!r} cannot be read ({exc}): use {_ALLOWED}"
        ) from exc
