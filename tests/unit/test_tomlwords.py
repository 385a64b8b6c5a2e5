"""TOML syntax errors in a person's words (issue 16): what is wrong, on which line and column."""

from __future__ import annotations

import tomllib

import pytest

from modeld.tomlwords import explain, first_unclosed


def problem(text: str):
    with pytest.raises(tomllib.TOMLDecodeError) as caught:
        tomllib.loads(text)
    return explain(text, caught.value)


@pytest.mark.parametrize("text, line, column, words", [
    ('a = 1\nb = 2\nname = "yolo\nc = 3\n', 3, 8, "unclosed string on line 3"),
    ("a = 1\nb = [1,\n  2\n", 2, 5, "unclosed list on line 2"),
    ("x = {a = 1\n", 1, 5, "unclosed inline table"),
    ('a = """abc\n', 1, 5, "unclosed string"),
    ("[[models]\nname = 1\n", 1, 9, "[[table]] header needs its closing ]]"),
    ("[models\n", 1, 8, "[table] header needs its closing ]"),
    ("name = yolov8n\n", 1, 8, "not a TOML value near 'yolov8n'"),
    ("a b = 1\n", 1, 3, "expected '=' after the key"),
    ('a = "x" y\n', 1, 9, "unexpected text after the value"),
    ('p = "C:\\qemp"\n', 1, 10, "unknown escape"),
])
def test_words_line_and_column(text, line, column, words):
    found = problem(text)
    assert words in found.words, found
    assert (found.line, found.column) == (line, column), found
    assert str(found).startswith(f"TOML syntax error at line {line} column {column}: ")


def test_strings_and_comments_do_not_count_as_openers():
    assert first_unclosed('a = "[{"  # [ {\nb = [1]\n') is None
    assert first_unclosed('[[models]]\nx = ["a]", \'b}\']\n') is None
    assert first_unclosed("a = [\n") is not None
