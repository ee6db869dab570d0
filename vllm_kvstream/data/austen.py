"""Jane Austen's six novels, from the Debian package ``r-cran-janeaustenr``.

The CRAN package janeaustenr (Julia Silge, MIT licence; texts from Project
Gutenberg) ships each completed novel as a character vector, one element per
line of the Gutenberg text, blank lines kept as ``""``.  Debian packages it
as ``r-cran-janeaustenr``; this module fetches that ``.deb`` with
``apt-get download`` (no root needed, no R needed), unpacks it with
``dpkg-deb -x`` and decodes the vectors with the pure-Python reader in
:mod:`vllm_kvstream.data.rlazyload`.

Package layout (r-cran-janeaustenr 1.0.0-1, under
``usr/lib/R/site-library/janeaustenr/``): the novels are datasets, so they
live in the *data* lazy-load database ``data/Rdata.rdx``/``data/Rdata.rdb``
(objects ``sensesensibility``, ``prideprejudice``, ``mansfieldpark``,
``emma``, ``northangerabbey``, ``persuasion``; plain ``STRSXP`` vectors,
UTF-8).  ``R/janeaustenr.rdx`` is the *code* database; it holds only the
function ``austen_books()`` (a closure) and namespace bookkeeping.

Cache layout, under ``cache_dir()/"janeaustenr"`` (see
:func:`vllm_kvstream.models.cache_dir`)::

    package/.complete                   written last
    package/r-cran-janeaustenr_*.deb
    package/tree/usr/lib/R/site-library/janeaustenr/...
    text/.complete                      written last
    text/01-sense-and-sensibility.txt   one UTF-8 file per novel
    ...

Both folders are built in a temporary sibling and renamed into place, so an
interrupted run never looks finished; later calls only read the ``.txt``
files.

Command line (run by ``scripts/setup.sh``)::

    python -m vllm_kvstream.data.austen [--cache-dir PATH] [-v]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from vllm_kvstream import models
from vllm_kvstream.data.rlazyload import STRSXP, LazyLoadDB, RVector

logger = logging.getLogger(__name__)

__all__ = [
    "DEBIAN_PACKAGE",
    "NOVELS",
    "austen_novels",
    "austen_text",
    "ensure_janeaustenr",
    "main",
]

DEBIAN_PACKAGE = "r-cran-janeaustenr"
R_PACKAGE = "janeaustenr"

#: Novel title -> name of its dataset in janeaustenr, in publication order
#: (the order and titles of janeaustenr's ``austen_books()``).
NOVELS: dict[str, str] = {
    "Sense & Sensibility": "sensesensibility",
    "Pride & Prejudice": "prideprejudice",
    "Mansfield Park": "mansfieldpark",
    "Emma": "emma",
    "Northanger Abbey": "northangerabbey",
    "Persuasion": "persuasion",
}

#: Separator between novels in :func:`austen_text`.
NOVEL_SEPARATOR = "\n\n"

#: Bump when the extraction or decoding changes, so caches are rebuilt.
_PACKAGE_FORMAT = 1
_TEXT_FORMAT = 1
_PACKAGE_MARKER = {"package": DEBIAN_PACKAGE, "format": _PACKAGE_FORMAT}

_DOWNLOAD_TIMEOUT_S = 600
_STANDARD_PACKAGE_PATH = Path("usr/lib/R/site-library") / R_PACKAGE


def _default_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    return (models.cache_dir() / "janeaustenr").absolute()


def _manual_steps(dest: Path) -> str:
    return (
        f"on a Debian/Ubuntu machine run `apt-get download {DEBIAN_PACKAGE}` and "
        f"`dpkg-deb -x {DEBIAN_PACKAGE}_*.deb {dest / 'tree'}`, then write "
        f"'{json.dumps(_PACKAGE_MARKER, sort_keys=True)}' into {dest / models.MARKER}"
    )


def _run(cmd: list[str], cwd: Path, what: str, dest: Path) -> None:
    """Run ``cmd``; a failure becomes a ``RuntimeError`` that says what to do."""
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_DOWNLOAD_TIMEOUT_S,
            check=False,
        )
    except OSError as exc:
        raise RuntimeError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"{what}: `{' '.join(cmd)}` took more than {_DOWNLOAD_TIMEOUT_S} s"
        ) from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
        hint = ""
        if cmd[0] == "apt-get":
            hint = (
                f"; if apt cannot locate the package, refresh its lists with "
                f"`sudo apt-get update` and check that `apt-cache policy {DEBIAN_PACKAGE}` "
                f"shows a candidate (Debian/Ubuntu 'main'/'universe'); or "
                + _manual_steps(dest)
            )
        raise RuntimeError(
            f"{what}: `{' '.join(cmd)}` failed (exit {proc.returncode}): {detail}{hint}"
        )


def _find_package_dir(tree: Path) -> Path:
    """The janeaustenr R package folder inside an extracted ``.deb`` tree."""
    standard = tree / _STANDARD_PACKAGE_PATH
    if (standard / "DESCRIPTION").is_file():
        return standard
    for description in sorted(tree.rglob("DESCRIPTION")):
        if description.parent.name == R_PACKAGE:
            return description.parent
    raise RuntimeError(
        f"{tree} holds no R package folder '{R_PACKAGE}' (with a DESCRIPTION); "
        f"the {DEBIAN_PACKAGE} package layout has changed"
    )


def _download_and_extract(tmp: Path) -> None:
    """Fill ``tmp`` with the downloaded ``.deb`` and its extracted ``tree/``."""
    dest = tmp.parent / "package"
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"`{tool}` is not available, so {DEBIAN_PACKAGE} (Jane Austen's "
                f"novels) cannot be fetched; this needs a Debian/Ubuntu system, or: "
                + _manual_steps(dest)
            )
    logger.info("downloading %s with apt-get", DEBIAN_PACKAGE)
    _run(["apt-get", "download", DEBIAN_PACKAGE], tmp, "downloading the novels", dest)
    debs = sorted(tmp.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(
            f"`apt-get download {DEBIAN_PACKAGE}` left {len(debs)} .deb files in {tmp}, "
            "expected one; " + _manual_steps(dest)
        )
    logger.info("extracting %s", debs[0].name)
    _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "tree")], tmp, "extracting", dest)
    _find_package_dir(tmp / "tree")  # fail now, not later, if the layout is odd


def ensure_janeaustenr(cache_dir: str | Path | None = None) -> Path:
    """Download and unpack ``r-cran-janeaustenr`` once; return the R package folder.

    ``cache_dir`` defaults to ``vllm_kvstream.models.cache_dir() /
    "janeaustenr"``.  The returned folder holds ``DESCRIPTION``,
    ``data/Rdata.rdx`` etc.  Raises ``RuntimeError`` (saying what to run)
    if ``apt-get``/``dpkg-deb`` are missing or the download fails.
    """
    root = _default_root(cache_dir)
    dest = models._build_atomically(
        root / "package",
        _PACKAGE_MARKER,
        _download_and_extract,
    )
    return _find_package_dir(dest / "tree")


def _text_filename(index: int, title: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower().replace("&", "and")).strip("-")
    return f"{index + 1:02d}-{slug}.txt"


def _decode_novels(package_dir: Path) -> dict[str, str]:
    """Read the six character vectors from ``data/Rdata`` and join their lines."""
    db = LazyLoadDB(package_dir / "data" / "Rdata")
    missing = [name for name in NOVELS.values() if name not in db.variables]
    if missing:
        raise RuntimeError(
            f"{db.rdx} lacks the datasets {missing}; it holds {db.names()}"
        )
    novels: dict[str, str] = {}
    for title, name in NOVELS.items():
        value = db.get(name)
        if not isinstance(value, RVector) or value.sexptype != STRSXP:
            raise RuntimeError(f"{db.rdx}: {name!r} is not a character vector")
        lines: list[str] = []
        for line in value.values:
            if line is None:  # NA_character_: none in 1.0.0; read as a blank line
                lines.append("")
            elif isinstance(line, str):
                lines.append(line)
            else:
                raise RuntimeError(f"{db.rdx}: {name!r} has a bytes-encoded line")
        novels[title] = "\n".join(lines)
    return novels


def _text_dir(cache_dir: str | Path | None) -> Path:
    """Decoded novels as ``.txt`` files (built on first use)."""
    root = _default_root(cache_dir)
    package_dir = ensure_janeaustenr(root)

    def build(tmp: Path) -> None:
        logger.info("decoding the novels from %s", package_dir / "data" / "Rdata.rdb")
        novels = _decode_novels(package_dir)
        for index, (title, text) in enumerate(novels.items()):
            (tmp / _text_filename(index, title)).write_bytes(text.encode("utf-8"))

    return models._build_atomically(
        root / "text",
        {"format": _TEXT_FORMAT, "novels": list(NOVELS)},
        build,
    )


def austen_novels(cache_dir: str | Path | None = None) -> dict[str, str]:
    """Jane Austen's six novels, ``{title: text}``, in publication order.

    Titles as in janeaustenr: "Sense & Sensibility", "Pride & Prejudice",
    "Mansfield Park", "Emma", "Northanger Abbey", "Persuasion".  Each text
    is the package's lines joined with ``"\\n"`` (blank lines kept; the
    Project Gutenberg title lines at the top are part of it).  The first
    call downloads and decodes (see :func:`ensure_janeaustenr`); later calls
    read the cached ``.txt`` files.
    """
    folder = _text_dir(cache_dir)
    novels: dict[str, str] = {}
    for index, title in enumerate(NOVELS):
        path = folder / _text_filename(index, title)
        novels[title] = path.read_bytes().decode("utf-8")
    return novels


def austen_text(cache_dir: str | Path | None = None) -> str:
    """All six novels in publication order, separated by a blank line (``"\\n\\n"``)."""
    return NOVEL_SEPARATOR.join(austen_novels(cache_dir).values())


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: fetch and decode the novels, write a one-line summary."""
    parser = argparse.ArgumentParser(
        prog="python -m vllm_kvstream.data.austen",
        description=f"Download {DEBIAN_PACKAGE} (apt-get download) and decode "
        "Jane Austen's six novels into the cache.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache folder (default: the models cache dir / janeaustenr)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        package_dir = ensure_janeaustenr(args.cache_dir)
        novels = austen_novels(args.cache_dir)
        text = austen_text(args.cache_dir)
    except (RuntimeError, FileExistsError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    for title, novel in novels.items():
        logger.info("%s: %d characters", title, len(novel))
    logger.info("package folder: %s", package_dir)
    sys.stdout.write(
        f"Jane Austen: {len(novels)} novels, {len(text)} characters "
        f"(from {package_dir})\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
