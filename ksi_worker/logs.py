"""Logging setup shared by every program of the bundle.

Programs log to stderr, which supervisord writes to the program's log file,
one line per record. ``KSI_LOG_LEVEL`` sets the level (default ``INFO``) and
``KSI_LOG_FORMAT`` the format: ``text`` (default) or ``json``, one JSON object
a line with the fields ``ts``, ``level``, ``logger``, ``pid``, ``thread``,
``message``, any of :data:`CONTEXT_FIELDS` passed with ``extra=``, and ``exc``
for a traceback.

Dramatiq's command line configures logging in its worker processes before it
imports ``ksi_worker.actors``, so :func:`configure_logging` also replaces the
formatter of handlers that already exist.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

#: Record attributes that JSON lines carry as fields when a call sets them
#: with ``extra=``.
CONTEXT_FIELDS = ("task_id", "attempt", "queue", "worker_pid", "agent_id")

LOG_FORMATS = ("text", "json")


class TextFormatter(logging.Formatter):
    """The text format, with line breaks of messages and tracebacks escaped.

    Each record then stays one line of the log file, so ``grep TASK_ID``
    finds all of it.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    """One JSON object a line; the fields are listed in the module docstring."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class ContextFilter(logging.Filter):
    """Sets fields that a program's every record carries, such as its queue.

    A field the log call sets itself with ``extra=`` is kept.
    """

    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self.fields.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class StderrHandler(logging.StreamHandler):
    """Writes each record to the ``sys.stderr`` of the moment.

    Dramatiq's worker processes replace ``sys.stderr`` with a pipe to their
    parent, which writes whole lines to the log; a handler inherited through
    fork then follows that replacement.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # always sys.stderr


def make_formatter(name: str | None = None) -> logging.Formatter:
    """Return the formatter of ``name``, default ``KSI_LOG_FORMAT``."""
    name = (name or os.environ.get("KSI_LOG_FORMAT") or "text").lower()
    return JsonFormatter() if name == "json" else TextFormatter()


def configure_logging(**context: Any) -> None:
    """Set the bundle's level and format on the root logger's handlers.

    Adds a :class:`StderrHandler` when the root logger has none. ``context``
    holds fields of :data:`CONTEXT_FIELDS` that every record of the program
    carries, such as ``queue="claude"`` in a worker.
    """
    level = os.environ.get("KSI_LOG_LEVEL", "INFO").upper()
    log_format = (os.environ.get("KSI_LOG_FORMAT") or "text").lower()
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(StderrHandler())
    formatter = make_formatter(log_format)
    for handler in root.handlers:
        handler.setFormatter(formatter)
        for old in [f for f in handler.filters if isinstance(f, ContextFilter)]:
            handler.removeFilter(old)
        if context:
            handler.addFilter(ContextFilter(context))
    root.setLevel(level)
    if log_format not in LOG_FORMATS:
        logging.getLogger(__name__).warning(
            "KSI_LOG_FORMAT=%r is not a log format; using text. Set text or json.",
            log_format,
        )
