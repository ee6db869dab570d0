"""A minimal reader for R's serialization format and lazy-load databases.

Pure Python (``struct``, ``zlib``, ``bz2``, ``lzma``); no R needed.  It reads
what data packages hold -- character, integer, double and logical vectors,
lists, pairlists, symbols, attributes -- and fails with
:class:`RUnserializeError` naming the SEXP type for anything else (closures,
byte code, external pointers, S4 objects, ...).

Lazy-load databases
-------------------
An R package keeps its lazily loaded objects in two files, ``NAME.rdx`` and
``NAME.rdb`` (``R/<pkg>.rdx`` for code, ``data/Rdata.rdx`` for datasets,
``help/<pkg>.rdx`` for help pages).

``NAME.rdx``
    The index, written by ``saveRDS()``: a whole-file gzip stream in
    practice (bzip2, xz or uncompressed are possible too, and some writers
    use the ``.rdb`` record layout below; all are accepted).  It unserializes
    to a named list:

    * ``variables`` -- named list: object name -> integer vector
      ``c(offset, length)`` into ``NAME.rdb``;
    * ``references`` -- the same for environments the objects refer to
      (their serialized records are looked up by name through R's
      "persistent name" hook, see :class:`RPersistentRef`);
    * ``compressed`` -- how the ``.rdb`` records are compressed:
      ``TRUE``/1 zlib, 2 bzip2, 3 xz.

``NAME.rdb``
    Concatenated records; object ``name`` is the bytes
    ``[offset, offset + length)``.  A record is a 4-byte big-endian
    uncompressed length followed by the compressed data.  For
    ``compressed = 1`` the data is a zlib stream.  For 2 and 3 a type byte
    comes first: ``'Z'`` zlib, ``'2'`` bzip2, ``'X'`` xz, ``'0'`` stored
    uncompressed.  The decompressed bytes are one serialized R object.

Serialization (XDR binary, versions 2 and 3)
--------------------------------------------
Header: ``b"X\\n"``, then big-endian int32s: format version (2 or 3), the
writer's R version, the minimal reader R version; version 3 adds an int32
length and that many bytes naming the writer's native encoding.  (An
``.RData`` file from ``save()`` has an extra ``b"RDX2\\n"``/``b"RDX3\\n"``
line first; it is skipped.)

Then one item, recursively.  Every item starts with an int32 ``flags``::

    bits 0-7   SEXP type           type  = flags & 0xFF
    bit  8     is-object           (has a class attribute)
    bit  9     has-attributes
    bit  10    has-tag             (pairlist-like nodes only)
    bits 12-27 "levels" (gp field) levels = flags >> 12
                                   for CHARSXP: encoding bits
                                   2 bytes, 4 latin1, 8 UTF-8, 64 ASCII

All ints are big-endian int32 (``NA_integer_`` is ``-2**31``), doubles are
big-endian IEEE 754 (``NA_real_`` is the NaN whose low word is 1954).  A
vector length is an int32, or ``-1`` followed by two int32s (upper, lower)
for long vectors.

* ``CHARSXP`` (9): length, then that many bytes; length ``-1`` is
  ``NA_character_``.  (Attributes, if flagged, follow and are discarded.)
* ``LGLSXP`` (10), ``INTSXP`` (13): length, int32s.  ``REALSXP`` (14):
  length, doubles.  ``CPLXSXP`` (15): length, pairs of doubles.
  ``RAWSXP`` (24): length, bytes.
* ``STRSXP`` (16): length, then that many ``CHARSXP`` items.
  ``VECSXP`` (19), ``EXPRSXP`` (20): length, then that many items.
  For all vectors the attributes (a pairlist) follow the data.
* ``LISTSXP`` (2), ``LANGSXP`` (6), ...: attributes (if flagged), tag (if
  flagged; usually a symbol), CAR, then CDR -- the rest of the list, read
  as the next item (a chain ending in ``NILVALUE_SXP``).
* ``SYMSXP`` (1): one ``CHARSXP`` item, the name.  Added to the reference
  table.
* ``ENVSXP`` (4): int32 locked flag, then enclosure, frame (pairlist),
  hash table (list of pairlists) and attributes, each an item.  Added to
  the reference table *before* its contents are read.
* ``REFSXP`` (255): a back reference; the 1-based index into the reference
  table is ``flags >> 8``, or, if that is 0, the next int32.
* ``NAMESPACESXP`` (249), ``PACKAGESXP`` (248), ``PERSISTSXP`` (247): an
  int32 0, a count, then that many ``CHARSXP`` items (the name strings).
  Added to the reference table.
* Specials with no payload: ``NILVALUE_SXP`` (254, ``NULL``),
  ``GLOBALENV_SXP`` (253), ``UNBOUNDVALUE_SXP`` (252), ``MISSINGARG_SXP``
  (251), ``BASENAMESPACE_SXP`` (250), ``EMPTYENV_SXP`` (242),
  ``BASEENV_SXP`` (241).
* ``ALTREP_SXP`` (238): class info (pairlist: class symbol, package
  symbol, type), state, attributes.  Only the compact sequences and the
  ``wrap_*`` wrappers are expanded here.

Python representation
---------------------
``NULL`` -> ``None``; atomic vectors and lists -> :class:`RVector` (its
``values`` is a Python list, NA -> ``None``); pairlists ->
:class:`RPairList`; symbols -> :class:`RSymbol`; environments ->
:class:`REnvironment`; ``CHARSXP`` -> ``str`` (``bytes`` for
``"bytes"``-encoded strings), ``None`` for NA.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import math
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LazyLoadDB",
    "REnvironment",
    "RPairList",
    "RPersistentRef",
    "RSpecial",
    "RSymbol",
    "RUnserializeError",
    "RVector",
    "SEXP_TYPES",
    "decompress_rdb_record",
    "read_rds",
    "unserialize",
]

# --------------------------------------------------------------------------
# SEXP type codes (R's Rinternals.h and serialize.c)
# --------------------------------------------------------------------------

NILSXP = 0
SYMSXP = 1
LISTSXP = 2
CLOSXP = 3
ENVSXP = 4
PROMSXP = 5
LANGSXP = 6
SPECIALSXP = 7
BUILTINSXP = 8
CHARSXP = 9
LGLSXP = 10
INTSXP = 13
REALSXP = 14
CPLXSXP = 15
STRSXP = 16
DOTSXP = 17
ANYSXP = 18
VECSXP = 19
EXPRSXP = 20
BCODESXP = 21
EXTPTRSXP = 22
WEAKREFSXP = 23
RAWSXP = 24
S4SXP = 25

ALTREP_SXP = 238
ATTRLISTSXP = 239
ATTRLANGSXP = 240
BASEENV_SXP = 241
EMPTYENV_SXP = 242
BCREPREF = 243
BCREPDEF = 244
GENERICREFSXP = 245
CLASSREFSXP = 246
PERSISTSXP = 247
PACKAGESXP = 248
NAMESPACESXP = 249
BASENAMESPACE_SXP = 250
MISSINGARG_SXP = 251
UNBOUNDVALUE_SXP = 252
GLOBALENV_SXP = 253
NILVALUE_SXP = 254
REFSXP = 255

#: Names of the SEXP type codes, for messages.
SEXP_TYPES: dict[int, str] = {
    NILSXP: "NILSXP",
    SYMSXP: "SYMSXP",
    LISTSXP: "LISTSXP",
    CLOSXP: "CLOSXP",
    ENVSXP: "ENVSXP",
    PROMSXP: "PROMSXP",
    LANGSXP: "LANGSXP",
    SPECIALSXP: "SPECIALSXP",
    BUILTINSXP: "BUILTINSXP",
    CHARSXP: "CHARSXP",
    LGLSXP: "LGLSXP",
    INTSXP: "INTSXP",
    REALSXP: "REALSXP",
    CPLXSXP: "CPLXSXP",
    STRSXP: "STRSXP",
    DOTSXP: "DOTSXP",
    ANYSXP: "ANYSXP",
    VECSXP: "VECSXP",
    EXPRSXP: "EXPRSXP",
    BCODESXP: "BCODESXP",
    EXTPTRSXP: "EXTPTRSXP",
    WEAKREFSXP: "WEAKREFSXP",
    RAWSXP: "RAWSXP",
    S4SXP: "S4SXP (OBJSXP)",
    ALTREP_SXP: "ALTREP_SXP",
    ATTRLISTSXP: "ATTRLISTSXP",
    ATTRLANGSXP: "ATTRLANGSXP",
    BASEENV_SXP: "BASEENV_SXP",
    EMPTYENV_SXP: "EMPTYENV_SXP",
    BCREPREF: "BCREPREF",
    BCREPDEF: "BCREPDEF",
    GENERICREFSXP: "GENERICREFSXP",
    CLASSREFSXP: "CLASSREFSXP",
    PERSISTSXP: "PERSISTSXP",
    PACKAGESXP: "PACKAGESXP",
    NAMESPACESXP: "NAMESPACESXP",
    BASENAMESPACE_SXP: "BASENAMESPACE_SXP",
    MISSINGARG_SXP: "MISSINGARG_SXP",
    UNBOUNDVALUE_SXP: "UNBOUNDVALUE_SXP",
    GLOBALENV_SXP: "GLOBALENV_SXP",
    NILVALUE_SXP: "NILVALUE_SXP",
    REFSXP: "REFSXP",
}

# Flag bits of an item header.
IS_OBJECT_BIT = 1 << 8
HAS_ATTR_BIT = 1 << 9
HAS_TAG_BIT = 1 << 10
LEVELS_SHIFT = 12

# CHARSXP encoding bits (in the levels field).
BYTES_MASK = 1 << 1
LATIN1_MASK = 1 << 2
UTF8_MASK = 1 << 3
ASCII_MASK = 1 << 6

NA_INTEGER = -(2**31)
#: Low 32 bits of R's NA_real_ NaN payload.
NA_REAL_LOW_WORD = 1954

_PAIRLIST_TYPES = (LISTSXP, LANGSXP, DOTSXP)


def sexp_name(code: int) -> str:
    """Name of SEXP type ``code`` (``"SEXP type 99"`` when unknown)."""
    return SEXP_TYPES.get(code, f"SEXP type {code}")


class RUnserializeError(ValueError):
    """The bytes are not an R serialization this reader understands.

    The message names the SEXP type (or the format problem) and the byte
    offset where it was found.
    """


# --------------------------------------------------------------------------
# Python-side values
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RSymbol:
    """An R symbol (``SYMSXP``), e.g. a list tag or a class name."""

    name: str


@dataclass(frozen=True)
class RSpecial:
    """One of R's singleton values other than ``NULL``.

    ``name`` is the serialization tag, e.g. ``"GLOBALENV_SXP"``,
    ``"MISSINGARG_SXP"``.
    """

    name: str


@dataclass(frozen=True)
class RPersistentRef:
    """A ``PERSISTSXP`` item: an object R stored by name outside the stream.

    In a lazy-load database these are the environments listed under the
    index's ``references``; ``names`` is the key (e.g. ``("env::1",)``).
    """

    names: tuple[str | None, ...]


@dataclass
class RVector:
    """An R vector: atomic (``STRSXP``, ``INTSXP``, ...) or a list (``VECSXP``).

    ``values`` holds Python values, ``None`` for ``NA`` (and for ``NULL``
    list elements).  ``attributes`` maps attribute names to unserialized
    values (e.g. ``"names"`` -> an ``RVector`` of strings).
    """

    sexptype: int
    values: list[Any]
    attributes: dict[str, Any] = field(default_factory=dict)
    is_object: bool = False

    @property
    def type_name(self) -> str:
        """The SEXP type's name, e.g. ``"STRSXP"``."""
        return sexp_name(self.sexptype)

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.values)

    def __getitem__(self, index: int) -> Any:
        return self.values[index]

    def names(self) -> list[str | None] | None:
        """The ``names`` attribute as a list, or ``None`` if there is none."""
        names = self.attributes.get("names")
        if names is None:
            return None
        if not isinstance(names, RVector) or names.sexptype != STRSXP:
            raise RUnserializeError(
                f"'names' attribute of a {self.type_name} is not a character vector"
            )
        return list(names.values)

    def to_dict(self) -> dict[str, Any]:
        """A named vector or list as ``{name: value}``.

        Raises :class:`RUnserializeError` if it has no names, or a name is
        ``NA`` or repeated.
        """
        names = self.names()
        if names is None:
            raise RUnserializeError(f"this {self.type_name} has no names")
        out: dict[str, Any] = {}
        for name, value in zip(names, self.values):
            if not isinstance(name, str) or name in out:
                raise RUnserializeError(
                    f"{self.type_name} names are not unique strings: {name!r}"
                )
            out[name] = value
        return out


@dataclass
class RPairList:
    """An R pairlist (``LISTSXP``) or call (``LANGSXP``): ``(tag, value)`` items.

    ``tag`` is the item's name (``None`` if untagged).  ``attributes`` are
    the attributes of the first node, as R stores them.
    """

    items: list[tuple[str | None, Any]]
    attributes: dict[str, Any] = field(default_factory=dict)
    sexptype: int = LISTSXP

    def __len__(self) -> int:
        return len(self.items)

    def to_dict(self) -> dict[str, Any]:
        """Tagged items as ``{tag: value}`` (untagged items are skipped)."""
        return {tag: value for tag, value in self.items if tag is not None}


@dataclass(eq=False)
class REnvironment:
    """An environment (``ENVSXP``, or a namespace/package reference).

    ``kind`` is ``"env"`` for a serialized environment, ``"global"``,
    ``"base"``, ``"empty"``, ``"base-namespace"`` for R's singletons, or
    ``"namespace"`` / ``"package"`` for a reference by name (``info`` then
    holds the strings R wrote, e.g. the namespace name and version).
    ``frame`` holds the bindings of a serialized environment.
    """

    kind: str
    frame: dict[str, Any] = field(default_factory=dict)
    enclosure: Any = None
    locked: bool = False
    attributes: dict[str, Any] = field(default_factory=dict)
    info: tuple[str | None, ...] = ()


# --------------------------------------------------------------------------
# The unserializer
# --------------------------------------------------------------------------

_INT = struct.Struct(">i")


class _Reader:
    """Reads one serialized R object from ``data`` (XDR format)."""

    def __init__(
        self,
        data: bytes,
        persistent_hook: Callable[[tuple[str | None, ...]], Any] | None,
    ) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []
        self.native_encoding = "utf-8"
        self.persistent_hook = persistent_hook

    # -- primitives ---------------------------------------------------------

    def error(self, message: str) -> RUnserializeError:
        return RUnserializeError(f"{message} (at byte {self.pos} of {len(self.data)})")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.error(f"truncated data: wanted {n} bytes")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise self.error("truncated data: wanted a 4-byte integer")
        (value,) = _INT.unpack_from(self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int32()
        if n == -1:
            upper = self.int32()
            lower = self.int32()
            n = (upper << 32) + (lower & 0xFFFFFFFF)
        if n < 0:
            raise self.error(f"negative vector length {n}")
        return n

    def ints(self, n: int) -> list[int | None]:
        raw = self.take(4 * n)
        return [None if v == NA_INTEGER else v for v in struct.unpack(f">{n}i", raw)]

    def doubles(self, n: int) -> list[float | None]:
        raw = self.take(8 * n)
        values: list[float | None] = list(struct.unpack(f">{n}d", raw))
        for i, v in enumerate(values):
            if v is not None and math.isnan(v):
                low = struct.unpack_from(">I", raw, 8 * i + 4)[0]
                if low == NA_REAL_LOW_WORD:
                    values[i] = None
        return values

    # -- header -------------------------------------------------------------

    def header(self) -> None:
        if self.data[:5] in (b"RDX2\n", b"RDX3\n"):
            self.pos = 5
        fmt = self.take(2)
        if fmt != b"X\n":
            kinds = {b"A\n": "ASCII", b"B\n": "native binary"}
            if fmt in kinds:
                raise self.error(
                    f"R {kinds[fmt]} serialization is not supported, only XDR ('X\\n')"
                )
            raise self.error(f"not an R XDR serialization: starts with {fmt!r}")
        version = self.int32()
        self.int32()  # writer's R version
        self.int32()  # minimal reader R version
        if version == 3:
            n = self.int32()
            encoding = self.take(n).decode("ascii", "replace")
            self.native_encoding = _python_codec(encoding)
        elif version != 2:
            raise self.error(f"unsupported serialization format version {version}")

    # -- items --------------------------------------------------------------

    def item(self) -> Any:
        flags = self.int32()
        sexptype = flags & 0xFF
        if sexptype == NILVALUE_SXP:
            return None
        if sexptype == REFSXP:
            index = flags >> 8
            if index == 0:
                index = self.int32()
            if not 1 <= index <= len(self.refs):
                raise self.error(
                    f"REFSXP index {index} outside the reference table "
                    f"(size {len(self.refs)})"
                )
            return self.refs[index - 1]
        if sexptype in _PAIRLIST_TYPES:
            return self.pairlist(flags)

        special = _SINGLETONS.get(sexptype)
        if special is not None:
            return special
        if sexptype == SYMSXP:
            name = self.item()
            if not isinstance(name, str):
                raise self.error("SYMSXP whose name is not a string")
            sym = RSymbol(name)
            self.refs.append(sym)
            return sym
        if sexptype in (NAMESPACESXP, PACKAGESXP):
            env = REnvironment(
                kind="namespace" if sexptype == NAMESPACESXP else "package",
                info=self.string_vec(),
            )
            self.refs.append(env)
            return env
        if sexptype == PERSISTSXP:
            names = self.string_vec()
            value = (
                self.persistent_hook(names) if self.persistent_hook else RPersistentRef(names)
            )
            self.refs.append(value)
            return value
        if sexptype == ENVSXP:
            return self.environment()
        if sexptype == ALTREP_SXP:
            return self.altrep()
        if sexptype == CHARSXP:
            value = self.charsxp(flags >> LEVELS_SHIFT)
            if flags & HAS_ATTR_BIT:
                self.item()  # R discards CHARSXP attributes too
            return value
        return self.vector(flags)

    def string_vec(self) -> tuple[str | None, ...]:
        if self.int32() != 0:
            raise self.error("names of a reference (InStringVec) are not supported")
        n = self.int32()
        out = []
        for _ in range(n):
            value = self.item()
            if value is not None and not isinstance(value, str):
                raise self.error("a reference name is not a string")
            out.append(value)
        return tuple(out)

    def charsxp(self, levels: int) -> str | bytes | None:
        n = self.int32()
        if n == -1:
            return None
        raw = self.take(n)
        if levels & UTF8_MASK:
            codec = "utf-8"
        elif levels & LATIN1_MASK:
            codec = "latin-1"
        elif levels & BYTES_MASK:
            return raw
        elif levels & ASCII_MASK:
            codec = "ascii"
        else:
            codec = self.native_encoding
        try:
            return raw.decode(codec)
        except UnicodeDecodeError as exc:
            raise self.error(f"CHARSXP is not valid {codec}: {exc}") from None

    def attributes(self) -> dict[str, Any]:
        value = self.item()
        if value is None:
            return {}
        if not isinstance(value, RPairList):
            raise self.error("attributes are not a pairlist")
        return value.to_dict()

    def pairlist(self, flags: int) -> RPairList:
        head = RPairList(items=[], sexptype=flags & 0xFF)
        first = True
        # Iterate along the CDR chain (pairlists can be long; no recursion).
        while True:
            attrs = self.attributes() if flags & HAS_ATTR_BIT else {}
            if first:
                head.attributes = attrs
                first = False
            tag: str | None = None
            if flags & HAS_TAG_BIT:
                tag_value = self.item()
                if isinstance(tag_value, RSymbol):
                    tag = tag_value.name
                elif isinstance(tag_value, str):
                    tag = tag_value
                elif tag_value is not None:
                    raise self.error(f"pairlist tag of type {type(tag_value).__name__}")
            head.items.append((tag, self.item()))
            flags = self.int32()
            sexptype = flags & 0xFF
            if sexptype in _PAIRLIST_TYPES:
                continue
            if sexptype == NILVALUE_SXP:
                return head
            # A dotted pair ending in something other than NULL: read it as
            # an item whose flags we already consumed.
            self.pos -= 4
            tail = self.item()
            head.items.append((None, tail))
            return head

    def environment(self) -> REnvironment:
        locked = self.int32() != 0
        env = REnvironment(kind="env", locked=locked)
        self.refs.append(env)  # before the contents, which may refer to it
        env.enclosure = self.item()
        frame = self.item()
        hashtab = self.item()
        attrs = self.item()
        if isinstance(frame, RPairList):
            env.frame.update(frame.to_dict())
        if isinstance(hashtab, RVector):
            for bucket in hashtab.values:
                if isinstance(bucket, RPairList):
                    env.frame.update(bucket.to_dict())
        if isinstance(attrs, RPairList):
            env.attributes = attrs.to_dict()
        return env

    def vector(self, flags: int) -> RVector:
        sexptype = flags & 0xFF
        values: list[Any]
        if sexptype in (INTSXP, LGLSXP):
            values = self.ints(self.length())
            if sexptype == LGLSXP:
                values = [None if v is None else bool(v) for v in values]
        elif sexptype == REALSXP:
            values = self.doubles(self.length())
        elif sexptype == CPLXSXP:
            parts = self.doubles(2 * self.length())
            values = [
                None if re is None or im is None else complex(re, im)
                for re, im in zip(parts[0::2], parts[1::2])
            ]
        elif sexptype == STRSXP:
            n = self.length()
            values = []
            for _ in range(n):
                item_flags = self.int32()
                if item_flags & 0xFF != CHARSXP:
                    raise self.error(
                        f"STRSXP element is a {sexp_name(item_flags & 0xFF)}, "
                        "not a CHARSXP"
                    )
                values.append(self.charsxp(item_flags >> LEVELS_SHIFT))
                if item_flags & HAS_ATTR_BIT:
                    self.item()
        elif sexptype in (VECSXP, EXPRSXP):
            values = [self.item() for _ in range(self.length())]
        elif sexptype == RAWSXP:
            values = list(self.take(self.length()))
        else:
            self.pos -= 4
            raise self.error(
                f"unsupported R object: SEXP type {sexptype} ({sexp_name(sexptype)}); "
                "this reader handles vectors, lists, pairlists, symbols and "
                "environments only"
            )
        attrs = self.attributes() if flags & HAS_ATTR_BIT else {}
        return RVector(sexptype, values, attrs, bool(flags & IS_OBJECT_BIT))

    def altrep(self) -> Any:
        info = self.item()
        state = self.item()
        attrs = self.attributes()
        cls = None
        if isinstance(info, RPairList) and info.items and isinstance(info.items[0][1], RSymbol):
            cls = info.items[0][1].name
        value: RVector
        if cls in ("compact_intseq", "compact_realseq") and isinstance(state, RVector):
            n, start, step = (state.values + [None, None, None])[:3]
            if n is None or start is None or step is None:
                raise self.error(f"malformed ALTREP {cls} state")
            seq = [start + i * step for i in range(int(n))]
            if cls == "compact_intseq":
                value = RVector(INTSXP, [int(v) for v in seq])
            else:
                value = RVector(REALSXP, [float(v) for v in seq])
        elif (
            cls is not None
            and cls.startswith("wrap_")
            and isinstance(state, RVector)
            and state.values
            and isinstance(state.values[0], RVector)
        ):
            inner = state.values[0]
            value = RVector(inner.sexptype, inner.values, dict(inner.attributes), inner.is_object)
        else:
            raise self.error(
                f"unsupported R object: SEXP type {ALTREP_SXP} (ALTREP_SXP) "
                f"of class {cls!r}"
            )
        if attrs:
            value.attributes = attrs
            value.is_object = "class" in attrs
        return value


_SINGLETONS: dict[int, Any] = {
    GLOBALENV_SXP: REnvironment(kind="global"),
    EMPTYENV_SXP: REnvironment(kind="empty"),
    BASEENV_SXP: REnvironment(kind="base"),
    BASENAMESPACE_SXP: REnvironment(kind="base-namespace"),
    UNBOUNDVALUE_SXP: RSpecial("UNBOUNDVALUE_SXP"),
    MISSINGARG_SXP: RSpecial("MISSINGARG_SXP"),
}


def _python_codec(r_encoding: str) -> str:
    """Python codec for R's native-encoding name (``"UTF-8"``, ``"latin1"``, ...)."""
    name = r_encoding.strip().lower()
    if name in ("", "utf-8", "utf8"):
        return "utf-8"
    if name in ("latin1", "iso-8859-1", "iso8859-1"):
        return "latin-1"
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "utf-8"


def unserialize(
    data: bytes,
    persistent_hook: Callable[[tuple[str | None, ...]], Any] | None = None,
) -> Any:
    """Unserialize one R object from XDR bytes (``serialize()`` output).

    ``persistent_hook`` maps the names of a ``PERSISTSXP`` item to a value;
    without one, such items become :class:`RPersistentRef`.  Raises
    :class:`RUnserializeError` for malformed data or unsupported types.
    """
    reader = _Reader(bytes(data), persistent_hook)
    reader.header()
    return reader.item()


# --------------------------------------------------------------------------
# Files: .rds and lazy-load databases
# --------------------------------------------------------------------------


def _decompress_whole(raw: bytes, what: str) -> bytes:
    """Decompress an ``.rds``-style file (gzip, bzip2, xz or none)."""
    try:
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        if raw[:3] == b"BZh":
            return bz2.decompress(raw)
        if raw[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(raw)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise RUnserializeError(f"{what}: cannot decompress: {exc}") from None
    if raw[:2] in (b"X\n", b"A\n", b"B\n") or raw[:5] in (b"RDX2\n", b"RDX3\n"):
        return raw
    # Some writers store the index like an .rdb record (length + zlib).
    return decompress_rdb_record(raw, 1, what)


def read_rds(path: str | Path) -> Any:
    """Read an ``.rds`` file (``saveRDS()`` output, any of R's compressions)."""
    path = Path(path)
    return unserialize(_decompress_whole(path.read_bytes(), str(path)))


def decompress_rdb_record(record: bytes, compressed: int, what: str = "record") -> bytes:
    """Decompress one ``.rdb`` record, given the index's ``compressed`` value.

    See the module docstring for the layout.  The result's length is
    checked against the 4-byte header.
    """
    if len(record) < 4:
        raise RUnserializeError(f"{what}: record of {len(record)} bytes is too short")
    expected = int.from_bytes(record[:4], "big")
    body = record[4:]
    try:
        if compressed in (2, 3):
            kind, body = body[:1], body[1:]
            if kind == b"0":
                out = body
            elif kind == b"Z":
                out = zlib.decompress(body)
            elif kind == b"2":
                out = bz2.decompress(body)
            elif kind == b"X":
                out = lzma.decompress(body)
            else:
                raise RUnserializeError(
                    f"{what}: unknown compression type byte {kind!r} "
                    "(expected 'Z', '2', 'X' or '0')"
                )
        elif compressed in (0, 1):
            out = zlib.decompress(body)
        else:
            raise RUnserializeError(f"{what}: unknown compression scheme {compressed}")
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise RUnserializeError(f"{what}: cannot decompress: {exc}") from None
    if len(out) != expected:
        raise RUnserializeError(
            f"{what}: decompressed to {len(out)} bytes, header says {expected}"
        )
    return out


class LazyLoadDB:
    """An R lazy-load database: ``BASE.rdx`` (index) + ``BASE.rdb`` (records).

    ``LazyLoadDB(".../data/Rdata")`` (the ``.rdx``/``.rdb`` suffix may be
    given too).  Reading happens on demand; nothing is read at construction
    except the index.
    """

    def __init__(self, base: str | Path) -> None:
        base = Path(base)
        if base.suffix in (".rdx", ".rdb"):
            base = base.with_suffix("")
        self.rdx = base.with_suffix(".rdx")
        self.rdb = base.with_suffix(".rdb")
        for path in (self.rdx, self.rdb):
            if not path.is_file():
                raise FileNotFoundError(f"lazy-load database file {path} does not exist")
        index = read_rds(self.rdx)
        if not isinstance(index, RVector) or index.sexptype != VECSXP:
            raise RUnserializeError(f"{self.rdx}: the index is not an R list")
        parts = index.to_dict()
        self.variables = self._offsets(parts.get("variables"), "variables")
        self.references = self._offsets(parts.get("references"), "references")
        compressed = parts.get("compressed")
        value: Any = True
        if isinstance(compressed, RVector) and compressed.values:
            value = compressed.values[0]
        self.compressed = int(value) if value is not None else 1

    def _offsets(self, value: Any, what: str) -> dict[str, tuple[int, int]]:
        if value is None:
            return {}
        if not isinstance(value, RVector) or value.sexptype != VECSXP:
            raise RUnserializeError(f"{self.rdx}: '{what}' is not a list")
        if not value.values:
            return {}
        out: dict[str, tuple[int, int]] = {}
        for name, pos in value.to_dict().items():
            if not isinstance(pos, RVector) or len(pos) != 2 or None in pos.values:
                raise RUnserializeError(f"{self.rdx}: bad offsets for {what} {name!r}")
            out[name] = (int(pos.values[0]), int(pos.values[1]))
        return out

    def names(self) -> list[str]:
        """Names of the objects in the database, in index order."""
        return list(self.variables)

    def _record(self, offset: int, length: int, what: str) -> bytes:
        with self.rdb.open("rb") as fh:
            fh.seek(offset)
            record = fh.read(length)
        if len(record) != length:
            raise RUnserializeError(
                f"{self.rdb}: {what} at [{offset}, {offset + length}) is past the end"
            )
        return decompress_rdb_record(record, self.compressed, f"{self.rdb}: {what}")

    def get(self, name: str) -> Any:
        """Unserialize object ``name``.  ``KeyError`` lists the names if absent.

        Environments the object refers to (the index's ``references``) are
        returned as :class:`RPersistentRef`; they are not loaded.
        """
        if name not in self.variables:
            raise KeyError(f"{name!r} is not in {self.rdx}; it holds {self.names()}")
        offset, length = self.variables[name]
        return unserialize(self._record(offset, length, repr(name)))
