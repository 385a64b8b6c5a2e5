"""Progress on a terminal: one line per busy model, redrawn in place; nothing on a pipe.

The CLI feeds ``ProgressDisplay.update`` from the reconciler (folder mode) or from the daemon's
``progress`` events (daemon mode). Downloads say their bytes (``bytes_detail``, written by the
fetch worker): the line shows bytes, rate and ETA; other steps show the step and its share.
Log lines go through ``ProgressDisplay.stream``, which clears the bar first: nothing is
written over it.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

_BYTES_RE = re.compile(r"^(?P<head>.*?)\s*\[(?P<done>\d+)/(?P<total>\d+) bytes\]$")
BAR_CELLS = 20
MAX_LINE_CHARS = 150


def bytes_detail(text: str, done: int, total: int) -> str:
    """``"downloading model.onnx [1048576/4194304 bytes]"``: a step that moves bytes."""
    return f"{text} [{done}/{total} bytes]"


def parse_bytes(detail: str) -> tuple[str, int | None, int | None]:
    """(text, done, total) of a ``bytes_detail``; (detail, None, None) for any other."""
    m = _BYTES_RE.match(detail or "")
    if m is None:
        return detail or "", None, None
    return m.group("head"), int(m.group("done")), int(m.group("total"))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@dataclass
class _Rate:
    first_at: float
    first_bytes: int
    last_at: float = 0.0
    last_bytes: int = 0


class ProgressDisplay:
    """One redrawn line on a terminal stream; does nothing on anything else."""

    def __init__(self, stream: TextIO | None = None, *, clock: Callable[[], float] = time.monotonic,
                 enabled: bool | None = None) -> None:
        self._out = stream or sys.stderr
        self._clock = clock
        if enabled is None:
            enabled = bool(getattr(self._out, "isatty", lambda: False)())
        self.enabled = enabled
        #: the line never wraps (a wrapped line cannot be redrawn in place)
        self.width = (shutil.get_terminal_size((MAX_LINE_CHARS, 24)).columns - 1 if enabled
                      else 240)
        self._busy: dict[str, tuple[str, str, float | None]] = {}
        self._rates: dict[str, _Rate] = {}
        self._shown = ""
        self.stream = _ClearingStream(self)

    def update(self, model: str, action: str | None, detail: str = "",
               fraction: float | None = None) -> None:
        if action is None:
            self._busy.pop(model, None)
            self._rates.pop(model, None)
        else:
            self._busy[model] = (action, detail, fraction)
            self._track(model, detail)
        self._draw()

    def _track(self, model: str, detail: str) -> None:
        """Remember when a download started moving bytes: its rate is measured from there."""
        _, done, _total = parse_bytes(detail)
        rate = self._rates.get(model)
        if done is None:
            self._rates.pop(model, None)
        elif rate is None or done < rate.first_bytes:
            self._rates[model] = _Rate(self._clock(), done)
        else:
            rate.last_at, rate.last_bytes = self._clock(), done

    def models(self) -> list[str]:
        """The models shown as busy."""
        return list(self._busy)

    def line(self) -> str:
        """The text the bar shows now (for tests and for plain logs)."""
        parts = [self._part(m, *state) for m, state in sorted(self._busy.items())]
        return " | ".join(parts)[:self.width]

    def _part(self, model: str, action: str, detail: str, fraction: float | None) -> str:
        text, done, total = parse_bytes(detail)
        bar = ""
        if fraction is not None:
            filled = int(max(0.0, min(1.0, fraction)) * BAR_CELLS)
            bar = f" [{'#' * filled}{'.' * (BAR_CELLS - filled)}] {fraction:4.0%}"
        step = f" {text}" if text and text != action else ""
        if done is not None and total:
            step += f" {human_bytes(done)}/{human_bytes(total)}{self._speed(model, done, total)}"
        return f"{action} {model}{bar}{step}"

    def _speed(self, model: str, done: int, total: int) -> str:
        rate = self._rates.get(model)
        if rate is None:
            return ""
        elapsed = rate.last_at - rate.first_at
        if elapsed <= 0.2 or rate.last_bytes <= rate.first_bytes:
            return ""
        per_s = (rate.last_bytes - rate.first_bytes) / elapsed
        eta = f", ETA {_duration((total - done) / per_s)}"
        return f" at {human_bytes(per_s)}/s{eta}"

    def _draw(self) -> None:
        if not self.enabled:
            return
        text = self.line()
        if text == self._shown:
            return
        self._out.write("\r\033[K" + text)
        self._out.flush()
        self._shown = text

    def clear(self) -> None:
        if self.enabled and self._shown:
            self._out.write("\r\033[K")
            self._out.flush()
            self._shown = ""

    def done(self) -> None:
        self._busy.clear()
        self.clear()

    def _write_above(self, text: str) -> None:
        shown = self._shown
        self.clear()
        self._out.write(text)
        self._out.flush()
        if shown and text.endswith("\n"):
            self._draw()


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s}s" if s < 60 else f"{s // 60}m {s % 60:02d}s"


class _ClearingStream:
    """What the log writes to while a bar may be shown: clears the bar, writes, redraws."""

    __slots__ = ("_display", "__weakref__")

    def __init__(self, display: ProgressDisplay) -> None:
        self._display = display

    def write(self, text: str) -> int:
        self._display._write_above(text)
        return len(text)

    def flush(self) -> None:
        self._display._out.flush()

    def isatty(self) -> bool:
        return bool(getattr(self._display._out, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self._display._out.fileno()
