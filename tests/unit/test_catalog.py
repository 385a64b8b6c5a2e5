"""Catalog validation and the last-good keeper: tables of cases on real TOML text and real files."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import pytest
import tomlkit
from structlog.testing import capture_logs

from modeld.catalog import (EMPTY, MAX_CATALOG_BYTES, MAX_LINES, MAX_MODELS, MAX_STRUCTURE_CHARS,
                            QuantizeSpec, catalog_from_bytes,
                            parse_catalog)
from modeld.catalog_file import CatalogKeeper, load_catalog
from modeld.errors import CatalogError
from modeld.methods import METHODS
from modeld.variants import Gates

REPO_ROOT = Path(__file__).resolve().parents[2]
PATH = "/srv/robot/model_catalog.toml"
MISSING = object()

GOOD = {"name": "yolov8n", "repo": "deepghs/yolos", "filename": "yolov8n/model.onnx"}


def entry(**fields) -> dict:
    """A valid entry with ``fields`` changed; a field set to MISSING is left out."""
    out = dict(GOOD)
    for key, value in fields.items():
        if value is MISSING:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def toml(*entries: dict, **top) -> str:
    return tomlkit.dumps({**top, "models": list(entries)} if entries or not top else top)


def parse(*entries: dict, base_dir: Path | None = None):
    return parse_catalog(toml(*entries), path=PATH, base_dir=base_dir)


def assert_one_line(err: CatalogError) -> None:
    text = str(err)
    assert "\n" not in text and "\r" not in text, text
    assert len(text.splitlines()) == 1, text
    assert "Traceback" not in text


# ------------------------------------------------------------------------------ valid entries

def test_minimal_entry_has_documented_defaults():
    catalog = parse(entry())
    assert catalog.errors == ()
    e = catalog.entries["yolov8n"]
    assert (e.index, e.name, e.repo, e.filename) == (0, "yolov8n", "deepghs/yolos",
                                                     "yolov8n/model.onnx")
    assert (e.revision, e.labels, e.description, e.task) == (None, None, "", "")
    assert (e.preprocessing_preset, e.input_size, e.providers, e.quantize) == (None,) * 4
    assert e.quantize_error is None and e.stale_error is None
    assert e.source() == ("deepghs/yolos", "yolov8n/model.onnx", None, None)


def test_full_entry_keeps_every_field():
    e = parse(entry(description="d", task="object-detection", revision="refs/pr/1",
                    labels="yolov8n/labels.txt", preprocessing_preset="yolo", input_size=8192,
                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
              ).entries["yolov8n"]
    assert e.source() == ("deepghs/yolos", "yolov8n/model.onnx", "refs/pr/1", "yolov8n/labels.txt")
    assert (e.description, e.task, e.preprocessing_preset, e.input_size) == (
        "d", "object-detection", "yolo", 8192)
    assert e.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_entries_keep_file_order_and_index():
    names = ["c", "a", "b.v2", "0-x_y"]
    catalog = parse(*(entry(name=n) for n in names))
    assert list(catalog.entries) == names
    assert [e.index for e in catalog.entries.values()] == [0, 1, 2, 3]


@pytest.mark.parametrize("text", ["", "\n\n# only a comment\n", "models = []\n", "\ufeff"])
def test_empty_catalog_is_valid(text):
    catalog = parse_catalog(text, path=PATH)
    assert catalog.entries == {} and catalog.errors == ()


def test_example_catalog_at_repo_root_parses_without_errors():
    catalog = load_catalog(REPO_ROOT / "model_catalog.toml")
    assert catalog.errors == ()
    assert len(catalog.entries) >= 3
    assert {e.quantize.method for e in catalog.entries.values() if e.quantize} >= {
        "dynamic_int8", "fp16"}
    assert any(e.quantize is None for e in catalog.entries.values())


def test_every_method_has_an_option_table():
    assert all(m.name == name and m.options is not None for name, m in METHODS.items())


# ------------------------------------------------------------------------------ entry errors

ENTRY_ERRORS = [
    # (fields, field named, fragment of the message)
    ({"name": "Yolo"}, "name", "not a valid model name"),
    ({"name": ".."}, "name", "not a valid model name"),
    ({"name": ".hidden"}, "name", "not a valid model name"),
    ({"name": "a/b"}, "name", "not a valid model name"),
    ({"name": "a\x00b"}, "name", "not a valid model name"),
    ({"name": "a b"}, "name", "not a valid model name"),
    ({"name": ""}, "name", "not a valid model name"),
    ({"name": "x" * 65}, "name", "not a valid model name"),
    ({"name": "-x"}, "name", "not a valid model name"),
    ({"name": 3}, "name", "expected a string, got an integer"),
    ({"name": MISSING}, "name", "missing required field"),
    ({"repo": "deepghs"}, "repo", "not a Hub repo id"),
    ({"repo": "a/b/c"}, "repo", "not a Hub repo id"),
    ({"repo": "../yolos"}, "repo", "not a Hub repo id"),
    ({"repo": "a/.."}, "repo", "not a Hub repo id"),
    ({"repo": "a/b..c"}, "repo", "not a Hub repo id"),
    ({"repo": "/a"}, "repo", "not a Hub repo id"),
    ({"repo": "a/"}, "repo", "not a Hub repo id"),
    ({"repo": "a\\b/c"}, "repo", "not a Hub repo id"),
    ({"repo": "a/b\n"}, "repo", "not a Hub repo id"),
    ({"repo": "x" * 97 + "/b"}, "repo", "not a Hub repo id"),
    ({"repo": ["a/b"]}, "repo", "expected a string, got an array"),
    ({"repo": MISSING}, "repo", "missing required field"),
    ({"filename": "/etc/passwd"}, "filename", "is absolute"),
    ({"filename": "../x.onnx"}, "filename", "'..' segment"),
    ({"filename": "a/../../x.onnx"}, "filename", "'..' segment"),
    ({"filename": "./a.onnx"}, "filename", "'.' or '..' segment"),
    ({"filename": "a//b.onnx"}, "filename", "empty"),
    ({"filename": "a/"}, "filename", "empty"),
    ({"filename": ""}, "filename", "must not be empty"),
    ({"filename": "a\\b.onnx"}, "filename", "backslash"),
    ({"filename": "..\\..\\x"}, "filename", "backslash"),
    ({"filename": "a\x00b"}, "filename", "control character"),
    ({"filename": "a\x1bb"}, "filename", "control character"),
    ({"filename": "a\nb"}, "filename", "control character"),
    ({"filename": "a\u2028b"}, "filename", "control character"),
    ({"filename": "x" * 1025}, "filename", "at most 1024"),
    ({"filename": 1}, "filename", "expected a string"),
    ({"filename": MISSING}, "filename", "missing required field"),
    ({"labels": "/abs/labels.txt"}, "labels", "is absolute"),
    ({"labels": ".."}, "labels", "'..' segment"),
    ({"labels": True}, "labels", "expected a string, got a boolean"),
    ({"revision": "main branch"}, "revision", "not a branch, tag or commit"),
    ({"revision": "a..b"}, "revision", "not a branch, tag or commit"),
    ({"revision": "v1\x07"}, "revision", "not a branch, tag or commit"),
    ({"revision": "a\tb"}, "revision", "not a branch, tag or commit"),
    ({"revision": ""}, "revision", "1-256 characters"),
    ({"revision": 5}, "revision", "expected a string"),
    ({"description": 5}, "description", "expected a string"),
    ({"description": "a\x00"}, "description", "control character"),
    ({"task": ""}, "task", "must not be empty"),
    ({"task": ["x"]}, "task", "expected a string"),
    ({"preprocessing_preset": "YOLO"}, "preprocessing_preset", "not one of yolo, imagenet, ocr"),
    ({"preprocessing_preset": "bert"}, "preprocessing_preset", "not one of"),
    ({"input_size": True}, "input_size", "got a boolean"),
    ({"input_size": 0}, "input_size", "out of range"),
    ({"input_size": -320}, "input_size", "out of range"),
    ({"input_size": 8193}, "input_size", "out of range"),
    ({"input_size": 320.0}, "input_size", "got a float"),
    ({"input_size": "320"}, "input_size", "got a string"),
    ({"providers": []}, "providers", "non-empty array"),
    ({"providers": "CPUExecutionProvider"}, "providers", "non-empty array"),
    ({"providers": ["cpu"]}, "providers", "not an execution provider name"),
    ({"providers": [""]}, "providers", "not an execution provider name"),
    ({"providers": ["ExecutionProvider"]}, "providers", "not an execution provider name"),
    ({"providers": [1]}, "providers", "not an execution provider name"),
    ({"providers": ["CPUExecutionProvider", "CPUExecutionProvider"]}, "providers", "twice"),
    ({"use_int8": True}, "use_int8", "unknown key"),
    ({"fielname": "x"}, "fielname", "unknown key"),
]


@pytest.mark.parametrize("fields,field,fragment", ENTRY_ERRORS,
                         ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(ENTRY_ERRORS)])
def test_entry_error_refuses_that_entry_only(fields, field, fragment):
    other = entry(name="other")
    catalog = parse(entry(**fields), other)
    assert list(catalog.entries) == ["other"], "the bad entry is refused, the other proceeds"
    matching = [e for e in catalog.errors if e.field == field]
    assert matching, [str(e) for e in catalog.errors]
    err = matching[0]
    assert isinstance(err, CatalogError) and isinstance(err, ValueError)
    assert err.path == PATH and err.index == 0
    assert fragment in err.message
    assert_one_line(err)
    text = str(err)
    assert text.startswith(f"{PATH}: models[0]") and f".{field}: " in text


def test_error_names_entry_when_its_name_is_valid():
    err = parse(entry(repo="nope")).errors[0]
    assert (err.index, err.name, err.field) == (0, "yolov8n", "repo")
    assert str(err).startswith(f"{PATH}: models[0] (yolov8n).repo: 'nope' is not a Hub repo id")
    assert err.fields()["entry"] == "yolov8n"


def test_missing_field_says_what_to_write():
    err = parse(entry(repo=MISSING)).errors[0]
    assert str(err) == (f"{PATH}: models[0] (yolov8n).repo: missing required field "
                        "(give the Hub repo id owner/name, e.g. 'deepghs/yolos')")


def test_all_problems_of_an_entry_are_reported():
    catalog = parse(entry(repo="x", filename="/x", input_size=0))
    assert {e.field for e in catalog.errors} == {"repo", "filename", "input_size"}


def test_unknown_key_suggests_the_close_one_and_lists_known_keys():
    err = parse(entry(fielname="a.onnx")).errors[0]
    assert "did you mean 'filename'?" in err.hint
    assert "known keys: name, description" in err.hint
    assert "did you mean" not in (parse(entry(use_int8=True)).errors[0].hint or "")


def test_hostile_unknown_key_is_shown_escaped_on_one_line():
    text = toml(entry()).replace('name = "yolov8n"', 'name = "yolov8n"\n"a\\nb\\u0000" = 1')
    err = parse_catalog(text, path=PATH).errors[0]
    assert err.field == repr("a\nb\x00")
    assert_one_line(err)


def test_duplicate_name_refuses_the_later_entry():
    catalog = parse(entry(repo="first/repo"), entry(name="b"), entry(repo="second/repo"))
    assert list(catalog.entries) == ["yolov8n", "b"]
    assert catalog.entries["yolov8n"].repo == "first/repo"
    (err,) = catalog.errors
    assert (err.index, err.name, err.field) == (2, "yolov8n", "name")
    assert "models[0] already uses it" in err.message


# ------------------------------------------------------------------------------ quantize

QUANTIZE_ERRORS = [
    # ([models.quantize] table, field named, fragment)
    ({"method": "int4"}, "quantize.method", "'int4' is not one of dynamic_int8"),
    ({"method": "dynamic-int8"}, "quantize.method", "not one of"),
    ({"method": 8}, "quantize.method", "not one of"),
    ({}, "quantize.method", "missing required field"),
    ({"enabled": True}, "quantize.method", "missing required field"),
    ({"enabled": "yes", "method": "fp16"}, "quantize.enabled", "expected true or false"),
    ({"method": "dynamic_int8", "weight_type": "S8"}, "quantize.weight_type", "not one of"),
    ({"method": "dynamic_int8", "per_channel": 1}, "quantize.per_channel", "true or false"),
    ({"method": "dynamic_int8", "calibration": "cal"}, "quantize.calibration", "unknown key"),
    ({"method": "dynamic_int8", "format": "QDQ"}, "quantize.format", "unknown key"),
    ({"method": "dynamic_int8", "use_int8": True}, "quantize.use_int8", "unknown key"),
    ({"method": "static_int8", "field_samples": 0}, "quantize.field_samples", "range"),
    ({"method": "auto", "field_samples": "many"}, "quantize.field_samples", "integer"),
    ({"method": "auto", "field_samples": True}, "quantize.field_samples", "boolean"),
    ({"method": "dynamic_int8", "field_samples": 32}, "quantize.field_samples", "unknown key"),
    ({"method": "static_int8", "calibration": ""}, "quantize.calibration", "1-1024"),
    ({"method": "static_int8", "calibration": 3}, "quantize.calibration", "expected a string"),
    ({"method": "static_int8", "calibration": "c", "samples": 0}, "quantize.samples", "range"),
    ({"method": "static_int8", "calibration": "c", "samples": 10001}, "quantize.samples", "range"),
    ({"method": "static_int8", "calibration": "c", "samples": True}, "quantize.samples",
     "boolean"),
    ({"method": "static_int8", "calibration": "c", "calibrate_method": "minmax"},
     "quantize.calibrate_method", "not one of MinMax"),
    ({"method": "static_int8", "calibration": "c", "format": "QOp"}, "quantize.format",
     "not one of"),
    ({"method": "static_int8", "calibration": "c", "activation_type": "U8"},
     "quantize.activation_type", "not one of"),
    # a pair onnxruntime's quantizer refuses: the catalog says so, no worker ever sees it
    ({"method": "static_int8", "calibration": "c", "activation_type": "QInt8",
      "weight_type": "QUInt8"}, "quantize.activation_type",
     "static_int8 cannot pair activation_type QInt8 with weight_type QUInt8"),
    ({"method": "auto", "calibration": "a\x00b"}, "quantize.calibration", "control character"),
    ({"method": "auto", "samples": -1}, "quantize.samples", "range"),
    ({"method": "auto", "weight_type": "QInt8"}, "quantize.weight_type", "unknown key"),
    ({"method": "fp16", "keep_io_types": "yes"}, "quantize.keep_io_types", "true or false"),
    ({"method": "fp16", "per_channel": True}, "quantize.per_channel", "unknown key"),
    ({"method": "fp16", "min_cosine": 0}, "quantize.min_cosine", "out of range"),
    ({"method": "fp16", "min_cosine": 1.5}, "quantize.min_cosine", "out of range"),
    ({"method": "fp16", "min_cosine": math.nan}, "quantize.min_cosine", "out of range"),
    ({"method": "fp16", "min_cosine": "0.9"}, "quantize.min_cosine", "got a string"),
    ({"method": "fp16", "min_cosine": True}, "quantize.min_cosine", "got a boolean"),
    ({"method": "fp16", "min_speedup": -0.5}, "quantize.min_speedup", "out of range"),
    ({"method": "fp16", "min_speedup": math.inf}, "quantize.min_speedup", "out of range"),
    ({"method": "fp16", "max_abs_error": 0}, "quantize.max_abs_error", "out of range"),
    ({"method": "fp16", "max_abs_error": -1.0}, "quantize.max_abs_error", "out of range"),
    ({"method": "fp16", "allow_slower": "true"}, "quantize.allow_slower", "true or false"),
    ({"method": "fp16", "allow_slower": True, "min_speedup": 1.5}, "quantize.allow_slower",
     "conflicts with min_speedup = 1.5"),
    ({"method": "fp16", "gates": {"min_cosine": 0.9}}, "quantize.gates", "unknown key"),
    *[({"method": "auto", gate: bad}, f"quantize.{gate}", fragment)
      for gate in ("min_part_cosine", "min_detection_f1", "min_top1_agreement", "min_mask_iou")
      for bad, fragment in ((0, "out of range"), (1.01, "out of range"), ("0.9", "got a string"),
                            (math.nan, "out of range"), (False, "got a boolean"))],
    ({"method": "auto", "min_detection_fl": 0.9}, "quantize.min_detection_fl",
     "unknown key"),
]


@pytest.mark.parametrize("table,field,fragment", QUANTIZE_ERRORS,
                         ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(QUANTIZE_ERRORS)])
def test_quantize_error_keeps_the_entry_without_quantize(table, field, fragment):
    catalog = parse(entry(quantize=table))
    e = catalog.entries["yolov8n"]
    assert e.quantize is None
    err = e.quantize_error
    assert err is not None and err in catalog.errors
    assert (err.path, err.index, err.name, err.field) == (PATH, 0, "yolov8n", field)
    assert fragment in err.message
    assert_one_line(err)
    assert str(err).startswith(f"{PATH}: models[0] (yolov8n).{field}: ")


def test_quantize_that_is_not_a_table_keeps_the_entry():
    e = parse(entry(quantize=1)).entries["yolov8n"]
    assert e.quantize is None and e.quantize_error.field == "quantize"


def test_unknown_quantize_key_lists_the_options_of_that_method():
    err = parse(entry(quantize={"method": "fp16", "keep_io_type": False})
                ).entries["yolov8n"].quantize_error
    assert "did you mean 'keep_io_types'?" in err.hint
    assert "keep_io_types" in err.hint and "per_channel" not in err.hint


DEFAULTS = [
    ("dynamic_int8", {}, {"weight_type": "QUInt8", "per_channel": False, "reduce_range": False}),
    ("static_int8", {"calibration": "cal"},
     {"samples": 32, "calibrate_method": "MinMax", "format": "QDQ", "activation_type": "QUInt8",
      "weight_type": "QInt8", "per_channel": True, "reduce_range": False, "field_samples": 32}),
    ("fp16", {}, {"keep_io_types": True}),
    ("auto", {}, {"samples": 32, "field_samples": 32}),
]


@pytest.mark.parametrize("method,extra,params", DEFAULTS, ids=[d[0] for d in DEFAULTS])
def test_defaults_are_filled_so_params_are_canonical(method, extra, params):
    spec = parse(entry(quantize={"method": method, **extra})).entries["yolov8n"].quantize
    assert spec == QuantizeSpec(enabled=True, method=method, params=params,
                                calibration=spec.calibration, gates=Gates())
    assert list(spec.params) == sorted(params), "canonical: keys in a fixed order"
    # spelling out the defaults gives the same spec
    spelled = parse(entry(quantize={"method": method, **extra, **params, "min_cosine": 0.99,
                                    "min_speedup": 1, "allow_slower": False}))
    assert spelled.entries["yolov8n"].quantize == spec


def test_options_and_gates_are_taken():
    spec = parse(entry(quantize={
        "enabled": False, "method": "static_int8", "calibration": "c", "samples": 10000,
        "calibrate_method": "Entropy", "format": "QOperator", "activation_type": "QInt8",
        "weight_type": "QInt8", "per_channel": False, "reduce_range": True,
        "min_cosine": 1, "min_speedup": 1.25, "max_abs_error": 0.5})).entries["yolov8n"].quantize
    assert spec.enabled is False
    assert spec.params == {"samples": 10000, "calibrate_method": "Entropy", "format": "QOperator",
                           "activation_type": "QInt8", "weight_type": "QInt8",
                           "per_channel": False, "reduce_range": True, "field_samples": 32}
    assert spec.gates == Gates(min_cosine=1.0, min_speedup=1.25, max_abs_error=0.5)
    assert isinstance(spec.gates.min_cosine, float)


def test_task_gates_default_and_parse():
    spec = parse(entry(quantize={"method": "auto"})).entries["yolov8n"].quantize
    assert (spec.gates.min_detection_f1, spec.gates.min_top1_agreement, spec.gates.min_mask_iou,
            spec.gates.min_part_cosine) == (0.9, 0.98, 0.9, 0.9)
    spec = parse(entry(quantize={"method": "auto", "min_detection_f1": 0.95, "min_mask_iou": 1,
                                 "min_top1_agreement": 0.5, "min_part_cosine": 0.8})
                 ).entries["yolov8n"].quantize
    assert spec.gates == Gates(min_detection_f1=0.95, min_mask_iou=1.0, min_top1_agreement=0.5,
                               min_part_cosine=0.8)


@pytest.mark.parametrize("table", [{"method": "fp16", "allow_slower": True},
                                   {"method": "fp16", "allow_slower": True, "min_speedup": 0}])
def test_allow_slower_sets_min_speedup_to_zero(table):
    assert parse(entry(quantize=table)).entries["yolov8n"].quantize.gates.min_speedup == 0.0


def test_disabled_quantize_may_leave_out_the_method():
    spec = parse(entry(quantize={"enabled": False})).entries["yolov8n"].quantize
    assert spec.enabled is False and spec.method in METHODS


CALIBRATION = [
    ("cal/yolo", "/srv/robot/cal/yolo"),
    ("./cal", "/srv/robot/cal"),
    ("../shared/cal", "/srv/shared/cal"),
    ("/data/calibration", "/data/calibration"),
]


@pytest.mark.parametrize("given,resolved", CALIBRATION)
def test_calibration_is_resolved_against_the_catalog_folder(given, resolved):
    for method in ("static_int8", "auto"):
        spec = parse_catalog(toml(entry(quantize={"method": method, "calibration": given})),
                             path=PATH).entries["yolov8n"].quantize
        assert spec.calibration == resolved
        assert "calibration" not in spec.params


def test_calibration_base_dir_override_and_load_catalog(tmp_path):
    text = toml(entry(quantize={"method": "static_int8", "calibration": "cal"}))
    spec = parse_catalog(text, path="x.toml", base_dir=tmp_path / "b").entries["yolov8n"].quantize
    assert spec.calibration == str(tmp_path / "b" / "cal")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "model_catalog.toml").write_text(text)
    loaded = load_catalog(tmp_path / "conf" / "model_catalog.toml")
    assert loaded.entries["yolov8n"].quantize.calibration == str(tmp_path / "conf" / "cal")


def test_auto_without_calibration_is_fine():
    assert parse(entry(quantize={"method": "auto"})).entries["yolov8n"].quantize.calibration is None


# ------------------------------------------------------------------------------ file-level errors

FILE_ERRORS = [
    # (text, field, fragment)
    ("models = 1\n", "models", "expected an array of tables"),
    ("models = [1, 2]\n", "models", "expected an array of tables"),
    ('models = [{name = "a", repo = "a/b", filename = "m"}, 2]\n', "models", "array of tables"),
    ('[models]\nname = "a"\n', "models", "expected an array of tables"),
    ("version = 1\n", "version", "unknown key"),
    ('[[model]]\nname = "a"\n', "model", "unknown key"),
    ("models = [\n", None, "TOML syntax error at line"),
    ('[[models]]\nname = "a"\nname = "b"\n', None, 'invalid TOML: Key "name" already exists'),
    ('a = 1\na = 2\n', None, "at line 2"),
    ("x = 2023-02-30\n", None, "TOML syntax error"),
    ('name = "a\\qb"\n', None, "TOML syntax error"),
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", None, "syntax error"),
    ("x = " + "{a = " * 500 + "1" + "}" * 500 + "\n", None, "syntax error"),
    ('[[models]]\nname = "a\x00"\n', None, "binary file"),
    ('[[models]]\nname = """\n\x01"""\n', None, "syntax error"),
]


@pytest.mark.parametrize("text,field,fragment", FILE_ERRORS,
                         ids=[f"{i}-{f}" for i, (_, f, _) in enumerate(FILE_ERRORS)])
def test_file_level_errors_raise_one_line(text, field, fragment):
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text, path=PATH)
    err = caught.value
    assert (err.path, err.index, err.field) == (PATH, None, field)
    assert fragment in str(err)
    assert_one_line(err)


@pytest.mark.parametrize("text,fragment", [
    ("\n" * (MAX_LINES + 1), f"at most {MAX_LINES} allowed"),
    ("\r\n" * (MAX_LINES + 1), f"at most {MAX_LINES} allowed"),
    # one line, two million values: tomlkit would take about a minute
    ("x = [" + "1," * 2_000_000 + "]\n", f"at most {MAX_STRUCTURE_CHARS} allowed"),
    ("[[models]]\n" * (MAX_MODELS + 1), f"lists {MAX_MODELS + 1} models; at most {MAX_MODELS}"),
])
def test_shapes_too_big_for_the_parser_are_refused_quickly(text, fragment):
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text, path=PATH)
    assert fragment in str(caught.value)
    assert_one_line(caught.value)


def test_largest_allowed_shapes_still_parse():
    big = toml(*(entry(name=f"m{i}", quantize={"method": "fp16"}) for i in range(MAX_MODELS)))
    assert len(parse_catalog(big, path=PATH).entries) == MAX_MODELS
    assert parse_catalog("\n" * (MAX_LINES - 1), path=PATH).entries == {}


def test_unknown_top_level_key_suggests_models():
    with pytest.raises(CatalogError) as caught:
        parse_catalog('[[model]]\nname = "a"\n', path=PATH)
    assert "did you mean 'models'?" in caught.value.hint


def test_syntax_error_names_line_and_column():
    with pytest.raises(CatalogError) as caught:
        parse_catalog('[[models]]\nname = "a"\nrepo = = 1\n', path=PATH)
    assert "line 3 column" in str(caught.value)


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_load_missing_file(tmp_path):
    with pytest.raises(CatalogError, match="file not found") as caught:
        load_catalog(tmp_path / "nope.toml")
    assert caught.value.path == str(tmp_path / "nope.toml")
    assert_one_line(caught.value)


def test_load_directory(tmp_path):
    with pytest.raises(CatalogError, match="is a directory"):
        load_catalog(tmp_path)


def test_load_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "catalog.toml"
    os.mkfifo(fifo)
    with pytest.raises(CatalogError, match="not a regular file"):
        load_catalog(fifo)


@pytest.mark.parametrize("data,fragment", [
    (b'[[models]]\nname = "caf\xe9"\n', "not UTF-8 text (byte 0xe9 at line 2)"),
    (b"\xff\xfe[\x00[\x00", "binary file"),
    (bytes(range(256)), "binary file (NUL byte at offset 0)"),
    (b"\x7fELF\x02\x01\x01\x00\x00", "binary file"),
])
def test_load_non_text(tmp_path, data, fragment):
    with pytest.raises(CatalogError) as caught:
        load_catalog(write(tmp_path / "c.toml", data))
    assert fragment in str(caught.value)
    assert_one_line(caught.value)


def test_load_huge_file_is_refused_before_reading(tmp_path):
    huge = tmp_path / "c.toml"
    with open(huge, "wb") as f:
        f.truncate(MAX_CATALOG_BYTES + 1)   # sparse: size says it all
    with pytest.raises(CatalogError, match="larger than 4 MiB"):
        load_catalog(huge)


def test_load_file_of_exactly_the_limit_is_read(tmp_path):
    text = toml(entry()) + "#" * (MAX_CATALOG_BYTES - len(toml(entry())) - 1) + "\n"
    catalog = load_catalog(write(tmp_path / "c.toml", text))
    assert list(catalog.entries) == ["yolov8n"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without permission")
def test_load_unreadable_file(tmp_path):
    path = write(tmp_path / "c.toml", toml(entry()))
    path.chmod(0)
    with pytest.raises(CatalogError, match="cannot open"):
        load_catalog(path)


def test_load_path_below_a_file(tmp_path):
    with pytest.raises(CatalogError, match="cannot open: Not a directory"):
        load_catalog(write(tmp_path / "f", b"") / "c.toml")


def test_load_empty_file_is_an_empty_catalog(tmp_path):
    catalog = load_catalog(write(tmp_path / "c.toml", b""))
    assert catalog.entries == {} and catalog.errors == ()
    assert catalog.digest == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_digest_is_sha256_of_the_file_bytes_including_a_bom(tmp_path):
    import hashlib
    raw = b"\xef\xbb\xbf" + toml(entry()).encode()
    catalog = load_catalog(write(tmp_path / "c.toml", raw))
    assert catalog.digest == hashlib.sha256(raw).hexdigest()
    assert list(catalog.entries) == ["yolov8n"]
    assert catalog_from_bytes(raw, path="c").digest == catalog.digest


# ------------------------------------------------------------------------------ pickling

def test_catalog_and_its_errors_pickle():
    catalog = parse(entry(quantize={"method": "int4"}), entry(name="b", repo="x"))
    copy = pickle.loads(pickle.dumps(catalog))
    assert copy == catalog
    assert [str(e) for e in copy.errors] == [str(e) for e in catalog.errors]
    err = copy.entries["yolov8n"].quantize_error
    assert (err.path, err.index, err.name, err.field) == (PATH, 0, "yolov8n", "quantize.method")


# ------------------------------------------------------------------------------ the keeper

@pytest.fixture
def catalog_file(tmp_path) -> Path:
    return tmp_path / "model_catalog.toml"


def test_keeper_starts_empty(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    assert keeper.current is EMPTY and keeper.error is None


def test_reload_true_on_change_false_on_same_bytes(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry()))
    assert keeper.reload() is True
    assert list(keeper.current.entries) == ["yolov8n"]
    with capture_logs() as logs:
        assert keeper.reload() is False
    assert logs == [], "unchanged bytes are not parsed again"
    write(catalog_file, toml(entry(), entry(name="b")))
    assert keeper.reload() is True
    assert list(keeper.current.entries) == ["yolov8n", "b"]
    # same content, new mtime and inode: still unchanged
    catalog_file.unlink()
    write(catalog_file, toml(entry(), entry(name="b")))
    assert keeper.reload() is False


def test_an_edit_keeps_the_objects_of_the_entries_it_did_not_touch(catalog_file):
    """The reconciler skips unchanged entries by identity: only the edited one is new."""
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry(), entry(name="b")))
    keeper.reload()
    before = dict(keeper.current.entries)
    write(catalog_file, toml(entry(), entry(name="b", description="edited")))
    assert keeper.reload() is True
    after = keeper.current.entries
    assert after["yolov8n"] is before["yolov8n"]
    assert after["b"] is not before["b"] and after["b"].description == "edited"
    write(catalog_file, toml(entry(name="b", description="edited"), entry()))   # reordered
    keeper.reload()
    assert keeper.current.entries["yolov8n"] is not after["yolov8n"]
    assert keeper.current.entries["yolov8n"].index == 1


def test_empty_file_is_a_good_catalog_that_replaces_the_old_one(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry()))
    keeper.reload()
    write(catalog_file, "")
    assert keeper.reload() is True
    assert keeper.current.entries == {} and keeper.error is None


BAD_FILES = [b"models = [\n", b"models = 3\n", b"colour = 1\n", b"\xff\xfe", b"a\x00b",
             b'[[models]]\nname = "a"\nname = "a"\n']


@pytest.mark.parametrize("bad", BAD_FILES)
def test_file_level_error_never_replaces_last_good(catalog_file, bad):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry()))
    assert keeper.reload() is True
    good = keeper.current
    write(catalog_file, bad)
    assert keeper.reload() is False
    assert keeper.current is good
    assert isinstance(keeper.error, CatalogError) and keeper.error.path == str(catalog_file)
    assert keeper.reload() is False and keeper.current is good and keeper.error is not None
    write(catalog_file, toml(entry(), entry(name="b")))
    assert keeper.reload() is True
    assert keeper.error is None and list(keeper.current.entries) == ["yolov8n", "b"]


def test_file_level_error_before_any_good_keeps_empty(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, b"models = [\n")
    assert keeper.reload() is False
    assert keeper.current is EMPTY and keeper.error is not None


def test_missing_or_replaced_by_directory_keeps_last_good(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry()))
    keeper.reload()
    good = keeper.current
    catalog_file.unlink()
    assert keeper.reload() is False
    assert keeper.current is good and "file not found" in str(keeper.error)
    catalog_file.mkdir()
    assert keeper.reload() is False
    assert keeper.current is good and "is a directory" in str(keeper.error)
    catalog_file.rmdir()
    write(catalog_file, toml(entry()))
    keeper.reload()
    assert keeper.error is None and keeper.current.entries == good.entries


def test_reverting_to_the_good_bytes_clears_the_error(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry()))
    keeper.reload()
    write(catalog_file, "models = [")
    keeper.reload()
    write(catalog_file, toml(entry()))
    assert keeper.reload() is False, "the catalog is the same as before"
    assert keeper.error is None


def test_entry_typo_keeps_its_last_good_version(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry(name="a"), entry(name="b", revision="v1")))
    keeper.reload()
    old_b = keeper.current.entries["b"]
    # b gets a typo, a changes, c is new and in front
    write(catalog_file, toml(entry(name="c"), entry(name="a", revision="v2"),
                             entry(name="b", repo="deepghs yolos")))
    assert keeper.reload() is True
    current = keeper.current
    assert list(current.entries) == ["c", "a", "b"]
    assert current.entries["a"].revision == "v2" and current.entries["a"].stale_error is None
    b = current.entries["b"]
    assert b.source() == old_b.source() and b.index == 2
    assert b.stale_error is not None and b.stale_error.field == "repo"
    assert b.stale_error in current.errors
    # another typo in b: still the last good version, with the new error
    write(catalog_file, toml(entry(name="c"), entry(name="a", revision="v2"),
                             entry(name="b", input_size=True)))
    assert keeper.reload() is True
    assert keeper.current.entries["b"].source() == old_b.source()
    assert keeper.current.entries["b"].stale_error.field == "input_size"
    # fixed
    write(catalog_file, toml(entry(name="c"), entry(name="a", revision="v2"),
                             entry(name="b", revision="v3")))
    assert keeper.reload() is True
    assert keeper.current.entries["b"].revision == "v3"
    assert keeper.current.entries["b"].stale_error is None and keeper.current.errors == ()


def test_entry_never_valid_is_not_served(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry(name="a"), entry(name="b", repo="bad")))
    keeper.reload()
    assert list(keeper.current.entries) == ["a"]
    assert [e.field for e in keeper.current.errors] == ["repo"]


def test_entry_with_unreadable_name_is_not_matched_to_an_old_one(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry(name="a"), entry(name="b")))
    keeper.reload()
    write(catalog_file, toml(entry(name="a"), entry(name="B")))
    keeper.reload()
    assert list(keeper.current.entries) == ["a"], "b was renamed (badly): b is no longer wanted"


def test_removed_entry_is_gone(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry(name="a"), entry(name="b")))
    keeper.reload()
    write(catalog_file, toml(entry(name="a")))
    assert keeper.reload() is True
    assert list(keeper.current.entries) == ["a"]


def test_duplicate_of_a_served_entry_keeps_the_first(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry(name="a")))
    keeper.reload()
    write(catalog_file, toml(entry(name="a", revision="v2"), entry(name="a", revision="v3")))
    keeper.reload()
    assert keeper.current.entries["a"].revision == "v2"
    assert keeper.current.entries["a"].stale_error is None


def test_quantize_typo_keeps_the_last_good_quantize_spec(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry(quantize={"method": "fp16", "min_cosine": 0.95})))
    keeper.reload()
    old_spec = keeper.current.entries["yolov8n"].quantize
    write(catalog_file, toml(entry(revision="v2", quantize={"method": "fp17"})))
    assert keeper.reload() is True
    e = keeper.current.entries["yolov8n"]
    assert e.revision == "v2", "the rest of the entry is the new text"
    assert e.quantize == old_spec
    assert e.quantize_error is not None and e.quantize_error.field == "quantize.method"
    assert e.quantize_error in keeper.current.errors


def test_quantize_typo_without_earlier_spec_serves_fp32_only(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry()))
    keeper.reload()
    write(catalog_file, toml(entry(quantize={"method": "fp17"})))
    keeper.reload()
    e = keeper.current.entries["yolov8n"]
    assert e.quantize is None and e.quantize_error is not None


def test_removing_the_quantize_table_removes_quantize(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry(quantize={"method": "fp16"})))
    keeper.reload()
    write(catalog_file, toml(entry()))
    assert keeper.reload() is True
    assert keeper.current.entries["yolov8n"].quantize is None


def test_reload_logs_entry_errors_with_fields(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry(name="a"), entry(name="b", input_size=0)))
    with capture_logs() as logs:
        keeper.reload()
    loaded = [e for e in logs if e["event"] == "catalog_loaded"]
    assert loaded and loaded[0]["models"] == 1 and loaded[0]["errors"] == 1
    (warning,) = [e for e in logs if e["event"] == "catalog_entry_error"]
    assert (warning["index"], warning["field"], warning["entry"]) == (1, "input_size", "b")
    assert warning["stale"] is False and warning["log_level"] == "warning"


def test_reload_logs_a_kept_entry_as_stale(catalog_file):
    keeper = CatalogKeeper(catalog_file)
    write(catalog_file, toml(entry(name="a")))
    keeper.reload()
    write(catalog_file, toml(entry(name="a", filename="../x.onnx")))
    with capture_logs() as logs:
        assert keeper.reload() is True
    (warning,) = [e for e in logs if e["event"] == "catalog_entry_error"]
    assert (warning["entry"], warning["field"], warning["stale"]) == ("a", "filename", True)


@pytest.mark.parametrize("flags", [dict(intent=True, intent_quant=True, ocr_quant=True, have_ocr=True),
                                   dict(intent=True, intent_quant=False, ocr_quant=False,
                                        have_ocr=False)])
def test_the_fast_stdlib_read_and_tomlkit_agree_on_good_catalogs(flags):
    """Good text is read by tomllib (fast), bad text is explained by tomlkit: both must see the
    same data in every good catalog we ship or test with."""
    import tomllib

    from modeld.demo import catalog_text
    texts = [catalog_text(**flags), toml(entry(), entry(name="b", description="x\ty \u00e9")),
             toml(entry(quantize={"enabled": True, "method": "static_int8", "samples": 8,
                                  "min_cosine": 0.995, "calibration": "calib/"}))]
    for text in texts:
        assert tomllib.loads(text) == tomlkit.parse(text).unwrap()
