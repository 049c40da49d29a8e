"""Logging set-up shared by every process: plain text, or one JSON object per line.

Both formats carry the same facts: time, level, logger (TEI's `target`), the process, the
source line and the message; inside a request also its id and span (the request's route and,
when tracing, its trace and span ids). TEI's --disable-spans leaves the span out of the lines.
LOG_LEVEL (TEI's variable) sets the level of every process; the workers inherit it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class LogSpan:
    """The request a log line was written for (set by the router's request middleware)."""

    name: str  # e.g. "POST /embed"
    request_id: str
    trace_id: str | None = None
    span_id: str | None = None


current_span: ContextVar[LogSpan | None] = ContextVar("embedserve_log_span", default=None)


def _timestamp(record: logging.LogRecord) -> str:
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z")


_TEI_LEVELS = {"WARNING": "WARN", "CRITICAL": "ERROR"}


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str, spans: bool = True) -> None:
        super().__init__()
        self.component = component
        self.spans = spans

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "timestamp": _timestamp(record),
            # As TEI's (tracing's) JSON names them: WARN, not WARNING; nothing above ERROR.
            "level": _TEI_LEVELS.get(record.levelname, record.levelname),
            "target": record.name,
            "process": self.component,
            "pid": record.process,
            "filename": record.pathname,
            "line_number": record.lineno,
            "message": record.getMessage(),
        }
        span = current_span.get()
        if span is not None:
            entry["request_id"] = span.request_id
            if self.spans:
                entry["span"] = {key: value for key, value in (
                    ("name", span.name), ("trace_id", span.trace_id), ("span_id", span.span_id),
                ) if value is not None}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL component[pid] logger: span{request_id=..}: message`, the span part as
    tracing-subscriber writes it (TEI's text format), only inside a request."""

    def __init__(self, component: str, spans: bool = True) -> None:
        super().__init__(f"%(asctime)s %(levelname)-5s {component}[%(process)d] %(name)s: "
                         "%(span)s%(message)s")
        self.spans = spans

    def format(self, record: logging.LogRecord) -> str:
        span = current_span.get()
        record.span = (f"{span.name}{{request_id={span.request_id}}}: "
                       if self.spans and span is not None else "")
        return super().format(record)


_VERBOSITY = ["ERROR", "WARNING", "INFO", "DEBUG"]


def _named_level(environ: Mapping[str, str]) -> str:
    """LOG_LEVEL as a Python level name. TEI reads it as a tracing filter, so deployments may
    set `info,text_embeddings_router=debug`: every logger here is the server's own, so the most
    verbose level named anywhere in it applies. An unknown name is returned as it is (INFO,
    with a warning: `unknown_log_level`)."""
    directives = [d.strip() for d in environ.get("LOG_LEVEL", "info").split(",") if d.strip()]
    names = [d.rpartition("=")[2].strip().upper() for d in directives]
    # `off` silences what it names: it adds no verbosity (all off: errors only, still).
    levels = [{"WARN": "WARNING", "TRACE": "DEBUG"}.get(name, name)  # Rust's level names
              for name in names if name != "OFF"]
    unknown = [level for level in levels if level not in _VERBOSITY]
    if unknown:
        return unknown[0]
    return max(levels, key=_VERBOSITY.index, default="ERROR" if names else "INFO")


def log_level(environ: Mapping[str, str] = os.environ) -> str:
    """LOG_LEVEL's level (default INFO; an unknown name is INFO too, never a crash)."""
    level = _named_level(environ)
    return level if level in logging.getLevelNamesMapping() else "INFO"


def unknown_log_level(environ: Mapping[str, str] = os.environ) -> str | None:
    """LOG_LEVEL as given when it names no level (and so means INFO), else None."""
    return (environ["LOG_LEVEL"]
            if _named_level(environ) not in logging.getLevelNamesMapping() else None)


def setup_logging(json_output: bool, component: str, spans: bool = True) -> None:
    """Route every logger of this process (and Python's warnings) to stderr in one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component, spans) if json_output
                         else TextFormatter(component, spans))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(log_level())
    # A library's warnings.warn() would otherwise print a bare, unformatted line.
    logging.captureWarnings(True)
