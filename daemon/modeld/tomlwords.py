"""Pure: a TOML syntax error said in a person's words, with its line and column.

``catalog`` (model_catalog.toml) and ``settings`` (modeld.toml) call ``explain(text, error)`` when
the standard library's parser refuses a text: "unclosed string on line 7" rather than the
parser's "Illegal character '\\n' (at line 7, column 12)". No disk, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_AT = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")


@dataclass(frozen=True)
class SyntaxProblem:
    line: int
    column: int
    words: str

    def __str__(self) -> str:
        return f"TOML syntax error at line {self.line} column {self.column}: {self.words}"


@dataclass(frozen=True)
class _Opener:
    char: str
    line: int
    column: int


def explain(text: str, error: Exception | str) -> SyntaxProblem:
    """Words for ``tomllib``'s ``error`` on ``text`` (its message and position, refined by a
    scan for what was opened and never closed)."""
    message = str(error)
    m = _AT.search(message)
    reason = message[:m.start()] if m else message
    line, column = (int(m.group(1)), int(m.group(2))) if m and m.group(1) else _end(text)
    unclosed = first_unclosed(text)
    if unclosed is not None and (reason.startswith(("Unclosed", "Unterminated", "Expected \""))
                                 or _at_end(text, line, column)
                                 or (reason.startswith("Illegal character '\\n'")
                                     and unclosed.line == line)):
        return SyntaxProblem(unclosed.line, unclosed.column, _unclosed_words(unclosed))
    return SyntaxProblem(line, column, _words(reason, _snippet(text, line, column)))


def _unclosed_words(opener: _Opener) -> str:
    if opener.char in ("\"", "'", '"""', "'''"):
        return (f"unclosed string on line {opener.line}: the {opener.char} opened at column "
                f"{opener.column} is never closed")
    closing = {"[": "]", "{": "}"}[opener.char]
    what = "list" if opener.char == "[" else "inline table"
    return (f"unclosed {what} on line {opener.line}: the {opener.char} opened at column "
            f"{opener.column} needs its {closing}")


_REASONS: tuple[tuple[str, str], ...] = (
    ("Expected ']]' at the end of an array declaration",
     "a [[table]] header needs its closing ]]"),
    ("Expected ']' at the end of a table declaration", "a [table] header needs its closing ]"),
    ("Expected '=' after a key", "expected '=' after the key (a key with spaces must be quoted)"),
    ("Invalid value", "not a TOML value{snippet} (text needs quotes: \"...\"; or true, false, "
                      "a number, a [list])"),
    ("Invalid statement", "expected `key = value` or a [table] header{snippet}"),
    ("Expected newline or end of document", "unexpected text after the value{snippet} (one "
                                            "`key = value` per line)"),
    ("Cannot overwrite a value", "a key is set twice"),
    ("Cannot declare", "a table is declared twice"),
    ("Invalid initial character for a key part", "a key must start with a letter, digit, _ or "
                                                 "- (or be quoted){snippet}"),
    ("Unescaped '\\'", "unknown escape in a string (write \\\\ for a backslash, or use "
                        "'single quotes')"),
    ("Unescaped", "a control character inside a string (write it as an escape like \\t)"),
    ("Unrecognized escape", "unknown escape in a string (write \\\\ for a backslash)"),
    ("Illegal character", "a character that is not allowed here{snippet}"),
)


def _words(reason: str, snippet: str) -> str:
    shown = f" near {snippet!r}" if snippet else ""
    for prefix, words in _REASONS:
        if reason.startswith(prefix):
            return words.format(snippet=shown)
    return reason[:1].lower() + reason[1:]


def _snippet(text: str, line: int, column: int, width: int = 20) -> str:
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return ""
    return lines[line - 1][max(0, column - 1):][:width].strip()


def _at_end(text: str, line: int, column: int) -> bool:
    """Whether nothing but blanks follows the position (the parser ran out of text)."""
    lines = text.splitlines()
    if line > len(lines):
        return True
    rest = lines[line - 1][column - 1:] + "".join(lines[line:])
    return not rest.strip()


def _end(text: str) -> tuple[int, int]:
    lines = text.splitlines() or [""]
    return len(lines), len(lines[-1]) + 1


def first_unclosed(text: str) -> _Opener | None:
    """The first string, list or inline table opened and never closed (comments skipped)."""
    stack: list[_Opener] = []
    i, line, col0 = 0, 1, 0          # col0: index where the current line starts
    n = len(text)
    header = True                    # at the start of a statement: [ begins a table header
    while i < n:
        c = text[i]
        column = i - col0 + 1
        if c == "\n":
            line, col0, header = line + 1, i + 1, not stack
            i += 1
            continue
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c in "\"'":
            quote = text[i:i + 3] if text[i:i + 3] in ('"""', "'''") else c
            end = _string_end(text, i + len(quote), quote)
            if end is None:
                return _Opener(quote, line, column)
            for k in range(i, end):
                if text[k] == "\n":
                    line, col0 = line + 1, k + 1
            i = end
            header = False
            continue
        if c in "[{" and not (header and c == "["):
            stack.append(_Opener(c, line, column))
        elif c in "]}" and stack and stack[-1].char == {"]": "[", "}": "{"}[c]:
            stack.pop()
        if not c.isspace():
            header = header and c == "["   # `[[` of a header
            if c == "]" and not stack:
                header = False
        i += 1
    return stack[0] if stack else None


def _string_end(text: str, start: int, quote: str) -> int | None:
    """Index just past the closing ``quote``, or None when the string never closes."""
    i, basic = start, quote[0] == '"'
    multiline = len(quote) == 3
    while i < len(text):
        if basic and text[i] == "\\":
            i += 2
            continue
        if text.startswith(quote, i):
            return i + len(quote)
        if text[i] == "\n" and not multiline:
            return None
        i += 1
    return None
