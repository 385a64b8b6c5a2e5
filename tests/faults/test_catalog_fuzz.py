"""Hostile input for the catalog (hypothesis): random text, bytes and TOML documents.

Properties: nothing but ``CatalogError`` ever escapes, every message is one line, no accepted
entry can name a path outside its folder, and the keeper never trades its last good catalog for
a bad one. Deterministic (``derandomize``) and bounded so CI stays stable and fast.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path

import tomlkit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeld.catalog import (ENTRY_KEYS, GATE_KEYS, NAME_RE, Catalog, CatalogMemo,
                            catalog_from_bytes, parse_catalog)
from modeld.catalog_file import CatalogKeeper
from modeld.errors import CatalogError
from modeld.methods import METHODS

#: MODELD_FUZZ_SCALE=20 runs 20 times the examples with a random seed: a deeper hunt by hand;
#: CI keeps 1 (derandomized, so a run is reproducible)
SCALE = int(os.environ.get("MODELD_FUZZ_SCALE", "1"))


def fuzz(max_examples: int) -> settings:
    return settings(derandomize=SCALE == 1, deadline=None, database=None,
                    max_examples=max_examples * SCALE,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ------------------------------------------------------------------------------ strategies

HOSTILE_STRINGS = [
    "", ".", "..", "../..", "/", "//", "/etc/passwd", "a/../../b", "..\\..\\x", "a\\b", "a\x00b",
    "\x00", "\n", "a\nb", "\u2028", "\ud800", "~", "~/x", "C:/x", "C:\\x", "a//b", "a/./b", "./a",
    "a/", " a", "a ", "\t", "con", "-rf", "*", "?", "%2e%2e/x", "..%2f", "\u202e", "Ａ", "é",
    "x" * 65, "x" * 1025, "a" * 96 + "/b", "deepghs/yolos", "yolov8n", "yolov8n/model.onnx",
    "main", "refs/pr/1", "CPUExecutionProvider", "yolo", "QUInt8", "fp16", "static_int8",
    "dynamic_int8", "auto", "MinMax", "QDQ", ".hidden", "A", "a.b", "0", "a..b", "a/b/c",
]

toml_scalars = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=40),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)),
    st.dates(),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)
def mostly(valid: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` about 9 times in 10, else ``bad``: entries are then often accepted, so the
    escape checks have something to check."""
    return st.integers(0, 9).flatmap(lambda pick: bad if pick == 0 else valid)


#: paths of segments that are valid but tricky ("...", "~", " ") or, less often, hostile
repo_paths = st.lists(
    mostly(st.one_of(st.sampled_from(["a", "b.onnx", "...", "~", "a b", "..a", "a..", "-",
                                      ".hidden", "é", "%2e%2e", "C:", "$HOME"]),
                     st.text(alphabet="ab.~ -$", min_size=1, max_size=6)),
           st.sampled_from(["..", ".", "", "\\", "x\x00", "/", "a\n"])),
    min_size=1, max_size=4).map("/".join)
quantize_keys = sorted({"enabled", "method", "calibration", *GATE_KEYS,
                        *(k for method in METHODS.values() for k in method.options)})
good_quantize = st.fixed_dictionaries(
    {"method": st.sampled_from(sorted(METHODS))},
    optional={"enabled": st.booleans(), "min_cosine": st.floats(0.01, 1.0),
              "min_speedup": st.floats(0, 10), "max_abs_error": st.floats(0.001, 10),
              "allow_slower": st.booleans(), "samples": st.integers(1, 10_000),
              "calibration": mostly(repo_paths, st.sampled_from(HOSTILE_STRINGS)),
              "weight_type": st.sampled_from(["QUInt8", "QInt8"])})
quantize_tables = mostly(good_quantize, st.one_of(
    st.dictionaries(st.sampled_from(quantize_keys), toml_values, max_size=6), toml_values))
entry_value = {
    "name": mostly(st.from_regex(NAME_RE, fullmatch=True), st.sampled_from(HOSTILE_STRINGS)),
    "repo": mostly(st.sampled_from(["deepghs/yolos", "a/b", "a-b.c_d/e.f"]), toml_scalars),
    "filename": mostly(repo_paths, st.sampled_from(HOSTILE_STRINGS)),
    "labels": mostly(repo_paths, toml_scalars),
    "revision": mostly(st.sampled_from(["main", "v1.0", "refs/pr/1", "a" * 40]), toml_scalars),
    "description": mostly(st.text(max_size=30), toml_scalars),
    "task": mostly(st.sampled_from(["object-detection", "ocr"]), toml_scalars),
    "preprocessing_preset": mostly(st.sampled_from(["yolo", "imagenet", "ocr", "none"]),
                                   toml_scalars),
    "input_size": mostly(st.integers(1, 8192), st.one_of(st.integers(), toml_scalars)),
    "providers": mostly(st.lists(st.sampled_from(["CPUExecutionProvider", "CUDAExecutionProvider",
                                                  "CoreMLExecutionProvider"]),
                                 min_size=1, max_size=3, unique=True),
                        st.one_of(st.lists(st.sampled_from(["cpu", "", "CPUExecutionProvider"])),
                                  toml_values)),
    "quantize": quantize_tables,
}
REQUIRED = ("name", "repo", "filename")
entries = mostly(
    st.fixed_dictionaries({k: entry_value[k] for k in REQUIRED},
                          optional={k: v for k, v in entry_value.items() if k not in REQUIRED}),
    # unknown keys, missing required ones
    st.dictionaries(st.sampled_from([*ENTRY_KEYS, "use_int8", "fielname", ""]), toml_scalars,
                    max_size=5))

documents = mostly(
    st.fixed_dictionaries({"models": st.lists(entries, max_size=5)}),
    st.one_of(
        st.fixed_dictionaries({"models": st.one_of(toml_values, st.lists(toml_values, max_size=3))}),
        st.dictionaries(st.text(max_size=10), toml_values, max_size=3)))


def dump(document: dict) -> str | None:
    """TOML text of ``document`` (None when tomlkit cannot write it, e.g. a lone surrogate)."""
    try:
        return tomlkit.dumps(document)
    except Exception:  # noqa: BLE001 - generating input, not testing tomlkit's writer
        return None


# ------------------------------------------------------------------------------ invariants

def check_catalog(catalog: Catalog) -> None:
    """Every accepted entry stays inside its folder; every error is one located line."""
    models = Path(tempfile.gettempdir()) / "fuzz-models"
    for name, entry in catalog.entries.items():
        assert name == entry.name and NAME_RE.fullmatch(name)
        folder = (models / name).resolve()
        assert folder.parent == models.resolve(), name
        for inner in (entry.filename, entry.labels):
            if inner is not None:
                assert (folder / inner).resolve().is_relative_to(folder), inner
                assert (folder / Path(inner).name).resolve().parent == folder, inner
        if entry.quantize is not None:
            assert entry.quantize.calibration is None or "\x00" not in entry.quantize.calibration
            assert 0 < entry.quantize.gates.min_cosine <= 1
    for error in catalog.errors:
        check_error(error)


def check_error(error: CatalogError) -> None:
    assert isinstance(error, CatalogError)
    text = str(error)
    assert len(text.splitlines()) == 1 and "\n" not in text and "\r" not in text, text


def parse_or_error(text: str) -> Catalog | None:
    try:
        catalog = parse_catalog(text, path="fuzz.toml")
    except CatalogError as error:
        check_error(error)
        return None
    check_catalog(catalog)
    return catalog


# ------------------------------------------------------------------------------ properties

@fuzz(300)
@given(st.text(max_size=300))
def test_random_text_raises_only_catalog_error(text):
    parse_or_error(text)


@fuzz(300)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_catalog_error(raw):
    try:
        check_catalog(catalog_from_bytes(raw, path="fuzz.toml"))
    except CatalogError as error:
        check_error(error)


@fuzz(300)
@given(st.lists(st.sampled_from(["[", "]", "[[models]]\n", "{", "}", "=", '"', "'", ",", "\n",
                                 "name", "models", ".", "#", "a = ", "1", "\\", "\x00", "\ufeff"]),
                max_size=60))
def test_toml_shaped_junk_raises_only_catalog_error(parts):
    parse_or_error("".join(parts))


@fuzz(600)
@given(documents)
def test_random_documents_raise_only_catalog_error_and_never_escape(document):
    text = dump(document)
    if text is not None:
        parse_or_error(text)


@fuzz(400)
@given(st.lists(entries, min_size=1, max_size=4))
def test_accepted_entries_are_exactly_the_valid_ones(models):
    text = dump({"models": models})
    if text is None:
        return
    catalog = parse_or_error(text)
    assert catalog is not None, "a list of tables is never a file-level error"
    refused = {e.index for e in catalog.errors if e.field is None or not
               e.field.startswith("quantize")}
    assert {e.index for e in catalog.entries.values()}.isdisjoint(refused)
    assert len(catalog.entries) + len(refused) == len(models)


GOOD_TEXT = tomlkit.dumps({"models": [
    {"name": "a", "repo": "deepghs/yolos", "filename": "yolov8n/model.onnx",
     "quantize": {"method": "fp16"}},
    {"name": "b", "repo": "deepghs/yolos", "filename": "yolov8s/model.onnx"}]})


def encoded(document: dict) -> bytes | None:
    text = dump(document)
    return None if text is None else text.encode("utf-8", "surrogatepass")


file_contents = st.one_of(documents.map(encoded).filter(lambda raw: raw is not None),
                          st.binary(max_size=200))


@fuzz(200)
@given(st.lists(file_contents, min_size=1, max_size=3))
def test_keeper_never_trades_last_good_for_a_bad_catalog(contents):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model_catalog.toml"
        path.write_text(GOOD_TEXT)
        keeper = CatalogKeeper(path)
        assert keeper.reload() is True
        for raw in contents:
            before = keeper.current
            path.write_bytes(raw)
            changed = keeper.reload()
            if keeper.error is not None:
                check_error(keeper.error)
                assert keeper.current is before and changed is False
                continue
            current = keeper.current
            check_catalog(current)
            for name, entry in current.entries.items():
                if entry.stale_error is not None:
                    # kept from before, exactly as it was, and the reason is listed
                    assert entry.source() == before.entries[name].source()
                    assert entry.quantize == before.entries[name].quantize
                    assert entry.stale_error in current.errors
            assert keeper.reload() is False, "same bytes: no change"


# ------------------------------------------------------------------------------ block memo

def outcome(text: str, memo: CatalogMemo | None) -> tuple:
    """What a parse gives, comparable between the whole-file read and the block-memo read."""
    try:
        catalog = parse_catalog(text, path="/c/model_catalog.toml", memo=memo)
    except CatalogError as e:
        return ("refused", str(e))
    return ("read", catalog.entries, tuple(str(e) for e in catalog.errors))


BLOCK_NOISE = ["[[models]]\n", "[[ models ]] # c\n", '[["models"]]\n', "[models]\n",
               "[models.quantize]\n", "[other]\n", '"""\n', "'''\n", "x = 1\n", "\n", "# c\n",
               'name = "a"\n', "models = 1\n", "\r\n", "[[models]]\r\n"]


@fuzz(300)
@given(st.lists(st.tuples(st.lists(entries, max_size=4),
                          st.lists(st.tuples(st.integers(0, 400), st.sampled_from(BLOCK_NOISE)),
                                   max_size=3)),
                min_size=1, max_size=4))
def test_the_block_memo_reads_every_text_as_the_whole_file_parser_does(edits):
    """A keeper's memo re-reads only changed [[models]] blocks: over a series of edits (random
    entries, with header-like noise spliced in anywhere), every read must equal a parse of the
    whole text without memory: same entries, same errors, or the same refusal."""
    memo = CatalogMemo()
    for models, noise in edits:
        text = dump({"models": models}) if models else ""
        if text is None:
            continue
        for at, piece in noise:
            at = min(at, len(text))
            text = text[:at] + piece + text[at:]
        assert outcome(text, memo) == outcome(text, None)


def test_the_block_memo_parses_only_the_block_an_edit_changed():
    memo = CatalogMemo()
    models = [{"name": f"m{i}", "repo": "a/b", "filename": f"m{i}.onnx"} for i in range(20)]
    first = parse_catalog(tomlkit.dumps({"models": models}), memo=memo)
    assert memo.blocks.parsed == 20
    models[7] = models[7] | {"description": "edited"}
    second = parse_catalog(tomlkit.dumps({"models": models}), memo=memo)
    assert memo.blocks.parsed == 1
    assert second.entries["m7"].description == "edited"
    assert all(second.entries[n] is first.entries[n] for n in first.entries if n != "m7")
    # a header inside a multi-line string must not cut the text: the whole-file parse decides
    tricky = 'description = """\n[[models]]\n"""\n'
    text = tomlkit.dumps({"models": models}).replace('name = "m3"\n', 'name = "m3"\n' + tricky)
    third = parse_catalog(text, memo=memo)
    assert third.entries["m3"].description == "[[models]]\n"
