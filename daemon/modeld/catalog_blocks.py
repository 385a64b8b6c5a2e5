"""Re-read only the ``[[models]]`` blocks that an edit changed.

Used by ``catalog.parse_catalog`` through ``catalog_file.CatalogKeeper``: a 1,000-model catalog takes tens of
milliseconds to parse as a whole, most of an edit -> notify budget, while an edit touches one
block. The text is cut at its ``[[models]]`` header lines; a block whose text is the same as in
the last read keeps its parsed table (and, in ``catalog``, its validated entry).

Cutting is only trusted when it cannot differ from a whole parse: the preamble must not mention
``models``, and every block must parse on its own to exactly one ``models`` table and nothing
else. A header line inside a multi-line string leaves an unterminated string in the block
before it, which fails to parse: then the caller reads the whole text as before, so errors are
always reported by the whole-file parser, with their line numbers.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

#: a ``[[models]]`` header on a line of its own (TOML allows blanks inside the brackets)
_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*models[ \t]*\]\][ \t]*(?:#[^\n]*)?\r?$", re.MULTILINE)


class BlockMemo:
    """The parsed blocks of the last catalog text, by their text. One owner (a CatalogKeeper)."""

    def __init__(self) -> None:
        self._tables: dict[str, dict[str, Any]] = {}
        self.parsed = 0          # blocks parsed by the last ``read`` (the rest came from memory)

    def read(self, text: str) -> tuple[dict[str, Any], list[str]] | None:
        """(document, block text of each ``models`` table), or None when the text must be
        parsed as a whole (no blocks, a block that does not stand alone, a syntax error)."""
        starts = [m.start() for m in _HEADER.finditer(text)]
        if not starts:
            return None
        try:
            document = tomllib.loads(text[:starts[0]])
        except (tomllib.TOMLDecodeError, RecursionError, ValueError):
            return None
        if "models" in document:
            return None
        tables: dict[str, dict[str, Any]] = {}
        blocks, models = [], []
        self.parsed = 0
        for begin, end in zip(starts, starts[1:] + [len(text)]):
            block = text[begin:end]
            table = tables.get(block) or self._tables.get(block)
            if table is None:
                table = _one_table(block)
                if table is None:
                    return None
                self.parsed += 1
            tables[block] = table
            blocks.append(block)
            models.append(table)
        self._tables = tables
        document["models"] = models
        return document, blocks


def _one_table(block: str) -> dict[str, Any] | None:
    try:
        parsed = tomllib.loads(block)
    except (tomllib.TOMLDecodeError, RecursionError, ValueError):
        return None
    models = parsed.get("models")
    if parsed.keys() != {"models"} or not isinstance(models, list) or len(models) != 1 \
            or not isinstance(models[0], dict):
        return None
    return models[0]
