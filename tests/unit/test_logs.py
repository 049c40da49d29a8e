"""Log formats: one JSON object per line with the request's id and span, the same facts in
text, --disable-spans, and LOG_LEVEL."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from shared import logs
from shared.logs import JsonFormatter, LogSpan, TextFormatter, log_level, unknown_log_level


def record(message: str = "hello %s", *args: object, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("router.service", logging.WARNING, "/src/router/service.py", 42,
                             message, args or ("world",), exc_info)


@pytest.fixture
def in_request():
    token = logs.current_span.set(LogSpan("POST /embed", "req-1", trace_id="ab" * 16,
                                          span_id="cd" * 8))
    yield
    logs.current_span.reset(token)


def test_json_line_outside_a_request() -> None:
    line = JsonFormatter("worker-0").format(record())
    entry = json.loads(line)
    # TEI's level names (tracing's): log shippers' filters on `level` match both servers.
    assert entry["level"] == "WARN" and entry["target"] == "router.service"
    assert entry["message"] == "hello world" and entry["process"] == "worker-0"
    assert entry["filename"] == "/src/router/service.py" and entry["line_number"] == 42
    assert entry["timestamp"].endswith("Z") and "T" in entry["timestamp"]
    assert "request_id" not in entry and "span" not in entry
    assert "\n" not in line


def test_json_line_inside_a_request_carries_its_id_and_span(in_request) -> None:
    entry = json.loads(JsonFormatter("router").format(record()))
    assert entry["request_id"] == "req-1"
    assert entry["span"] == {"name": "POST /embed", "trace_id": "ab" * 16, "span_id": "cd" * 8}


def test_disable_spans_drops_the_span_but_keeps_the_request_id(in_request) -> None:
    entry = json.loads(JsonFormatter("router", spans=False).format(record()))
    assert entry["request_id"] == "req-1" and "span" not in entry
    assert "POST /embed" not in TextFormatter("router", spans=False).format(record())


def test_exceptions_stay_on_one_json_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        line = JsonFormatter("router").format(record(exc_info=sys.exc_info()))
    assert "\n" not in line
    assert "ValueError: bad\nthing" in json.loads(line)["exception"]


def test_text_line_shows_the_span_as_tracing_subscriber_does(in_request) -> None:
    line = TextFormatter("router").format(record())
    assert "WARNING router[" in line
    assert line.endswith("router.service: POST /embed{request_id=req-1}: hello world")


@pytest.mark.parametrize(("raw", "level"), [
    (None, "INFO"), ("debug", "DEBUG"), ("WARN", "WARNING"), ("error", "ERROR"),
    ("trace", "DEBUG"), ("nonsense", "INFO"),
    # TEI's tracing filters, as its deployments set them: the most verbose level named.
    ("info,text_embeddings_router=debug", "DEBUG"), ("text_embeddings_core=warn", "WARNING"),
    ("warn, hyper = error", "WARNING"), (" ", "INFO"), ("debug,h2=off", "DEBUG"),
    ("off", "ERROR"),
])
def test_log_level_from_the_environment(raw: str | None, level: str) -> None:
    environ = {} if raw is None else {"LOG_LEVEL": raw}
    assert log_level(environ) == level
    # Only a name that is no level is reported (the router warns about it once).
    assert unknown_log_level(environ) == ("nonsense" if raw == "nonsense" else None)


@pytest.mark.parametrize(("level", "name"), [(logging.DEBUG, "DEBUG"), (logging.INFO, "INFO"),
                                             (logging.WARNING, "WARN"),
                                             (logging.ERROR, "ERROR"),
                                             (logging.CRITICAL, "ERROR")])
def test_json_levels_are_teis(level: int, name: str) -> None:
    entry = json.loads(JsonFormatter("router").format(
        logging.LogRecord("embedserve", level, "/src/x.py", 1, "m", (), None)))
    assert entry["level"] == name
