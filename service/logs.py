"""How the server's log lines look: text (the default) or one JSON object per line.

``--log-format json`` (``RERANK_LOG_FORMAT=json``) makes every line of ``rerank serve`` and
``rerank gateway`` a JSON object with ``timestamp`` (UTC, ISO 8601), ``level``, ``logger`` and
``message``; ``exception`` when the line carries a traceback; ``trace_id`` and ``span_id``
(W3C hex) when an OpenTelemetry span is current as the line is written; and, on the access log
(logger ``rerank.access``), the call's fields as their own keys. Those fields are built once,
at the source (``write_access``), and the text line is made from them, so the two formats
cannot say different things. No key material is ever a field: the fronts log the key id at
most, inside the core's error messages.
"""

from __future__ import annotations

import enum
import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from service import tracing

access_log = logging.getLogger("rerank.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS = "access"  # the LogRecord attribute that carries an access line's fields
_TEXT_NAMES = {"error": "message"}  # the text line's older name, where the JSON one would clash
Fields = Mapping[str, str | int | float | bool]


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


def write_access(fields: Fields) -> None:
    """One access line: ``key=value ...`` as text, the same fields as keys in JSON."""
    access_log.info("%s", key_values(fields), extra={ACCESS: dict(fields)})


def key_values(fields: Fields) -> str:
    return " ".join(f"{_TEXT_NAMES.get(k, k)}={_text(k, v)}" for k, v in fields.items())


def _text(key: str, value: str | int | float | bool) -> str:
    if key == "error":
        return repr(value)  # free text: quoted, so the line still splits on spaces
    return f"{value:.1f}" if isinstance(value, float) else str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module's docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        line.update(tracing.current_ids())
        fields = getattr(record, ACCESS, None)
        if isinstance(fields, dict):
            line.update({k: v for k, v in fields.items() if k not in line})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format is LogFormat.JSON else logging.Formatter(TEXT_FORMAT)


def use(log_format: LogFormat) -> None:
    """Write every handler of the root logger (``rerank``'s stderr) in ``log_format``; text is
    what ``rerank`` set up already (and what a test's log capture keeps)."""
    if log_format is LogFormat.TEXT:
        return
    # the model loader's progress bars write to stderr past logging: not a line a machine can read
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter(log_format))
