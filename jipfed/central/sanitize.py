"""What a failure report may say once it leaves a site: a category, the task, a short sanitised message.

Exception texts at a site name series UIDs, patient names and ids, file paths and PACS URLs.
:func:`failure_report` turns such a text into ``"<category> in <task>: <message>"`` where the
message is the exception's last line (of a traceback; else the whole text) with everything that could identify a patient or the site's
internals replaced by a placeholder; the full text stays in the site's own task log.
:class:`jipfed.central.client.CentralClient` applies it to every failure report it sends, so every
caller is covered; the endpoint applies :func:`sanitize_text` again on receipt.

Redacted: URLs and ``host:port``; absolute and relative file paths; DICOM UIDs and dotted numbers;
e-mail addresses; DICOM person names (``DOE^JOHN``); anything in quotes or brackets; any token
holding a digit (ids, dates, accession numbers) other than a small count; hex strings; and every
word that is not plain ASCII. What is left are ASCII words and punctuation, at most
:data:`MAX_MESSAGE_CHARS` characters. A name written without quotes as a plain word is not
recognisable as a name and would pass: exception texts in this code base quote values (``!r``).
"""

from __future__ import annotations

import re

MAX_MESSAGE_CHARS = 200
MAX_TASK_CHARS = 64
CATEGORIES = ("connection", "data", "resources", "model", "error")

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*"), "<url>"),
    (re.compile(r"\S+@\S+"), "<email>"),
    (re.compile(r"(?:[A-Za-z]:)?[\\/]\S*|\S+[\\/]\S*"), "<path>"),
    (re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`"), "<value>"),
    (re.compile(r"\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\}|<(?!url>|email>|path>|value>)[^<>]*>"), "<value>"),
    (re.compile(r"\S*\^\S*"), "<name>"),
    (re.compile(r"\b\d+(?:\.\d+){2,}\b"), "<uid>"),
    (re.compile(r"\b[\w.-]+:\d+\b"), "<host>"),
    (re.compile(r"\b[0-9a-fA-F]{12,}\b"), "<hex>"),
    (re.compile(r"\S*\d\S*\d\S*\d\S*"), "<id>"),  # three or more digits in one token
    (re.compile(r"\S*[^\x00-\x7f]\S*"), "<word>"),
)
_CATEGORY_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("connection", ("connection", "timeout", "timed out", "unreachable", "refused", "http", "dns", "ssl")),
    ("resources", ("memory", "cuda", "no space", "disk", "oom", "killed")),
    ("data", ("dicom", "nifti", "series", "cohort", "pacs", "case", "label", "image", "filenotfound")),
    ("model", ("model", "checkpoint", "sha256", "signature", "tensor", "nan")),
)


def sanitize_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` with identifying parts replaced (see the module docstring), one line, at most ``limit`` chars."""
    line = " ".join(str(text).split())
    for pattern, placeholder in _PATTERNS:
        line = pattern.sub(placeholder, line)
    line = re.sub(r"[^A-Za-z0-9<>_ .,:;!?=+-]", "", line)
    line = " ".join(line.split())
    return line[:limit].rstrip() or "no message"


def category_of(text: str) -> str:
    """A coarse category of a failure text: connection, data, resources, model or error."""
    lower = str(text).lower()
    for category, words in _CATEGORY_WORDS:
        if any(word in lower for word in words):
            return category
    return "error"


def _message(text: str) -> str:
    """A traceback's last line (the exception), or every line of a plain message joined."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):
        return lines[-1]
    return " ".join(lines)


def failure_report(reason: str, *, task: str | None = None) -> str:
    """``"<category> in <task>: <sanitised message>"``; safe to send to the central."""
    last = _message(reason)
    task_name = re.sub(r"[^A-Za-z0-9_.-]", "", task or "")[:MAX_TASK_CHARS] or "unknown task"
    message = sanitize_text(last)
    return f"{category_of(message)} in {task_name}: {message}"
