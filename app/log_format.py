"""Log lines that are exactly one line and parseable: logfmt for text, one JSON object for json.

Anything a client or an upstream sends (a path with %0a, an upstream error text) can end
up in a log line. Every line is passed through escape_controls, so a CR or LF can never
start a forged line and no terminal escape reaches an operator's screen: C0 controls, DEL,
C1 controls and the Unicode line/paragraph separators become backslash escapes. A traceback
is therefore one line too, with its line breaks written as \\n (see docs/monitoring.md).

No Flask here: the formatters are plain logging.Formatter subclasses.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """text with every control character written as a visible escape (\\n, \\x1b, \\u2028)."""
    return _CONTROLS.sub(_escape_one, text)


#: What makes a logfmt value need quotes: a space, quote, =, backslash or a control character.
_NEEDS_QUOTES = re.compile(r'[ "=\\\x00-\x1f\x7f-\x9f\u2028\u2029]')


def _logfmt_value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    # Quoted: backslash and quote escaped first, so the control escapes that follow stay
    # unambiguous (a literal backslash-n in a path reads as \\n, a newline as \n).
    return '"' + escape_controls(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def logfmt(record: dict[str, object]) -> str:
    """key=value pairs; a value with a space, quote, =, backslash or control character is
    quoted, as logfmt parsers expect."""
    return " ".join(f"{key}={_logfmt_value(value)}" for key, value in record.items())


def json_line(record: dict[str, object]) -> str:
    # ensure_ascii escapes C0, C1 and U+2028/9; DEL is legal raw JSON but not in a log line.
    return json.dumps(record, separators=(",", ":"), default=str).replace("\x7f", "\\u007f")


def _utc_time(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """`asctime LEVEL logger message`, the whole line (traceback included) escaped to one line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Access records already are one (built by app.observe) and
    pass through; any other record becomes {"time", "level", "logger", "message"[, "exc"]}."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "json_ready", False):
            return escape_controls(record.getMessage())
        line: dict[str, object] = {
            "time": _utc_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json_line(line)


def utc_now() -> str:
    return _utc_time(datetime.now(UTC).timestamp())
