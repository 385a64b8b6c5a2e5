"""Settings layering (issue 16): built-in installed paths < settings file < environment < flags;
a settings file's mistakes are one line with where and what."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from modeld.cli import build_parser, log_level, settings_from
from modeld.errors import UsageError
from modeld.settings import (DEFAULT_CATALOG, DEFAULT_MODELS, SETTINGS_KEYS, Settings,
                             SettingsFileError, read_settings_file)


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_no_file_no_env_gives_the_installed_paths(tmp_path):
    s = settings_from(args("status"), env={"MODELD_CONFIG": ""} | {"HOME": str(tmp_path)})
    assert s.catalog_path == DEFAULT_CATALOG and s.models_dir == DEFAULT_MODELS
    assert str(DEFAULT_CATALOG) == "/etc/mecha10/model_catalog.toml"


def test_file_then_env_then_flags(tmp_path):
    config = tmp_path / "modeld.toml"
    config.write_text('catalog = "cat.toml"\nmodels = "/srv/models"\nproviders = ["A", "B"]\n'
                      'max_workers = 3\nsocket_mode = "0600"\n')
    env = {"MODELD_CONFIG": str(config)}
    s = settings_from(args("status"), env=env)
    assert s.catalog_path == tmp_path / "cat.toml"        # relative to the file
    assert s.models_dir == Path("/srv/models") and s.providers == ("A", "B")
    assert s.max_workers == 3 and s.socket_mode == 0o600
    s = settings_from(args("status"), env=env | {"MODELD_MODELS": "/env/models",
                                                 "MODELD_MAX_WORKERS": "5"})
    assert s.models_dir == Path("/env/models") and s.max_workers == 5
    s = settings_from(args("--models", "/flag/models", "status"),
                      env=env | {"MODELD_MODELS": "/env/models"})
    assert s.models_dir == Path("/flag/models")


@pytest.mark.parametrize("text, fragment", [
    ('models = "/x\n', "unclosed string on line 1"),
    ("nope = 1\n", "unknown key 'nope'"),
    ('max_workers = "many"\n', "max_workers = 'many' is not valid"),
    ("providers = [1]\n", "providers"),
])
def test_settings_file_mistakes_are_one_line(tmp_path, text, fragment):
    config = tmp_path / "modeld.toml"
    config.write_text(text)
    with pytest.raises(SettingsFileError) as caught:
        settings_from(args("status"), env={"MODELD_CONFIG": str(config)})
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, UsageError)


def test_a_named_settings_file_must_exist(tmp_path):
    with pytest.raises(SettingsFileError, match="does not exist"):
        read_settings_file(tmp_path / "absent.toml", required=True)
    assert read_settings_file(tmp_path / "absent.toml", required=False) == {}


def test_bad_env_number_says_which_variable():
    with pytest.raises(UsageError, match="MODELD_PULL_ATTEMPTS"):
        settings_from(args("status"), env={"MODELD_PULL_ATTEMPTS": "x"})


def test_commands_other_than_run_log_nothing_unless_asked():
    assert log_level(args("status"), env={}) == "critical"
    assert log_level(args("-v", "status"), env={}) == "info"
    assert log_level(build_parser().parse_args(["run"]), env={}) == "info"


def test_every_settings_field_is_a_file_key_and_a_variable_derived_from_the_dataclass():
    """The file/environment/flag table comes from ``dataclasses.fields(Settings)``: a new field
    is settable everywhere with no second list to edit (only the two mappings have their own
    variables, MODELD_SIMULATE_PROVIDERS and MODELD_RUNTIMES)."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert {attr for attr, _, _ in SETTINGS_KEYS.values()} == fields - {"simulated_providers",
                                                                         "runtimes"}
    s = settings_from(args("status"), env={"MODELD_CATALOG_PARSE_TIMEOUT_S": "7",
                                           "HF_HUB_OFFLINE": "1", "MODELD_SOCKET_MODE": "0640"})
    assert (s.catalog_parse_timeout_s, s.hub_offline, s.socket_mode) == (7.0, True, 0o640)
