"""The daemon's settings: one frozen dataclass, built once by the CLI from argv and environment.

Layers, each over the one before: built-in defaults (the paths the installed unit uses), the
settings file (``/etc/mecha10/modeld.toml``, or ``$MODELD_CONFIG``), environment variables,
command-line flags. The daemon and the CLI read the same file, so a bare ``mecha10-modeld
status`` finds what the service uses. The fields of ``Settings`` are the one list of what may be
set: ``SETTINGS_KEYS`` (file key, variable, parser) is derived from them.
Units are in the names. Nothing reads the environment after start-up except huggingface_hub
(``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``), which the fetch worker passes on explicitly.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import UsageError
from .layout import LOCK_NAME
from .tomlwords import explain
from .variants import DEFAULT_PROVIDERS

DEFAULT_CONFIG = Path("/etc/mecha10/modeld.toml")
CONFIG_ENV = "MODELD_CONFIG"
DEFAULT_CATALOG = Path("/etc/mecha10/model_catalog.toml")
DEFAULT_MODELS = Path("/var/lib/mecha10-modeld/models")
DEFAULT_SOCKET = Path("/run/mecha10-modeld/modeld.sock")


class SettingsFileError(UsageError):
    """The settings file cannot be read, does not parse, or sets an unknown or bad value."""


def _path(value: Any) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("expected a path (a string)")
    return Path(value)


def _providers(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise ValueError("expected a list of provider names")
    out = tuple(p.strip() for p in items if p.strip())
    if not out:
        raise ValueError("expected at least one provider")
    return out


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value or None


def _mode(value: Any) -> int:
    if isinstance(value, str):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError("expected an octal mode such as \"0660\"")


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    raise ValueError("expected true or false")


def _number(kind: type) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}")
        return kind(value)
    return parse


def _setting(default: Any, **how: Any) -> Any:
    """A field of ``Settings`` and how the settings file, the environment and the flags set it:
    ``key`` (the file's key and the flag; default the field's name, None: not set that way),
    ``env`` (default ``MODELD_<KEY>``), ``parse`` (default by the field's type)."""
    return field(default=default, metadata=how)


@dataclass(frozen=True)
class Settings:
    catalog_path: Path = _setting(DEFAULT_CATALOG, key="catalog")
    models_dir: Path = _setting(DEFAULT_MODELS, key="models")
    socket_path: Path = _setting(DEFAULT_SOCKET, key="socket")
    #: execution providers the nodes use (a catalog entry may name its own)
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    #: test-only stand-ins for providers that cannot exist on this host (CoreML, CUDA; OpenVINO is
    #: real here, through ``runtimes``): provider ->
    #: operator types it cannot run. Set by MODELD_SIMULATE_PROVIDERS="CoreMLExecutionProvider=ConvInteger,MatMulInteger"
    simulated_providers: Mapping[str, tuple[str, ...]] = field(default_factory=dict,
                                                               metadata={"key": None})
    #: provider -> Python interpreter of the node runtime that proves it (``MODELD_RUNTIMES=
    #: "OpenVINOExecutionProvider=/opt/ov/bin/python"``, ``--runtime``); unmapped providers are
    #: proven in the daemon's own onnxruntime
    runtimes: Mapping[str, str] = field(default_factory=dict, metadata={"key": None})
    socket_mode: int = _setting(0o660, parse=_mode)
    socket_group: str | None = None
    max_clients: int = 1024
    max_workers: int = 2
    debounce_step_ms: int = 50
    debounce_max_ms: int = 500
    resync_interval_s: float = 300.0
    #: re-hash every recorded file this often (bit rot keeps size and mtime: scans trust the
    #: stat); checked at a resync, so it adds no wake-up of its own; 0 turns it off
    scrub_interval_s: float = 86400.0
    pull_timeout_s: float = 1800.0
    pull_attempts: int = 5
    quantize_timeout_s: float = 900.0
    verify_timeout_s: float = 600.0
    worker_memory_mb: int = 8192
    #: retry delay of a temporary failure: base * 2**(attempt-1), at least the error's own
    #: retry_after_s, at most the cap (the cap wins: tests set it short)
    retry_backoff_base_s: float = 2.0
    retry_backoff_cap_s: float = 300.0
    #: a node's nack makes the daemon hash and prove that file again, at most this often per
    #: file whoever sends them (one client must not keep the workers busy)
    recheck_interval_s: float = 600.0
    #: a proof or quantization that ran past its time limit this many times in a row fails
    #: permanently (SIGHUP or `sync` retries it): it must not hold a worker slot forever
    max_timeouts: int = 3
    #: the catalog is parsed in a thread; one that takes longer is reported (the last good
    #: catalog stays) and the loop goes on (a 4 MiB catalog that fails to parse took 10 s)
    catalog_parse_timeout_s: float = 2.0
    hub_endpoint: str | None = _setting(None, env="HF_ENDPOINT")
    hub_offline: bool = _setting(False, env="HF_HUB_OFFLINE")
    #: field samples (``modeld.samples``): at most this many per model and per node of a model,
    #: and this much disk for every model's samples together
    samples_per_model: int = 256
    samples_per_node: int = 64
    samples_budget_mb: float = 512.0

    @property
    def lock_path(self) -> Path:
        return self.models_dir / LOCK_NAME


def parse_simulated(spec: str | None) -> dict[str, tuple[str, ...]]:
    """``"CoreMLExecutionProvider=ConvInteger,MatMulInteger;Foo=Bar"`` -> mapping."""
    out: dict[str, tuple[str, ...]] = {}
    for part in (spec or "").split(";"):
        if not part.strip():
            continue
        name, _, ops = part.partition("=")
        out[name.strip()] = tuple(o.strip() for o in ops.split(",") if o.strip())
    return out


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


#: a field's parser by its type, unless the field names its own (``_setting(parse=...)``)
_PARSERS: Mapping[Any, Callable[[Any], Any]] = {
    Path: _path, bool: _flag, int: _number(int), float: _number(float),
    tuple[str, ...]: _providers, str | None: _text}


def _settings_keys() -> dict[str, tuple[str, str, Callable[[Any], Any]]]:
    hints = typing.get_type_hints(Settings)
    table = {}
    for f in dataclasses.fields(Settings):
        key = f.metadata.get("key", f.name)
        if key is not None:
            table[key] = (f.name, f.metadata.get("env", f"MODELD_{key.upper()}"),
                          f.metadata.get("parse") or _PARSERS[hints[f.name]])
    return table


#: settings-file key -> (Settings field, environment variable, parser), derived from the fields
#: of ``Settings``; CLI flags name the same keys (``--catalog`` -> ``catalog_path``)
SETTINGS_KEYS: Mapping[str, tuple[str, str, Callable[[Any], Any]]] = _settings_keys()
#: keys the file may hold that are not Settings fields (the CLI reads them)
OTHER_FILE_KEYS = ("log_level",)
_PATH_FIELDS = frozenset(attr for attr, _, parse in SETTINGS_KEYS.values() if parse is _path)
_PATH_KEYS = tuple(k for k, (_, _, parse) in SETTINGS_KEYS.items() if parse is _path)


def config_path(env: Mapping[str, str]) -> tuple[Path, bool]:
    """The settings file and whether it was asked for explicitly ($MODELD_CONFIG)."""
    given = env.get(CONFIG_ENV)
    return (Path(given), True) if given else (DEFAULT_CONFIG, False)


def read_settings_file(path: Path, *, required: bool) -> dict[str, Any]:
    """The file's values by settings-file key (raw, unparsed); {} when it is absent and not
    required. Relative paths in it are resolved against the file's folder."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise SettingsFileError(f"settings file {path} does not exist",
                                    hint=f"create it or unset {CONFIG_ENV}") from None
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsFileError(f"cannot read settings file {path}: {getattr(e, 'strerror', e) or e}"
                                ) from e
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SettingsFileError(f"{path}: {explain(text, e)}") from e
    known = (*SETTINGS_KEYS, *OTHER_FILE_KEYS)
    for key in raw:
        if key not in known:
            raise SettingsFileError(f"{path}: unknown key {key!r}",
                                    hint=f"known keys: {', '.join(known)}")
    out = dict(raw)
    for key in _PATH_KEYS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = str(Path(path).absolute().parent / out[key])
    return out


def layered_values(*, flags: Mapping[str, Any], env: Mapping[str, str],
                   file_values: Mapping[str, Any], file_name: str = "settings file"
                   ) -> dict[str, Any]:
    """Settings fields from the file, then the environment over it, then flags over both.
    ``flags`` are by settings-file key (``catalog``, ``providers``...), already typed or text."""
    out: dict[str, Any] = {}
    for key, (attr, var, parse) in SETTINGS_KEYS.items():
        for source, value in ((file_name, file_values.get(key)), (f"${var}", env.get(var) or None),
                              (f"--{key.replace('_', '-')}", flags.get(key))):
            if value is None:
                continue
            try:
                out[attr] = parse(value)
            except (ValueError, TypeError) as e:
                raise SettingsFileError(f"{source}: {key} = {value!r} is not valid: {e}") from e
    for attr in _PATH_FIELDS & out.keys():
        out[attr] = Path(out[attr]).absolute()
    return out
