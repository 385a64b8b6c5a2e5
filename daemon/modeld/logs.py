"""Logging, configured once by the CLI: structlog events with fields, rendered for where they go.

``configure(level)`` is called by ``modeld.cli`` before anything logs. On a terminal: the console
renderer; under systemd with stderr connected to the journal (``JOURNAL_STREAM``): one journal
entry per event with the fields as journal fields (``MODEL=yolov8n``, ``ERROR_TYPE=...``); anywhere
else: JSON lines. Standard-library loggers (watchdog, asyncio) go the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any, Callable, TextIO

import structlog

from . import systemd
from .errors import UsageError

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}
MODES = ("console", "json", "journald")
#: operators and tests may force a renderer: MODELD_LOG_FORMAT=json
MODE_ENV = "MODELD_LOG_FORMAT"
SYSLOG_IDENTIFIER = "mecha10-modeld"

#: syslog priorities (sd-journal(3) PRIORITY=) by structlog method name
_PRIORITIES = {"debug": 7, "info": 6, "msg": 6, "warning": 4, "warn": 4, "error": 3,
               "exception": 3, "critical": 2, "fatal": 2}
_CALLSITE = structlog.processors.CallsiteParameterAdder(
    [structlog.processors.CallsiteParameter.PATHNAME, structlog.processors.CallsiteParameter.LINENO,
     structlog.processors.CallsiteParameter.FUNC_NAME])
_JOURNAL_OWN_FIELDS = frozenset({"MESSAGE", "MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE",
                                 "CODE_FUNC", "SYSLOG_IDENTIFIER"})
_NOT_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")


def parse_level(level: str | int) -> int:
    """``"info"`` or ``logging.INFO`` -> ``logging.INFO``; anything else is a UsageError."""
    if isinstance(level, int) and level in LEVELS.values():
        return level
    numeric = LEVELS.get(str(level).strip().lower())
    if numeric is None:
        raise UsageError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    return numeric


def choose_mode(stream: TextIO) -> str:
    """``MODELD_LOG_FORMAT`` if set, else journald when ``stream`` is systemd's journal stream
    (and systemd-python can write structured entries), console on a terminal, JSON otherwise."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if forced:
        if forced not in MODES:
            raise UsageError(f"{MODE_ENV}={forced!r} is not a log format; expected one of "
                             f"{', '.join(MODES)}")
        return forced
    if systemd.stderr_is_journal(stream) and _journal_send() is not None:
        return "journald"
    try:
        return "console" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def configure(level: str | int = "info", *, stream: TextIO | None = None, mode: str | None = None,
              journal_send: Callable[..., Any] | None = None) -> str:
    """Configure structlog and the standard library's root logger; returns the mode chosen.

    ``journal_send`` replaces ``systemd.journal.send`` (tests capture entries with it).
    """
    numeric = parse_level(level)
    stream = stream if stream is not None else sys.stderr
    mode = mode or choose_mode(stream)
    if mode not in MODES:
        raise UsageError(f"unknown log format {mode!r}; expected one of {', '.join(MODES)}")
    shared: list[Any] = [structlog.contextvars.merge_contextvars,
                         structlog.processors.add_log_level]
    if mode == "journald":
        send = journal_send or _journal_send()
        if send is None:
            raise UsageError("log format journald needs systemd-python",
                             hint="pip install 'mecha10-modeld[systemd]'")
        processors = [*shared, _CALLSITE, structlog.processors.format_exc_info,
                      JournaldRenderer()]
        factory: Any = JournalLoggerFactory(send)
        handler: logging.Handler = _JournalHandler(send)
    else:
        renderer = (structlog.dev.ConsoleRenderer(colors=_colors(stream)) if mode == "console"
                    else structlog.processors.JSONRenderer(default=str))
        stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
        processors = [*shared, stamp, structlog.processors.StackInfoRenderer(),
                      structlog.processors.format_exc_info, renderer]
        factory = structlog.PrintLoggerFactory(file=stream)
        handler = logging.StreamHandler(stream)
        handler.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, stamp]))
    structlog.configure(processors=processors,
                        wrapper_class=structlog.make_filtering_bound_logger(numeric),
                        logger_factory=factory, cache_logger_on_first_use=False)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_modeld", False)]:
        root.removeHandler(old)
    handler.addFilter(ThirdPartyDemoter(numeric))
    handler._modeld = True  # type: ignore[attr-defined]  # ours: replaced on reconfigure
    root.addHandler(handler)
    root.setLevel(numeric)
    # watchdog reports every inotify event at debug level: noise even when we debug
    logging.getLogger("watchdog").setLevel(max(numeric, logging.INFO))
    return mode


class ThirdPartyDemoter(logging.Filter):
    """Standard-library records of other packages below ERROR become debug: httpx's request
    lines, onnxruntime's quantization notes, a sympy fallback are noise to an operator on every
    job (the daemon's own events say what matters). Errors pass as they are."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.name.split(".")[0] in OWN_LOGGERS:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.level <= logging.DEBUG


#: standard-library loggers whose records keep their level (the rest: ThirdPartyDemoter)
OWN_LOGGERS = frozenset({"modeld", "watchdog"})


def _colors(stream: TextIO) -> bool:
    return "NO_COLOR" not in os.environ and bool(getattr(stream, "isatty", lambda: False)())


def _journal_send() -> Callable[..., Any] | None:
    try:
        from systemd import journal
    except ImportError:
        return None
    return journal.send


def journal_field_name(key: str) -> str:
    """A structlog key as a journal field: upper case, ``[A-Z0-9_]``, not starting with ``_`` or a
    digit (those are the journal's trusted fields), and not one of the fields set here."""
    name = _NOT_FIELD_CHARS.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    if name in _JOURNAL_OWN_FIELDS:
        name = "MODELD_" + name
    return name[:64]


def _field_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)) or value is None:
        return json.dumps(value)
    return json.dumps(value, default=str, sort_keys=True)


class JournaldRenderer:
    """Final structlog processor: an event -> the fields of one journal entry.

    ``MESSAGE`` reads well in ``journalctl`` (``quantized model=yolov8n seconds=1.2``); each field
    is also its own journal field, so ``journalctl MODEL=yolov8n`` finds the model's events.
    """

    __slots__ = ("identifier",)

    def __init__(self, identifier: str = SYSLOG_IDENTIFIER) -> None:
        self.identifier = identifier

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event = str(event_dict.pop("event", ""))
        level = event_dict.pop("level", method_name)
        entry: dict[str, Any] = {
            "PRIORITY": str(_PRIORITIES.get(level, 6)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "CODE_FILE": event_dict.pop("pathname", None),
            "CODE_LINE": event_dict.pop("lineno", None),
            "CODE_FUNC": event_dict.pop("func_name", None),
            "EVENT": event,
        }
        exception = event_dict.pop("exception", None)
        pairs = []
        for key, value in event_dict.items():
            text = _field_text(value)
            entry[journal_field_name(key)] = text
            pairs.append(f"{key}={text if ' ' not in text else json.dumps(text)}")
        if exception:
            entry["EXCEPTION"] = str(exception)
        message = " ".join([event, *pairs])
        entry["MESSAGE"] = message
        return entry


class JournalLogger:
    """What structlog writes to in journald mode: every method sends one entry."""

    __slots__ = ("_send",)

    def __init__(self, send: Callable[..., Any]) -> None:
        self._send = send

    def msg(self, **fields: Any) -> None:
        message = fields.pop("MESSAGE", "")
        try:
            self._send(message, **{k: v for k, v in fields.items() if v is not None})
        except OSError:
            pass  # the journal went away: logging must never take the daemon down

    debug = info = warning = warn = error = exception = critical = fatal = log = msg


class JournalLoggerFactory:
    __slots__ = ("_send",)

    def __init__(self, send: Callable[..., Any]) -> None:
        self._send = send

    def __call__(self, *args: Any) -> JournalLogger:
        return JournalLogger(self._send)


class _JournalHandler(logging.Handler):
    """Standard-library records (watchdog, asyncio) into the journal with the same fields."""

    def __init__(self, send: Callable[..., Any]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self._send(message, PRIORITY=str(_PRIORITIES.get(record.levelname.lower(), 6)),
                       SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER, LOGGER=record.name,
                       CODE_FILE=record.pathname, CODE_LINE=record.lineno,
                       CODE_FUNC=record.funcName)
        except Exception:  # noqa: BLE001 - logging.Handler's contract
            self.handleError(record)
