"""The model catalog: ``model_catalog.toml`` -> a validated, typed ``Catalog``; keeps the last good.

The runner owns a ``CatalogKeeper`` and calls ``reload()`` on every wake-up; the planner reads
``Catalog.entries``. Validation is strict (unknown keys refused) and hostile-proof: every problem
is one ``CatalogError`` line naming file, entry and field, never a traceback.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog
import tomlkit
from tomlkit.exceptions import ParseError, TOMLKitError

from .catalog_blocks import BlockMemo
from .errors import CatalogError
from .tomlwords import explain as explain_toml_error
from .variants import METHODS, Gates

log = structlog.get_logger(__name__)

#: a catalog larger than this is refused before it is read
MAX_CATALOG_BYTES = 4 * 1024 * 1024
# tomlkit's time grows faster than linearly with lines and values (measured: 400k blank lines
# 9 s, one array of 2M numbers 48 s): the shape is bounded before tomlkit sees the text, which
# keeps a parse under about 2 s. A real catalog of 1000 models is about 15k lines, 15k values.
MAX_LINES = 20_000
MAX_STRUCTURE_CHARS = 50_000          # '[', '{', '=' and ',' anywhere, comments included
MAX_MODELS = 1000
MAX_PATH_CHARS = 1024
MAX_TEXT_CHARS = 4096
MAX_INPUT_SIZE = 8192
MAX_SAMPLES = 10_000

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_REPO_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_PROVIDER_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}ExecutionProvider")
#: C0/C1 control characters, line/paragraph separators and lone surrogates (not encodable)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SIMPLE_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

PRESETS = ("yolo", "imagenet", "ocr", "none")
QTYPES = ("QUInt8", "QInt8")
CALIBRATE_METHODS = ("MinMax", "Entropy", "Percentile")
QUANT_FORMATS = ("QDQ", "QOperator")

TOP_LEVEL_KEYS = ("models",)
ENTRY_KEYS = ("name", "description", "task", "repo", "filename", "revision", "labels",
              "preprocessing_preset", "input_size", "providers", "quantize")
#: required entry field -> what to write there (the hint of a "missing" error)
REQUIRED_ENTRY_KEYS: Mapping[str, str] = {
    "name": "the model's folder name under models/, e.g. 'yolov8n'",
    "repo": "the Hub repo id owner/name, e.g. 'deepghs/yolos'",
    "filename": "the ONNX file's path inside the repo, e.g. 'yolov8n/model.onnx'",
}
#: gates whose value is a share in (0, 1] (agreement measured on the outputs and on the task)
SHARE_GATES = ("min_cosine", "min_part_cosine", "min_detection_f1", "min_top1_agreement",
               "min_mask_iou")
GATE_KEYS = (*SHARE_GATES, "min_speedup", "max_abs_error", "allow_slower")


class _Invalid(Exception):
    """A value failed a check; the caller adds the location and raises a ``CatalogError``."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


# ----------------------------------------------------------------------------- the typed catalog

@dataclass(frozen=True)
class QuantizeSpec:
    enabled: bool
    method: str                      # key of modeld.variants.METHODS
    params: Mapping[str, Any]        # method options, defaults filled, sorted by key; JSON-able
    calibration: str | None          # absolute path (resolved against the catalog's folder) or None
    gates: Gates


@dataclass(frozen=True)
class ModelEntry:
    index: int
    name: str
    repo: str
    filename: str
    revision: str | None
    labels: str | None
    description: str
    task: str
    preprocessing_preset: str | None
    input_size: int | None
    providers: tuple[str, ...] | None     # None = the daemon's default providers
    quantize: QuantizeSpec | None
    # Errors do not take part in equality: an entry kept in its last good version is the same
    # desired state as before, and exceptions only compare by identity.
    quantize_error: CatalogError | None = field(default=None, compare=False)
    stale_error: CatalogError | None = field(default=None, compare=False)

    def source(self) -> tuple:
        """What a pull depends on: a change of any of these means pulling again."""
        return (self.repo, self.filename, self.revision, self.labels)


@dataclass(frozen=True)
class Catalog:
    path: str
    entries: Mapping[str, ModelEntry]     # by name, in file order
    errors: tuple[CatalogError, ...] = field(default=(), compare=False)
    digest: str = ""                      # sha256 of the file bytes ("" for EMPTY)


EMPTY = Catalog(path="", entries={}, errors=(), digest="")


# ----------------------------------------------------------------------------- value checks

def _shown(value: Any, limit: int = 60) -> str:
    """A value as it may appear in a one-line message: repr (escapes controls), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _field_name(key: str) -> str:
    return key if _SIMPLE_KEY_RE.fullmatch(key) else _shown(key, 40)


def _kind(value: Any) -> str:
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
             (dict, "a table"), (list, "an array"))
    return next((k for t, k in kinds if isinstance(value, t)), f"a {type(value).__name__}")


def _string(value: Any, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected {what}, got {_kind(value)} {_shown(value)}")
    return value


def _plain_text(value: Any, *, max_chars: int, allow_empty: bool) -> str:
    """Free text shown to people: no control characters (tabs/newlines allowed) and no NUL."""
    text = _string(value)
    if not text and not allow_empty:
        raise _Invalid("must not be empty")
    if len(text) > max_chars:
        raise _Invalid(f"is {len(text)} characters long; at most {max_chars} allowed")
    if _CONTROL_RE.search(text.replace("\n", "").replace("\t", "")):
        raise _Invalid(f"contains a control character: {_shown(text)}")
    return text


def _name(value: Any) -> str:
    name = _string(value)
    if not NAME_RE.fullmatch(name):
        raise _Invalid(f"{_shown(name)} is not a valid model name",
                       hint="use 1-64 characters of a-z 0-9 . _ - starting with a letter or digit")
    return name


def _repo(value: Any) -> str:
    repo = _string(value)
    parts = repo.split("/")
    if (len(parts) != 2 or not all(_REPO_PART_RE.fullmatch(p) for p in parts)
            or ".." in repo):
        raise _Invalid(f"{_shown(repo)} is not a Hub repo id",
                       hint="expected owner/name, e.g. 'deepghs/yolos'")
    return repo


def _repo_path(value: Any) -> str:
    """A relative path inside a Hub repo that cannot climb out of any folder it is joined to."""
    path = _string(value)
    if not path:
        raise _Invalid("must not be empty")
    if len(path) > MAX_PATH_CHARS:
        raise _Invalid(f"is {len(path)} characters long; at most {MAX_PATH_CHARS} allowed")
    if _CONTROL_RE.search(path):
        raise _Invalid(f"{_shown(path)} contains a control character")
    if "\\" in path:
        raise _Invalid(f"{_shown(path)} contains a backslash", hint="use '/' between folders")
    if path.startswith("/"):
        raise _Invalid(f"{_shown(path)} is absolute", hint="give the path inside the repo")
    segments = path.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise _Invalid(f"{_shown(path)} has an empty, '.' or '..' segment",
                       hint="give a plain path inside the repo such as 'yolov8n/model.onnx'")
    return path


def _revision(value: Any) -> str:
    rev = _string(value)
    if not rev or len(rev) > 256:
        raise _Invalid("must be 1-256 characters (a branch, tag or commit)")
    if _CONTROL_RE.search(rev) or any(c.isspace() for c in rev) or ".." in rev:
        raise _Invalid(f"{_shown(rev)} is not a branch, tag or commit",
                       hint="no whitespace, control characters or '..'")
    return rev


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_kind(value)} {_shown(value)}")
    return value


def _int_in(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        # bool is a subclass of int in Python; TOML keeps them apart and so do we
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer {low}..{high}, got {_kind(value)} {_shown(value)}")
        if not low <= value <= high:
            raise _Invalid(f"{value} is out of range; expected an integer {low}..{high}")
        return value
    return check


def _number(value: Any, *, low: float, high: float = math.inf, low_open: bool,
            text: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"expected a number {text}, got {_kind(value)} {_shown(value)}")
    number = float(value)
    too_low = number <= low if low_open else number < low
    if not math.isfinite(number) or too_low or number > high:
        raise _Invalid(f"{_shown(value)} is out of range; expected a number {text}")
    return number


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            hint = _did_you_mean(value, choices) if isinstance(value, str) else None
            raise _Invalid(f"{_shown(value)} is not one of {', '.join(choices)}", hint=hint)
        return value
    return check


def _providers(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid(f"expected a non-empty array of provider names, got {_kind(value)}",
                       hint="e.g. [\"CPUExecutionProvider\"]")
    if len(value) > 32:
        raise _Invalid(f"lists {len(value)} providers; at most 32 allowed")
    for item in value:
        if not isinstance(item, str) or not _PROVIDER_RE.fullmatch(item):
            raise _Invalid(f"{_shown(item)} is not an execution provider name",
                           hint="names look like 'CPUExecutionProvider'")
    if len(set(value)) != len(value):
        raise _Invalid("lists a provider twice")
    return tuple(value)


def _calibration_path(value: Any) -> str:
    path = _string(value)
    if not path or len(path) > MAX_PATH_CHARS:
        raise _Invalid(f"must be a path of 1-{MAX_PATH_CHARS} characters")
    if _CONTROL_RE.search(path):
        raise _Invalid(f"{_shown(path)} contains a control character")
    return path


def _did_you_mean(word: str, choices: tuple[str, ...] | list[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


# ----------------------------------------------------------------------------- quantize options

_Check = Callable[[Any], Any]

#: method -> option -> (check, default). ``calibration`` is separate (a path, not a parameter).
METHOD_OPTIONS: Mapping[str, Mapping[str, tuple[_Check, Any]]] = {
    "dynamic_int8": {
        "weight_type": (_one_of(QTYPES), "QUInt8"),
        "per_channel": (_bool, False),
        "reduce_range": (_bool, False),
    },
    "static_int8": {
        "samples": (_int_in(1, MAX_SAMPLES), 32),
        "calibrate_method": (_one_of(CALIBRATE_METHODS), "MinMax"),
        "format": (_one_of(QUANT_FORMATS), "QDQ"),
        "activation_type": (_one_of(QTYPES), "QUInt8"),
        "weight_type": (_one_of(QTYPES), "QInt8"),
        "per_channel": (_bool, True),
        "reduce_range": (_bool, False),
        "field_samples": (_int_in(1, MAX_SAMPLES), 32),
    },
    "fp16": {
        "keep_io_types": (_bool, True),
    },
    "auto": {
        "samples": (_int_in(1, MAX_SAMPLES), 32),
        "field_samples": (_int_in(1, MAX_SAMPLES), 32),
    },
}
#: method -> whether ``calibration`` is required (True), optional (False); absent = not accepted
#: (without a folder, static_int8 and auto calibrate on the nodes' field samples: modeld.samples)
CALIBRATION_REQUIRED: Mapping[str, bool] = {"static_int8": False, "auto": False}


# ----------------------------------------------------------------------------- parsing

@dataclass(frozen=True)
class _Where:
    """Where in the catalog a check runs; turns ``_Invalid`` into a located ``CatalogError``."""

    path: str
    index: int | None = None
    name: str | None = None

    def error(self, field_name: str | None, message: str, hint: str | None = None
              ) -> CatalogError:
        return CatalogError(message, path=self.path, index=self.index, name=self.name,
                            field=field_name, hint=hint)

    def invalid(self, field_name: str, bad: _Invalid) -> CatalogError:
        return self.error(field_name, bad.message, bad.hint)

    def unknown_key(self, key: str, known: tuple[str, ...] | list[str], prefix: str = ""
                    ) -> CatalogError:
        suggestion = _did_you_mean(key, known)
        hint = f"{suggestion + ' ' if suggestion else ''}known keys: {', '.join(known)}"
        return self.error(prefix + _field_name(key), "unknown key", hint)


def parse_catalog(text: str, *, path: str = "model_catalog.toml", base_dir: Path | None = None,
                  digest: str | None = None, memo: CatalogMemo | None = None) -> Catalog:
    """Validate catalog ``text``. File-level problems raise ``CatalogError``; entry-level ones
    are collected in ``Catalog.errors``. ``base_dir`` (default: the folder of ``path``) is what
    relative calibration paths are resolved against; ``digest`` defaults to the text's sha256.
    ``memo`` (a keeper's): blocks and entries unchanged since its last call are not read again."""
    if digest is None:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    where = _Where(path)
    document, blocks = _read_document(text, where, memo)
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            raise where.unknown_key(key, TOP_LEVEL_KEYS)
    raw_entries = document.get("models", [])
    if not isinstance(raw_entries, list) or not all(isinstance(r, dict) for r in raw_entries):
        raise where.error("models", "expected an array of tables",
                          hint="write each model as a [[models]] table")
    if len(raw_entries) > MAX_MODELS:
        raise where.error("models", f"lists {len(raw_entries)} models; at most {MAX_MODELS} "
                                    "allowed")
    base = os.path.abspath(base_dir if base_dir is not None else os.path.dirname(path) or ".")
    entries: dict[str, ModelEntry] = {}
    errors: list[CatalogError] = []
    first_index: dict[str, int] = {}
    validated: dict[tuple, tuple[ModelEntry | None, list[CatalogError]]] = {}
    for index, raw in enumerate(raw_entries):
        name = _readable_name(raw)
        entry_where = _Where(path, index, name)
        if name is not None and name in first_index:
            errors.append(entry_where.error(
                "name", f"duplicate name; models[{first_index[name]}] already uses it",
                hint="model names must be unique"))
            continue
        if name is not None:
            first_index[name] = index
        key = (blocks[index], index, path, base) if blocks is not None else None
        known = memo.entries.get(key) if memo is not None and key is not None else None
        entry, entry_errors = known or _parse_entry(raw, entry_where, base)
        if key is not None:
            validated[key] = (entry, entry_errors)
        errors.extend(entry_errors)
        if entry is not None:
            entries[entry.name] = entry
    if memo is not None:
        memo.entries = validated
    return Catalog(path=path, entries=entries, errors=tuple(errors), digest=digest)


class CatalogMemo:
    """What a ``CatalogKeeper`` remembers of its last read: parsed blocks and validated entries,
    by block text (with index, path and base folder). Validation is pure, so a block that did
    not change yields the same entry object, which is also how the reconciler skips it."""

    def __init__(self) -> None:
        self.blocks = BlockMemo()
        self.entries: dict[tuple, tuple[ModelEntry | None, list[CatalogError]]] = {}


def _read_document(text: str, where: _Where, memo: CatalogMemo | None
                   ) -> tuple[dict[str, Any], list[str] | None]:
    if memo is not None and "\x00" not in text:
        text = text.removeprefix("\ufeff")
        _check_shape(text, where)
        read = memo.blocks.read(text)
        if read is not None:
            return read
    return _parse_toml(text, where), None


def _parse_toml(text: str, where: _Where) -> dict[str, Any]:
    if "\x00" in text:
        raise where.error(None, "binary file (contains NUL characters)",
                          hint="the catalog must be a TOML text file")
    text = text.removeprefix("\ufeff")
    _check_shape(text, where)
    try:
        # The stdlib parser reads a 1,000-model catalog about 10x faster than tomlkit (measured
        # by benchmarks/bench_daemon.py); tomlkit is asked only about text tomllib refuses, for
        # its line-and-column messages.
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        refused: Exception | None = e
    except (RecursionError, ValueError):
        refused = None
    try:
        return tomlkit.parse(text).unwrap()
    except ParseError as e:
        if refused is not None:   # tomllib's message and position, in a person's words
            raise where.error(None, _one_line(str(explain_toml_error(text, refused)))) from e
        reason = str(e).rsplit(" at line ", 1)[0]
        raise where.error(None, f"TOML syntax error at line {e.line} column {e.col}: "
                                f"{_one_line(reason)}") from e
    except TOMLKitError as e:  # e.g. KeyAlreadyPresent inside a table: no position known
        raise where.error(None, f"invalid TOML: {_one_line(str(e))}") from e
    except RecursionError as e:
        raise where.error(None, "nested too deeply to parse") from e
    except Exception as e:  # noqa: BLE001 - tomlkit raises assorted types on junk; all are bad input
        raise where.error(None, f"cannot parse TOML: {type(e).__name__}: {_one_line(str(e))}") from e


def _check_shape(text: str, where: _Where) -> None:
    """Refuse, in linear time, text too big in shape for tomlkit to parse in reasonable time."""
    lines = text.count("\n") + 1
    if lines > MAX_LINES:
        raise where.error(None, f"has {lines} lines; at most {MAX_LINES} allowed",
                          hint="a catalog is a short list of models; check the path")
    structure = sum(text.count(c) for c in "[{=,")
    if structure > MAX_STRUCTURE_CHARS:
        raise where.error(None, f"has {structure} brackets, '=' and ','; at most "
                                f"{MAX_STRUCTURE_CHARS} allowed",
                          hint="a catalog is a short list of models; check the path")


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    flat = _CONTROL_RE.sub("?", flat)
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def _readable_name(raw: Mapping[str, Any]) -> str | None:
    """The entry's name if it is a valid one (only then can it be shown or matched)."""
    name = raw.get("name")
    return name if isinstance(name, str) and NAME_RE.fullmatch(name) else None


#: entry field -> check; required fields are in REQUIRED_ENTRY_KEYS
_ENTRY_CHECKS: Mapping[str, _Check] = {
    "name": _name,
    "repo": _repo,
    "filename": _repo_path,
    "revision": _revision,
    "labels": _repo_path,
    "description": lambda v: _plain_text(v, max_chars=MAX_TEXT_CHARS, allow_empty=True),
    "task": lambda v: _plain_text(v, max_chars=128, allow_empty=False),
    "preprocessing_preset": _one_of(PRESETS),
    "input_size": _int_in(1, MAX_INPUT_SIZE),
    "providers": _providers,
}


def _parse_entry(raw: Mapping[str, Any], where: _Where, base_dir: str
                 ) -> tuple[ModelEntry | None, list[CatalogError]]:
    """One ``[[models]]`` table -> (entry or None if refused, its errors)."""
    errors: list[CatalogError] = []
    values: dict[str, Any] = {}
    for key in raw:
        if key not in ENTRY_KEYS:
            errors.append(where.unknown_key(key, ENTRY_KEYS))
    for key, what in REQUIRED_ENTRY_KEYS.items():
        if key not in raw:
            errors.append(where.error(key, "missing required field", hint=f"give {what}"))
    for key, check in _ENTRY_CHECKS.items():
        if key in raw:
            try:
                values[key] = check(raw[key])
            except _Invalid as bad:
                errors.append(where.invalid(key, bad))
    if errors:
        return None, errors
    quantize, quantize_error = None, None
    if "quantize" in raw:
        try:
            quantize = _parse_quantize(raw["quantize"], where, base_dir)
        except CatalogError as e:
            quantize_error = e
            errors.append(e)
    entry = ModelEntry(
        index=where.index or 0, name=values["name"], repo=values["repo"],
        filename=values["filename"], revision=values.get("revision"),
        labels=values.get("labels"), description=values.get("description", ""),
        task=values.get("task", ""), preprocessing_preset=values.get("preprocessing_preset"),
        input_size=values.get("input_size"), providers=values.get("providers"),
        quantize=quantize, quantize_error=quantize_error)
    return entry, errors


def _parse_quantize(raw: Any, where: _Where, base_dir: str) -> QuantizeSpec:
    """``[models.quantize]`` -> QuantizeSpec; raises the first problem as ``CatalogError``."""
    if not isinstance(raw, dict):
        raise where.error("quantize", f"expected a table, got {_kind(raw)}",
                          hint="write it as [models.quantize] below the model")
    try:
        enabled = _bool(raw.get("enabled", True))
    except _Invalid as bad:
        raise where.invalid("quantize.enabled", bad) from None
    if "method" not in raw and not enabled:
        method = "auto"  # nothing is built while disabled; the method is only a placeholder
    elif "method" not in raw:
        raise where.error("quantize.method", "missing required field",
                          hint=f"one of {', '.join(METHODS)}")
    else:
        try:
            method = _one_of(tuple(METHODS))(raw["method"])
        except _Invalid as bad:
            raise where.invalid("quantize.method", bad) from None
    options = METHOD_OPTIONS[method]
    known = ["enabled", "method", *GATE_KEYS, *options]
    if method in CALIBRATION_REQUIRED:
        known.append("calibration")
    for key in raw:
        if key not in known:
            raise where.unknown_key(key, known, prefix="quantize.")
    params = {}
    for key, (check, default) in sorted(options.items()):
        try:
            params[key] = check(raw[key]) if key in raw else default
        except _Invalid as bad:
            raise where.invalid(f"quantize.{key}", bad) from None
    calibration = None
    if "calibration" in raw:
        try:
            calibration = os.path.normpath(
                os.path.join(base_dir, _calibration_path(raw["calibration"])))
        except _Invalid as bad:
            raise where.invalid("quantize.calibration", bad) from None
    elif CALIBRATION_REQUIRED.get(method):
        raise where.error("quantize.calibration", "missing required field",
                          hint=f"method {method!r} needs a folder of sample inputs (images or .npy)")
    return QuantizeSpec(enabled=enabled, method=method, params=params, calibration=calibration,
                        gates=_parse_gates(raw, where))


def _parse_gates(raw: Mapping[str, Any], where: _Where) -> Gates:
    def number(key: str, default: float | None, **limits: Any) -> float | None:
        if key not in raw:
            return default
        try:
            return _number(raw[key], **limits)
        except _Invalid as bad:
            raise where.invalid(f"quantize.{key}", bad) from None

    defaults = Gates()
    shares = {key: number(key, getattr(defaults, key), low=0.0, high=1.0, low_open=True,
                          text="in (0, 1]") for key in SHARE_GATES}
    min_speedup = number("min_speedup", defaults.min_speedup, low=0.0, low_open=False, text=">= 0")
    max_abs_error = number("max_abs_error", None, low=0.0, low_open=True, text="> 0")
    try:
        allow_slower = _bool(raw.get("allow_slower", False))
    except _Invalid as bad:
        raise where.invalid("quantize.allow_slower", bad) from None
    if allow_slower:
        if "min_speedup" in raw and min_speedup != 0:
            raise where.error("quantize.allow_slower",
                              f"allow_slower = true conflicts with min_speedup = {min_speedup:g}",
                              hint="keep one of the two")
        min_speedup = 0.0
    return Gates(**shares, min_speedup=min_speedup, max_abs_error=max_abs_error)


# ----------------------------------------------------------------------------- the file

def read_catalog_bytes(path: Path) -> bytes:
    """The catalog file's bytes; every way of not being a readable small file is a CatalogError."""
    where = _Where(str(path))
    try:
        # O_NONBLOCK: a FIFO put in the catalog's place must not hang the daemon in open()
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError as e:
        raise where.error(None, "file not found",
                          hint="create it (an empty file is an empty catalog)") from e
    except OSError as e:
        raise where.error(None, f"cannot open: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise where.error(None, "is a directory; expected a TOML file")
        if not stat.S_ISREG(st.st_mode):
            raise where.error(None, "is not a regular file; expected a TOML file")
        if st.st_size > MAX_CATALOG_BYTES:
            raise _too_large(where)
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_CATALOG_BYTES:  # it grew after fstat
                raise _too_large(where)
        return b"".join(chunks)
    except OSError as e:
        raise where.error(None, f"cannot read: {e.strerror or e}") from e
    finally:
        os.close(fd)


def _too_large(where: _Where) -> CatalogError:
    return where.error(None, f"larger than {MAX_CATALOG_BYTES // (1024 * 1024)} MiB",
                       hint="a catalog is a short list of models; check the path")


def catalog_from_bytes(raw: bytes, *, path: str, base_dir: Path | None = None,
                       memo: CatalogMemo | None = None) -> Catalog:
    """Decode and validate a catalog file's bytes (``digest`` is their sha256)."""
    where = _Where(path)
    nul_at = raw.find(b"\x00")
    if nul_at >= 0:
        raise where.error(None, f"binary file (NUL byte at offset {nul_at})",
                          hint="the catalog must be a UTF-8 TOML text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise where.error(None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line})",
                          hint="save the catalog as UTF-8") from e
    return parse_catalog(text, path=path, base_dir=base_dir,
                         digest=hashlib.sha256(raw).hexdigest(), memo=memo)


def load_catalog(path: Path) -> Catalog:
    """Read and validate the catalog at ``path``; raises ``CatalogError`` for file-level problems."""
    path = Path(path)
    return catalog_from_bytes(read_catalog_bytes(path), path=str(path),
                              base_dir=path.absolute().parent)


# ----------------------------------------------------------------------------- last good

def keep_last_good(fresh: Catalog, previous: Catalog) -> Catalog:
    """``fresh`` with, for each entry it refused, the ``previous`` version of that entry (marked
    ``stale_error``), and for each invalid quantize table the previous QuantizeSpec: a typo in
    one entry never un-serves that model."""
    placed: dict[str, tuple[int, ModelEntry]] = {
        name: (entry.index, entry) for name, entry in fresh.entries.items()}
    for name, (index, entry) in list(placed.items()):
        old = previous.entries.get(name)
        if entry.quantize is None and entry.quantize_error is not None and old is not None \
                and old.quantize is not None:
            placed[name] = (index, replace(entry, quantize=old.quantize,
                                           quantize_error=entry.quantize_error))
    for error in fresh.errors:
        name = error.name
        if name is None or name in placed or name not in previous.entries \
                or error.index is None:
            continue
        placed[name] = (error.index, replace(previous.entries[name], index=error.index,
                                             stale_error=error))
    ordered = sorted(placed.values(), key=lambda pair: pair[0])
    return replace(fresh, entries={entry.name: _same_as_before(entry, previous.entries.get(entry.name))
                                   for _, entry in ordered})


def _same_as_before(entry: ModelEntry, old: ModelEntry | None) -> ModelEntry:
    """The previous object of an entry the edit did not touch: the reconciler's planner and
    views recognise unchanged entries by identity and skip them."""
    if old is not None and old == entry and _error_texts(old) == _error_texts(entry):
        return old
    return entry


def _error_texts(entry: ModelEntry) -> tuple[str, str]:
    return str(entry.quantize_error or ""), str(entry.stale_error or "")


def _signature(catalog: Catalog) -> tuple:
    """What makes two catalogs different for the daemon: file, entries and the errors' text."""
    entries = tuple((e, *_error_texts(e)) for e in catalog.entries.values())
    return (catalog.path, catalog.digest, entries, tuple(str(e) for e in catalog.errors))


class CatalogKeeper:
    """Keeps the last good catalog: a catalog that fails to parse or validate never replaces it."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._base_dir = self._path.absolute().parent
        self._current: Catalog = EMPTY
        self._error: CatalogError | None = None
        #: sha256 of the bytes of the latest attempt, good or bad (None: nothing read)
        self._seen_digest: str | None = None
        self._memo = CatalogMemo()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def current(self) -> Catalog:
        return self._current

    @property
    def error(self) -> CatalogError | None:
        return self._error

    def reload(self) -> bool:
        """Re-read the file; True if ``current`` changed. Only hashes when the bytes are the same."""
        try:
            raw = read_catalog_bytes(self._path)
        except CatalogError as e:
            # Not logged here: the reconciler logs a file-level error once, with what it keeps.
            self._seen_digest, self._error = None, e
            return False
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._seen_digest:
            return False
        self._seen_digest = digest
        try:
            fresh = catalog_from_bytes(raw, path=str(self._path), base_dir=self._base_dir,
                                       memo=self._memo)
        except CatalogError as e:
            self._error = e
            return False
        merged = keep_last_good(fresh, self._current)
        changed = _signature(merged) != _signature(self._current)
        self._current, self._error = merged, None
        log.info("catalog_loaded", path=str(self._path), models=len(merged.entries),
                 errors=len(merged.errors), digest=merged.digest[:12], changed=changed)
        for error in merged.errors:
            log.warning("catalog_entry_error", stale=_is_stale(merged, error), **error.fields())
        return changed



def _is_stale(catalog: Catalog, error: CatalogError) -> bool:
    entry = catalog.entries.get(error.name) if error.name else None
    return entry is not None and entry.stale_error is error
