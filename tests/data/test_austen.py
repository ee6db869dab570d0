"""Tests for vllm_kvstream.data: the R unserializer, the Austen loader, load_text.

The Austen tests need the Debian package r-cran-janeaustenr, fetched with
``apt-get download`` into ``cache_dir()/janeaustenr`` by ``scripts/setup.sh``
(or by the first test run, in about a second).  That is project setup: a
machine without apt-get fails these tests with the loader's message, it does
not skip them.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import struct
import zlib
from pathlib import Path

import pytest

from vllm_kvstream.data import austen, austen_novels, austen_text, load_text
from vllm_kvstream.data import rlazyload as rl

# --------------------------------------------------------------------------
# Hand-built XDR payloads
# --------------------------------------------------------------------------

R_VERSION = (4 << 16) | (2 << 8) | 1  # 4.2.1, as in r-cran-janeaustenr 1.0.0-1
MIN_READER_V3 = (3 << 16) | (5 << 8) | 0
MIN_READER_V2 = (2 << 16) | (3 << 8) | 0


def i32(value: int) -> bytes:
    return struct.pack(">i", value)


def header(version: int = 3) -> bytes:
    if version == 3:
        return b"X\n" + i32(3) + i32(R_VERSION) + i32(MIN_READER_V3) + i32(5) + b"UTF-8"
    return b"X\n" + i32(2) + i32(R_VERSION) + i32(MIN_READER_V2)


def flags(
    sexptype: int, *, obj: bool = False, attr: bool = False, tag: bool = False, levels: int = 0
) -> bytes:
    return i32(sexptype | obj << 8 | attr << 9 | tag << 10 | levels << 12)


def charsxp(value: str | None, levels: int = rl.UTF8_MASK, encoding: str = "utf-8") -> bytes:
    if value is None:
        return flags(rl.CHARSXP) + i32(-1)
    raw = value.encode(encoding)
    return flags(rl.CHARSXP, levels=levels) + i32(len(raw)) + raw


def strsxp(values: list[str | None], attrs: bytes = b"") -> bytes:
    body = b"".join(
        charsxp(v, rl.ASCII_MASK if v is not None and v.isascii() else rl.UTF8_MASK)
        for v in values
    )
    return flags(rl.STRSXP, attr=bool(attrs)) + i32(len(values)) + body + attrs


def intsxp(values: list[int | None], attrs: bytes = b"") -> bytes:
    body = b"".join(i32(rl.NA_INTEGER if v is None else v) for v in values)
    return flags(rl.INTSXP, attr=bool(attrs)) + i32(len(values)) + body + attrs


def symbol(name: str) -> bytes:
    return flags(rl.SYMSXP) + charsxp(name, rl.ASCII_MASK)


def ref(index: int) -> bytes:
    return i32(index << 8 | rl.REFSXP)


NIL = i32(rl.NILVALUE_SXP)


def attributes(*pairs: tuple[bytes, bytes]) -> bytes:
    """An attribute pairlist: (tag item bytes, value item bytes) pairs."""
    return b"".join(flags(rl.LISTSXP, tag=True) + tag + value for tag, value in pairs) + NIL


def vecsxp(items: list[bytes], attrs: bytes = b"") -> bytes:
    return flags(rl.VECSXP, attr=bool(attrs)) + i32(len(items)) + b"".join(items) + attrs


# --------------------------------------------------------------------------
# (a) round trips
# --------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3])
def test_strsxp_with_na_and_utf8(version: int) -> None:
    value = rl.unserialize(header(version) + strsxp(["plain", None, "Élinor — “£5” ✓"]))
    assert isinstance(value, rl.RVector)
    assert value.sexptype == rl.STRSXP
    assert value.values == ["plain", None, "Élinor — “£5” ✓"]
    assert value.attributes == {}


def test_charsxp_encodings() -> None:
    latin1 = charsxp("café", rl.LATIN1_MASK, "latin-1")
    raw = charsxp("\xff\x00", rl.BYTES_MASK, "latin-1")
    native = charsxp("naïve", 0)  # no flag: the header's native encoding (UTF-8)
    data = header(3) + flags(rl.STRSXP) + i32(3) + latin1 + raw + native
    assert rl.unserialize(data).values == ["café", b"\xff\x00", "naïve"]


def test_intsxp_with_na() -> None:
    value = rl.unserialize(header() + intsxp([1, None, -5, 2**31 - 1]))
    assert value.sexptype == rl.INTSXP
    assert value.values == [1, None, -5, 2**31 - 1]


def test_real_and_logical_vectors() -> None:
    na_real = struct.pack(">II", 0x7FF00000, 1954)
    nan = struct.pack(">d", math.nan)
    reals = flags(rl.REALSXP) + i32(4) + struct.pack(">dd", 1.5, -2.0) + na_real + nan
    logicals = flags(rl.LGLSXP) + i32(3) + i32(1) + i32(0) + i32(rl.NA_INTEGER)
    out = rl.unserialize(header() + vecsxp([reals, logicals]))
    real_values = out.values[0].values
    assert real_values[:3] == [1.5, -2.0, None]
    assert math.isnan(real_values[3])
    assert out.values[1].values == [True, False, None]


def test_named_list_with_names_attribute() -> None:
    names = attributes((symbol("names"), strsxp(["text", "counts", "nothing"])))
    data = header() + vecsxp([strsxp(["a", "b"]), intsxp([3, 4]), NIL], names)
    value = rl.unserialize(data)
    assert value.sexptype == rl.VECSXP
    assert value.names() == ["text", "counts", "nothing"]
    as_dict = value.to_dict()
    assert as_dict["text"].values == ["a", "b"]
    assert as_dict["counts"].values == [3, 4]
    assert as_dict["nothing"] is None


def test_symbol_back_reference() -> None:
    # The second "names" tag is a REFSXP to the symbol table's first entry,
    # as R writes it.
    first = intsxp([1], attributes((symbol("names"), strsxp(["x"]))))
    second = intsxp([2], attributes((ref(1), strsxp(["y"]))))
    value = rl.unserialize(header() + vecsxp([first, second]))
    assert value.values[0].names() == ["x"]
    assert value.values[1].names() == ["y"]


def test_pairlist_tags_and_attributes() -> None:
    class_attr = attributes((symbol("class"), strsxp(["thing"])))
    data = (
        header()
        + flags(rl.LISTSXP, attr=True, tag=True)
        + class_attr
        + symbol("first")
        + intsxp([1])
        + flags(rl.LISTSXP)  # untagged second node
        + strsxp(["two"])
        + NIL
    )
    value = rl.unserialize(data)
    assert isinstance(value, rl.RPairList)
    assert [tag for tag, _ in value.items] == ["first", None]
    assert value.items[1][1].values == ["two"]
    assert value.attributes["class"].values == ["thing"]


def test_environments_and_specials() -> None:
    env = (
        flags(rl.ENVSXP)
        + i32(0)  # not locked
        + i32(rl.GLOBALENV_SXP)  # enclosure
        + flags(rl.LISTSXP, tag=True) + symbol("x") + intsxp([7]) + NIL  # frame
        + NIL  # hash table
        + NIL  # attributes
    )
    specials = [i32(t) for t in (rl.EMPTYENV_SXP, rl.BASEENV_SXP, rl.MISSINGARG_SXP)]
    value = rl.unserialize(header() + vecsxp([env, ref(1), *specials]))
    first, again, empty, base, missing = value.values
    assert isinstance(first, rl.REnvironment)
    assert first.kind == "env" and first.enclosure.kind == "global"
    assert first.frame["x"].values == [7]
    assert again is first
    assert (empty.kind, base.kind) == ("empty", "base")
    assert missing == rl.RSpecial("MISSINGARG_SXP")


def test_namespace_reference() -> None:
    ns = flags(rl.NAMESPACESXP) + i32(0) + i32(2) + charsxp("janeaustenr") + charsxp("1.0.0")
    value = rl.unserialize(header() + vecsxp([ns, ref(1)]))
    assert value.values[0].kind == "namespace"
    assert value.values[0].info == ("janeaustenr", "1.0.0")
    assert value.values[1] is value.values[0]


# --------------------------------------------------------------------------
# (b) clear errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (rl.CLOSXP, "CLOSXP"),
        (rl.BCODESXP, "BCODESXP"),
        (rl.EXTPTRSXP, "EXTPTRSXP"),
        (99, "SEXP type 99"),
    ],
)
def test_unsupported_type_is_named(code: int, name: str) -> None:
    expected = f"unsupported R object: SEXP type {code}.*{name}"
    with pytest.raises(rl.RUnserializeError, match=expected):
        rl.unserialize(header() + vecsxp([intsxp([1]), flags(code) + i32(0)]))


def test_bad_header_and_truncation() -> None:
    with pytest.raises(rl.RUnserializeError, match="ASCII serialization is not supported"):
        rl.unserialize(b"A\n2\n")
    with pytest.raises(rl.RUnserializeError, match="truncated"):
        rl.unserialize(header() + strsxp(["abc"])[:-1])
    with pytest.raises(rl.RUnserializeError, match="REFSXP index 3"):
        rl.unserialize(header() + ref(3))


# --------------------------------------------------------------------------
# .rdb records and a lazy-load database built by hand
# --------------------------------------------------------------------------

PAYLOAD = header() + strsxp(["lazy", "loaded"])


@pytest.mark.parametrize(
    ("compressed", "body"),
    [
        (1, zlib.compress(PAYLOAD)),
        (2, b"2" + bz2.compress(PAYLOAD)),
        (2, b"0" + PAYLOAD),
        (3, b"X" + lzma.compress(PAYLOAD)),
        (3, b"Z" + zlib.compress(PAYLOAD)),
    ],
)
def test_rdb_record_compressions(compressed: int, body: bytes) -> None:
    record = len(PAYLOAD).to_bytes(4, "big") + body
    assert rl.decompress_rdb_record(record, compressed) == PAYLOAD


def test_rdb_record_errors() -> None:
    with pytest.raises(rl.RUnserializeError, match="unknown compression type byte"):
        rl.decompress_rdb_record(len(PAYLOAD).to_bytes(4, "big") + b"Q" + PAYLOAD, 3)
    with pytest.raises(rl.RUnserializeError, match="header says"):
        rl.decompress_rdb_record((len(PAYLOAD) + 1).to_bytes(4, "big") + zlib.compress(PAYLOAD), 1)


def test_lazy_load_db(tmp_path: Path) -> None:
    records = {"alpha": PAYLOAD, "beta": header() + intsxp([1, 2, 3])}
    rdb = b""
    offsets = {}
    for name, payload in records.items():
        record = len(payload).to_bytes(4, "big") + zlib.compress(payload)
        offsets[name] = (len(rdb), len(record))
        rdb += record
    names_sym = symbol("names")
    variables = vecsxp(
        [intsxp(list(pos)) for pos in offsets.values()],
        attributes((names_sym, strsxp(list(offsets)))),
    )
    index = vecsxp(
        [variables, vecsxp([]), flags(rl.LGLSXP) + i32(1) + i32(1)],
        attributes((ref(1), strsxp(["variables", "references", "compressed"]))),
    )
    (tmp_path / "db.rdx").write_bytes(gzip.compress(header() + index))
    (tmp_path / "db.rdb").write_bytes(rdb)

    db = rl.LazyLoadDB(tmp_path / "db")
    assert db.names() == ["alpha", "beta"]
    assert db.compressed == 1
    assert db.get("alpha").values == ["lazy", "loaded"]
    assert db.get("beta").values == [1, 2, 3]
    with pytest.raises(KeyError, match="'gamma' is not in"):
        db.get("gamma")


# --------------------------------------------------------------------------
# (c) the real novels
# --------------------------------------------------------------------------

TITLES = [
    "Sense & Sensibility",
    "Pride & Prejudice",
    "Mansfield Park",
    "Emma",
    "Northanger Abbey",
    "Persuasion",
]

#: Characters per novel in r-cran-janeaustenr 1.0.0-1 (lines joined by "\n").
EXPECTED_CHARS = {
    "Sense & Sensibility": 673_687,
    "Pride & Prejudice": 684_767,
    "Mansfield Park": 883_278,
    "Emma": 883_027,
    "Northanger Abbey": 433_410,
    "Persuasion": 466_853,
}


@pytest.fixture(scope="module")
def novels() -> dict[str, str]:
    return austen_novels()


def test_six_novels_in_publication_order(novels: dict[str, str]) -> None:
    assert list(novels) == TITLES
    for title, text in novels.items():
        # Within 5% of the packaged 1.0.0 texts (a later Debian revision may
        # touch up the Gutenberg text, but not by whole chapters).
        expected = EXPECTED_CHARS[title]
        assert 0.95 * expected < len(text) < 1.05 * expected, (title, len(text))
        assert len(text) > 100_000
        assert "Jane Austen" in text[:200], title
        assert "\n\n\n" in text  # blank lines are kept
    total = sum(len(text) for text in novels.values())
    assert 3_800_000 < total < 4_250_000
    assert total > 3_500_000


def test_pride_and_prejudice_opening(novels: dict[str, str]) -> None:
    text = novels["Pride & Prejudice"]
    assert text.startswith("PRIDE AND PREJUDICE\n")
    assert text.index("It is a truth universally acknowledged, that a single man") < 200


def test_austen_text_joins_the_novels(novels: dict[str, str]) -> None:
    text = austen_text()
    assert text == "\n\n".join(novels.values())
    assert len(text) > 3_500_000
    assert load_text("austen") == text


def test_package_layout() -> None:
    package_dir = austen.ensure_janeaustenr()
    assert (package_dir / "DESCRIPTION").is_file()
    db = rl.LazyLoadDB(package_dir / "data" / "Rdata")
    assert sorted(db.names()) == sorted(austen.NOVELS.values())


def test_missing_apt_get_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(austen.shutil, "which", lambda tool: None)
    expected = "`apt-get` is not available.*apt-get download r-cran-janeaustenr"
    with pytest.raises(RuntimeError, match=expected):
        austen.ensure_janeaustenr(tmp_path / "cache")
    assert not (tmp_path / "cache" / "package").exists()


# --------------------------------------------------------------------------
# (d) load_text
# --------------------------------------------------------------------------


def test_load_text_rejects_a_bad_source(tmp_path: Path) -> None:
    expected = r"'jane-austen' is invalid \(no such file\): use 'austen'.*UTF-8"
    with pytest.raises(ValueError, match=expected):
        load_text("jane-austen")
    with pytest.raises(ValueError, match=r"is invalid \(is a directory\)"):
        load_text(str(tmp_path))
    with pytest.raises(ValueError, match="is invalid"):
        load_text("")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8"):
        load_text(str(latin1))


def test_load_text_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "story.txt"
    path.write_bytes("It was a dark and stormy night — “£5”.\n\nThe end.\n".encode("utf-8"))
    assert load_text(str(path)) == "It was a dark and stormy night — “£5”.\n\nThe end.\n"
    assert load_text(path) == load_text(str(path))
