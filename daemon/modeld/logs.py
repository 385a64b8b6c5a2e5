"""Logging, configured once by the CLI: structlog events with fields.

``configure(level)`` is called by ``modeld.cli`` before anything logs. Console renderer on a
terminal, JSON lines otherwise (journald with structured fields under systemd is added here too).
"""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def configure(level: str = "info", *, stream=None) -> None:
    stream = stream or sys.stderr
    numeric = LEVELS.get(str(level).lower())
    if numeric is None:
        from .errors import UsageError
        raise UsageError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    renderer = (structlog.dev.ConsoleRenderer() if stream.isatty()
                else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False)
